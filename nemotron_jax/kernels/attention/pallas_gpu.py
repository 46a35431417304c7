"""Flash attention in Pallas (Triton lowering on GPU; `interpret=True` on CPU).

Layout as in `reference.py`: q [B, T, N, H], k and v [B, S, K, H], N = K * G. K/V are never
repeated: the kv BlockSpecs map query head h to kv head h // G.

Kernels (all statistics float32; masked scores use a finite -1e30 and masked probabilities are
zeroed explicitly, so fully masked rows give 0, never NaN):
  * forward, grid (B, N, T/block_q): a `fori_loop` over kv blocks that stops at the causal
    diagonal, online softmax (m, row_sum, acc), writes o and the log-sum-exp (LSE) [B, N, T].
  * dq, grid (B, N, T/block_q_dq): loops over kv blocks up to the diagonal.
  * dk/dv, grid (B, K, S/block_k_dkv): loops over the G query heads of its kv head and over the
    q blocks from the diagonal on, so dk/dv are summed over the group without atomics.
  Both backward kernels use delta = sum(o * do, -1), computed once in XLA.

Sequence lengths that are not block multiples are padded inside the wrapper; padded positions
get segment id 0, which the kernels mask like any padding. Without `segment_ids` the real
positions get id 1.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from nemotron_jax.kernels.attention import reference

_F32 = jnp.float32
_MASK_VALUE = reference.MASK_VALUE
_MIN_BLOCK = 16  # Triton's tl.dot needs every matmul dimension >= 16


def _is_pow2(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes and Triton launch parameters; hashable, so it can be a static argument.

    Every block size must be a power of two >= 16 (Triton tiles are powers of two and `tl.dot`
    needs dimensions >= 16). Blocks larger than the (padded) sequence are shrunk to fit, so the
    defaults also serve short sequences. The defaults (64 everywhere, 4 warps, 2 stages) are the
    usual Triton flash-attention choice for head_dim <= 128; they are not tuned on hardware yet.

    Attributes:
        block_q: forward query tile.
        block_k: forward key tile (inner-loop step).
        block_q_dq: dq kernel query tile.
        block_k_dq: dq kernel key tile (inner-loop step).
        block_q_dkv: dk/dv kernel query tile (inner-loop step).
        block_k_dkv: dk/dv kernel key tile.
        num_warps: Triton warps per program.
        num_stages: Triton software-pipelining stages.
    """

    block_q: int = 64
    block_k: int = 64
    block_q_dq: int = 64
    block_k_dq: int = 64
    block_q_dkv: int = 64
    block_k_dkv: int = 64
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"BlockSizes.{field.name} must be an int, got {value!r}")
            if field.name.startswith("block_") and not (_is_pow2(value) and value >= _MIN_BLOCK):
                raise ValueError(
                    f"BlockSizes.{field.name} must be a power of two >= {_MIN_BLOCK}, got {value}"
                )
        if not _is_pow2(self.num_warps) or self.num_warps > 32:
            raise ValueError(
                f"BlockSizes.num_warps must be a power of two <= 32, got {self.num_warps}"
            )
        if self.num_stages < 1:
            raise ValueError(f"BlockSizes.num_stages must be >= 1, got {self.num_stages}")


@dataclasses.dataclass(frozen=True)
class _Config:
    """Static (hashable) configuration of one call, after padding."""

    causal: bool
    scale: float
    groups: int
    block_q: int
    block_k: int
    block_q_dq: int
    block_k_dq: int
    block_q_dkv: int
    block_k_dkv: int
    num_warps: int
    num_stages: int
    interpret: bool
    backward_impl: str


def _fit(block: int, length: int) -> int:
    """Shrinks a block to the smallest power of two >= length (but >= 16)."""
    return min(block, max(_MIN_BLOCK, 1 << max(length - 1, 0).bit_length()))


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _dot_nt(a, b):
    """a [M, H] x b [N, H] -> [M, N] in float32 (contracting the last dims, no transpose)."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=_F32)


def _dot_tn(a, b):
    """a [M, N] x b [M, H] -> [N, H] in float32 (contracting the first dims)."""
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=_F32)


def _allowed(q_seg, k_seg, q_start, k_start, block_q, block_k, causal):
    """bool [block_q, block_k]: equal nonzero segment ids, and key <= query if causal."""
    allowed = (q_seg[:, None] == k_seg[None, :]) & (q_seg[:, None] != 0)
    if causal:
        q_pos = q_start + lax.broadcasted_iota(jnp.int32, (block_q, block_k), 0)
        k_pos = k_start + lax.broadcasted_iota(jnp.int32, (block_q, block_k), 1)
        allowed = allowed & (k_pos <= q_pos)
    return allowed


def _call(kernel, cfg: _Config, **kwargs):
    params = {}
    if not cfg.interpret:
        from jax.experimental.pallas import triton as plgpu

        params["compiler_params"] = plgpu.CompilerParams(
            num_warps=cfg.num_warps, num_stages=cfg.num_stages
        )
    return pl.pallas_call(kernel, interpret=cfg.interpret, **params, **kwargs)


# --- forward ---------------------------------------------------------------------------------


def _fwd_kernel(q_ref, k_ref, v_ref, qseg_ref, kseg_ref, o_ref, lse_ref, *, cfg, kv_len):
    # q_ref/o_ref [bq, H]; k_ref/v_ref [S, H]; qseg_ref/lse_ref [bq]; kseg_ref [S]
    bq, bk = cfg.block_q, cfg.block_k
    q_start = pl.program_id(2) * bq
    q = q_ref[...]
    q_seg = qseg_ref[...]

    def body(j, carry):
        m, row_sum, acc = carry
        k_start = j * bk
        k = k_ref[pl.ds(k_start, bk), :]
        v = v_ref[pl.ds(k_start, bk), :]
        allowed = _allowed(
            q_seg, kseg_ref[pl.ds(k_start, bk)], q_start, k_start, bq, bk, cfg.causal
        )
        s = jnp.where(allowed, _dot_nt(q, k) * cfg.scale, _MASK_VALUE)  # [bq, bk]
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        # Zeroed explicitly: with a finite mask value a fully masked block would give exp(0) = 1.
        p = jnp.where(allowed, jnp.exp(s - m_new[:, None]), 0.0)
        alpha = jnp.exp(m - m_new)
        row_sum = row_sum * alpha + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + jnp.dot(p.astype(v.dtype), v, preferred_element_type=_F32)
        return m_new, row_sum, acc

    num_blocks = kv_len // bk
    if cfg.causal:  # key blocks past the diagonal are fully masked: skip them
        num_blocks = jnp.minimum(num_blocks, pl.cdiv(q_start + bq, bk))
    init = (
        jnp.full((bq,), _MASK_VALUE, _F32),
        jnp.zeros((bq,), _F32),
        jnp.zeros((bq, q.shape[-1]), _F32),
    )
    m, row_sum, acc = lax.fori_loop(0, num_blocks, body, init)
    l_safe = jnp.where(row_sum == 0.0, 1.0, row_sum)  # rows with no visible key: acc = 0, so o = 0
    o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log(l_safe)


def _fwd(q, k, v, q_seg, kv_seg, cfg: _Config):
    b, t, n, h = q.shape
    s = k.shape[1]
    g = cfg.groups
    kernel = functools.partial(_fwd_kernel, cfg=cfg, kv_len=s)
    return _call(
        kernel,
        cfg,
        grid=(b, n, t // cfg.block_q),
        in_specs=[
            pl.BlockSpec((None, cfg.block_q, None, h), lambda bi, hi, i: (bi, i, hi, 0)),
            pl.BlockSpec((None, s, None, h), lambda bi, hi, i: (bi, 0, hi // g, 0)),
            pl.BlockSpec((None, s, None, h), lambda bi, hi, i: (bi, 0, hi // g, 0)),
            pl.BlockSpec((None, cfg.block_q), lambda bi, hi, i: (bi, i)),
            pl.BlockSpec((None, s), lambda bi, hi, i: (bi, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, cfg.block_q, None, h), lambda bi, hi, i: (bi, i, hi, 0)),
            pl.BlockSpec((None, None, cfg.block_q), lambda bi, hi, i: (bi, hi, i)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((b, n, t), _F32),  # LSE
        ],
        name="flash_attention_fwd",
    )(q, k, v, q_seg, kv_seg)


# --- backward --------------------------------------------------------------------------------


def _dq_kernel(
    q_ref, k_ref, v_ref, qseg_ref, kseg_ref, do_ref, lse_ref, delta_ref, dq_ref, *, cfg, kv_len
):
    # q_ref/do_ref/dq_ref [bq, H]; k_ref/v_ref [S, H]; qseg/lse/delta [bq]; kseg [S]
    bq, bk = cfg.block_q_dq, cfg.block_k_dq
    q_start = pl.program_id(2) * bq
    q, do = q_ref[...], do_ref[...]
    q_seg, lse, delta = qseg_ref[...], lse_ref[...], delta_ref[...]

    def body(j, dq):
        k_start = j * bk
        k = k_ref[pl.ds(k_start, bk), :]
        v = v_ref[pl.ds(k_start, bk), :]
        allowed = _allowed(
            q_seg, kseg_ref[pl.ds(k_start, bk)], q_start, k_start, bq, bk, cfg.causal
        )
        s = jnp.where(allowed, _dot_nt(q, k) * cfg.scale, _MASK_VALUE)
        p = jnp.where(allowed, jnp.exp(s - lse[:, None]), 0.0)  # [bq, bk]
        ds = p * (_dot_nt(do, v) - delta[:, None])
        return dq + jnp.dot(ds.astype(k.dtype), k, preferred_element_type=_F32)

    num_blocks = kv_len // bk
    if cfg.causal:
        num_blocks = jnp.minimum(num_blocks, pl.cdiv(q_start + bq, bk))
    dq = lax.fori_loop(0, num_blocks, body, jnp.zeros((bq, q.shape[-1]), _F32))
    dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel(
    q_ref,
    k_ref,
    v_ref,
    qseg_ref,
    kseg_ref,
    do_ref,
    lse_ref,
    delta_ref,
    dk_ref,
    dv_ref,
    *,
    cfg,
    q_len,
):
    # q_ref/do_ref [T, G, H]; k_ref/v_ref/dk_ref/dv_ref [bk, H]; qseg [T]; kseg [bk];
    # lse_ref/delta_ref [G, T]
    bq, bk = cfg.block_q_dkv, cfg.block_k_dkv
    k_start = pl.program_id(2) * bk
    k, v = k_ref[...], v_ref[...]
    k_seg = kseg_ref[...]
    num_q_blocks = q_len // bq
    # Query blocks that end before this key block starts see none of it under causality.
    first = k_start // bq if cfg.causal else 0

    def head_body(g, carry):
        def q_body(i, carry):
            dk, dv = carry
            q_start = i * bq
            q = q_ref[pl.ds(q_start, bq), g, :]
            do = do_ref[pl.ds(q_start, bq), g, :]
            lse = lse_ref[g, pl.ds(q_start, bq)]
            delta = delta_ref[g, pl.ds(q_start, bq)]
            q_seg = qseg_ref[pl.ds(q_start, bq)]
            allowed = _allowed(q_seg, k_seg, q_start, k_start, bq, bk, cfg.causal)
            s = jnp.where(allowed, _dot_nt(q, k) * cfg.scale, _MASK_VALUE)
            p = jnp.where(allowed, jnp.exp(s - lse[:, None]), 0.0)  # [bq, bk]
            dv = dv + _dot_tn(p.astype(do.dtype), do)
            ds = p * (_dot_nt(do, v) - delta[:, None])
            dk = dk + _dot_tn(ds.astype(q.dtype), q)
            return dk, dv

        return lax.fori_loop(first, num_q_blocks, q_body, carry)

    zeros = jnp.zeros((bk, k.shape[-1]), _F32)
    dk, dv = lax.fori_loop(0, cfg.groups, head_body, (zeros, zeros))
    dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _bwd_pallas(cfg: _Config, res, do):
    q, k, v, q_seg, kv_seg, o, lse = res
    b, t, n, h = q.shape
    s, kv_heads = k.shape[1], k.shape[2]
    g = cfg.groups
    # [B, N, T] float32, like the LSE
    delta = jnp.einsum("BTNH,BTNH->BNT", o.astype(_F32), do.astype(_F32))
    bq, bk = cfg.block_q_dq, cfg.block_k_dq
    dq = _call(
        functools.partial(_dq_kernel, cfg=cfg, kv_len=s),
        cfg,
        grid=(b, n, t // bq),
        in_specs=[
            pl.BlockSpec((None, bq, None, h), lambda bi, hi, i: (bi, i, hi, 0)),
            pl.BlockSpec((None, s, None, h), lambda bi, hi, i: (bi, 0, hi // g, 0)),
            pl.BlockSpec((None, s, None, h), lambda bi, hi, i: (bi, 0, hi // g, 0)),
            pl.BlockSpec((None, bq), lambda bi, hi, i: (bi, i)),
            pl.BlockSpec((None, s), lambda bi, hi, i: (bi, 0)),
            pl.BlockSpec((None, bq, None, h), lambda bi, hi, i: (bi, i, hi, 0)),
            pl.BlockSpec((None, None, bq), lambda bi, hi, i: (bi, hi, i)),
            pl.BlockSpec((None, None, bq), lambda bi, hi, i: (bi, hi, i)),
        ],
        out_specs=pl.BlockSpec((None, bq, None, h), lambda bi, hi, i: (bi, i, hi, 0)),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        name="flash_attention_dq",
    )(q, k, v, q_seg, kv_seg, do, lse, delta)
    bk = cfg.block_k_dkv
    dk, dv = _call(
        functools.partial(_dkv_kernel, cfg=cfg, q_len=t),
        cfg,
        grid=(b, kv_heads, s // bk),
        in_specs=[
            # Block index kh along N with block size G selects query heads kh*G .. kh*G+G-1.
            pl.BlockSpec((None, t, g, h), lambda bi, kh, j: (bi, 0, kh, 0)),
            pl.BlockSpec((None, bk, None, h), lambda bi, kh, j: (bi, j, kh, 0)),
            pl.BlockSpec((None, bk, None, h), lambda bi, kh, j: (bi, j, kh, 0)),
            pl.BlockSpec((None, t), lambda bi, kh, j: (bi, 0)),
            pl.BlockSpec((None, bk), lambda bi, kh, j: (bi, j)),
            pl.BlockSpec((None, t, g, h), lambda bi, kh, j: (bi, 0, kh, 0)),
            pl.BlockSpec((None, g, t), lambda bi, kh, j: (bi, kh, 0)),
            pl.BlockSpec((None, g, t), lambda bi, kh, j: (bi, kh, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, bk, None, h), lambda bi, kh, j: (bi, j, kh, 0)),
            pl.BlockSpec((None, bk, None, h), lambda bi, kh, j: (bi, j, kh, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct(k.shape, k.dtype),
            jax.ShapeDtypeStruct(v.shape, v.dtype),
        ],
        name="flash_attention_dkv",
    )(q, k, v, q_seg, kv_seg, do, lse, delta)
    return dq, dk, dv


def _padded_reference(q, k, v, q_seg, kv_seg, cfg: _Config):
    allowed = (q_seg[:, :, None] == kv_seg[:, None, :]) & (q_seg[:, :, None] != 0)
    return reference.attention_reference(
        q, k, v, mask=allowed, causal=cfg.causal, sm_scale=cfg.scale
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q, k, v, q_seg, kv_seg, cfg: _Config):
    return _fwd(q, k, v, q_seg, kv_seg, cfg)[0]


def _flash_fwd(q, k, v, q_seg, kv_seg, cfg: _Config):
    o, lse = _fwd(q, k, v, q_seg, kv_seg, cfg)
    return o, (q, k, v, q_seg, kv_seg, o, lse)


def _flash_bwd(cfg: _Config, res, do):
    q, k, v, q_seg, kv_seg = res[:5]
    if cfg.backward_impl == "xla":
        # Recomputes the reference and differentiates it: the correctness fallback.
        _, vjp = jax.vjp(lambda q, k, v: _padded_reference(q, k, v, q_seg, kv_seg, cfg), q, k, v)
        dq, dk, dv = vjp(do)
    else:
        dq, dk, dv = _bwd_pallas(cfg, res, do)
    return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def pallas_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    causal: bool = True,
    sm_scale: float | None = None,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
    backward_impl: str = "pallas",
) -> jax.Array:
    """Flash attention with a custom VJP; masking rules as in `reference.py`.

    Args:
        q: [B, T, N, H].
        k: [B, S, K, H], N % K == 0.
        v: [B, S, K, H].
        segment_ids: optional int [B, T] (T == S); 0 is padding.
        causal: causal (top-left aligned) masking.
        sm_scale: score scale; defaults to 1/sqrt(H).
        block_sizes: tiles; defaults to `BlockSizes()`.
        interpret: run the kernels in the Pallas interpreter (the only mode on CPU).
        backward_impl: "pallas" (the dq and dk/dv kernels) or "xla" (VJP of the reference).

    Returns:
        [B, T, N, H] in q.dtype.
    """
    g = reference.check_shapes(q, k, v)
    b, t, n, h = q.shape
    s = k.shape[1]
    if block_sizes is None:
        block_sizes = BlockSizes()
    if not isinstance(block_sizes, BlockSizes):
        raise ValueError(f"block_sizes must be a BlockSizes, got {type(block_sizes).__name__}")
    if backward_impl not in ("pallas", "xla"):
        raise ValueError(f"backward_impl must be 'pallas' or 'xla', got {backward_impl!r}")
    if not interpret and not (_is_pow2(h) and h >= _MIN_BLOCK):
        # Triton tiles the head dimension whole.
        raise ValueError(f"the compiled Pallas kernel needs head_dim a power of two >= 16, got {h}")
    if segment_ids is not None and (segment_ids.shape != (b, t) or t != s):
        raise ValueError(
            f"segment_ids must be [B, T] = {(b, t)} with T == S ({s}), got {segment_ids.shape}"
        )
    bs = block_sizes
    blocks_q = [_fit(x, t) for x in (bs.block_q, bs.block_q_dq, bs.block_q_dkv)]
    blocks_k = [_fit(x, s) for x in (bs.block_k, bs.block_k_dq, bs.block_k_dkv)]
    # All blocks are powers of two, so padding to the largest makes every grid exact.
    t_pad, s_pad = _round_up(t, max(blocks_q)), _round_up(s, max(blocks_k))
    cfg = _Config(
        causal=bool(causal),
        scale=float(1.0 / math.sqrt(h) if sm_scale is None else sm_scale),
        groups=g,
        block_q=blocks_q[0],
        block_k=blocks_k[0],
        block_q_dq=blocks_q[1],
        block_k_dq=blocks_k[1],
        block_q_dkv=blocks_q[2],
        block_k_dkv=blocks_k[2],
        num_warps=bs.num_warps,
        num_stages=bs.num_stages,
        interpret=bool(interpret),
        backward_impl=backward_impl,
    )
    if segment_ids is None:
        q_seg = jnp.ones((b, t), jnp.int32)
        kv_seg = jnp.ones((b, s), jnp.int32)
    else:
        q_seg = kv_seg = segment_ids.astype(jnp.int32)
    # Padded positions get segment id 0, which masks them as keys and empties them as queries.
    q_seg = jnp.pad(q_seg, ((0, 0), (0, t_pad - t)))
    kv_seg = jnp.pad(kv_seg, ((0, 0), (0, s_pad - s)))
    pad_q = ((0, 0), (0, t_pad - t), (0, 0), (0, 0))
    pad_k = ((0, 0), (0, s_pad - s), (0, 0), (0, 0))
    out = _flash(jnp.pad(q, pad_q), jnp.pad(k, pad_k), jnp.pad(v, pad_k), q_seg, kv_seg, cfg)
    return out[:, :t]
