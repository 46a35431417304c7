"""Pallas fused log-probs for GPUs (Triton lowering), also runnable in interpret mode on CPU.

Three kernels, each with a 1-D grid and an in-kernel `lax.fori_loop` over the other token or
vocabulary axis. GPU program instances run in parallel, so an output block revisited by several
grid steps (the TPU accumulator pattern) would race; here every program owns its output block.

- forward, grid (N/bn,): for each vocabulary block, logits [bn, bv] = sum over D blocks of
  h[bn, bd] @ W[bd, bv] (float32 accumulation), then an online logsumexp (m, denom), the label
  logit t, and for the entropy s = sum exp(z - m) * z. Writes lse, t and E_p[z] [N].
- d hidden, grid (N/bn,): recomputes each logits block, forms dz [bn, bv] and accumulates
  dz @ W[bd, bv]^T into its own float32 dh rows, D block by D block.
- d lm_head, grid (V/bv,): loops over token blocks, recomputes logits, forms dz and accumulates
  h[bn, bd]^T @ dz into its own float32 dW columns.

dz = p * (g_lse - g_logp - g_ent * (z - E_p[z])) + g_logp * onehot(label), with p = exp(z - lse).
Memory: only [N] statistics are saved; no [N, V] buffer exists. N and V that are not multiples of
the blocks are padded in the wrapper (rows with zero cotangent, columns masked to -1e30); padding
V copies lm_head once, so choose block_v dividing V (128,256 = 1002 * 128) to avoid it.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

F32 = jnp.float32
NEG = -1e30  # finite: no inf - inf NaNs in the online max, and 0 * NEG = 0 in the entropy sum


def _is_pow2(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes of the Pallas kernels.

    Attributes:
        block_n: tokens per tile (rows of hidden).
        block_v: vocabulary columns per tile.
        block_d: hidden features per matmul step; must divide D.
        num_warps: Triton warps per program.
        num_stages: Triton software-pipelining stages of the in-kernel loops.

    All must be powers of two >= 16 (Triton's `tl.dot` minimum and power-of-two tiles). The
    defaults keep an H100 tile of h[64, 64] + W[64, 128] in bf16 plus a [64, 128] float32 logits
    tile well inside shared memory and registers.
    """

    block_n: int = 64
    block_v: int = 128
    block_d: int = 64
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        for name in ("num_warps", "num_stages"):
            val = getattr(self, name)
            if not isinstance(val, int) or isinstance(val, bool) or val < 1:
                raise ValueError(f"BlockSizes.{name} must be a positive int, got {val!r}")
        if not _is_pow2(self.num_warps):
            raise ValueError(f"BlockSizes.num_warps must be a power of two, got {self.num_warps}")
        for name in ("block_n", "block_v", "block_d"):
            val = getattr(self, name)
            if not isinstance(val, int) or isinstance(val, bool):
                raise ValueError(f"BlockSizes.{name} must be an int, got {val!r}")
            if val < 16 or not _is_pow2(val):
                raise ValueError(f"BlockSizes.{name} must be a power of two >= 16, got {val}")

    def for_shape(self, d: int) -> BlockSizes:
        """The sizes to use for hidden size `d`: block_d shrinks to D if D is smaller."""
        bd = min(self.block_d, d)
        if d % bd != 0 or bd < 16:
            raise ValueError(
                f"hidden size D={d} must be a multiple of block_d={self.block_d} (or a power of "
                f"two >= 16 smaller than it); pass BlockSizes(block_d=...) dividing D"
            )
        return dataclasses.replace(self, block_d=bd)


def _iota_cols(bn: int, bv: int, j) -> jax.Array:
    return j * bv + lax.broadcasted_iota(jnp.int32, (bn, bv), 1)


def _logits(h_ref, w_ref, rows, cols, bn: int, bv: int, bd: int, nd: int) -> jax.Array:
    """[bn, bv] float32 logits of h[rows] @ W[:, cols], D block by D block."""

    def body(k, acc):
        hk = h_ref[rows, pl.ds(k * bd, bd)]
        wk = w_ref[pl.ds(k * bd, bd), cols]
        return acc + jnp.dot(hk, wk, preferred_element_type=F32)

    return lax.fori_loop(0, nd, body, jnp.zeros((bn, bv), F32))


def _dz(z, cols, v_valid, y, lse, mean_z, a, g, ge, with_entropy):
    p = jnp.exp(z - lse[:, None])
    coef = (
        p * (a[:, None] - ge[:, None] * (z - mean_z[:, None])) if with_entropy else p * a[:, None]
    )
    coef = coef + jnp.where(cols == y[:, None], g[:, None], 0.0)
    return jnp.where(cols < v_valid, coef, 0.0)


def _fwd_kernel(h_ref, w_ref, y_ref, lse_ref, t_ref, e_ref, *, bv, bd, nv, nd, v_valid, ent):
    bn = h_ref.shape[0]
    y = y_ref[...]
    rows = pl.ds(0, bn)

    def vbody(j, carry):
        m, denom, t, s = carry
        z = _logits(h_ref, w_ref, rows, pl.ds(j * bv, bv), bn, bv, bd, nd)
        cols = _iota_cols(bn, bv, j)
        z = jnp.where(cols < v_valid, z, NEG)
        m_new = jnp.maximum(m, jnp.max(z, axis=1))
        alpha = jnp.exp(m - m_new)
        e = jnp.exp(z - m_new[:, None])
        denom = denom * alpha + jnp.sum(e, axis=1)
        t = t + jnp.sum(jnp.where(cols == y[:, None], z, 0.0), axis=1)
        if ent:
            s = s * alpha + jnp.sum(e * z, axis=1)
        return m_new, denom, t, s

    zero = jnp.zeros((bn,), F32)
    m, denom, t, s = lax.fori_loop(0, nv, vbody, (jnp.full((bn,), NEG, F32), zero, zero, zero))
    lse_ref[...] = m + jnp.log(denom)
    t_ref[...] = t
    e_ref[...] = s / denom


def _dh_kernel(
    h_ref,
    w_ref,
    y_ref,
    lse_ref,
    e_ref,
    a_ref,
    g_ref,
    ge_ref,
    dh_ref,
    *,
    bv,
    bd,
    nv,
    nd,
    v_valid,
    ent,
):
    bn = h_ref.shape[0]
    rows = pl.ds(0, bn)
    y, lse, mean_z = y_ref[...], lse_ref[...], e_ref[...]
    a, g, ge = a_ref[...], g_ref[...], ge_ref[...]

    @pl.loop(0, nd)
    def _(k):
        dh_ref[:, pl.ds(k * bd, bd)] = jnp.zeros((bn, bd), F32)

    @pl.loop(0, nv)
    def _(j):
        cols = pl.ds(j * bv, bv)
        z = _logits(h_ref, w_ref, rows, cols, bn, bv, bd, nd)
        dz = _dz(z, _iota_cols(bn, bv, j), v_valid, y, lse, mean_z, a, g, ge, ent)
        dz = dz.astype(w_ref.dtype)

        @pl.loop(0, nd)
        def _(k):
            wk = w_ref[pl.ds(k * bd, bd), cols]
            dh_ref[:, pl.ds(k * bd, bd)] += jnp.dot(dz, wk.T, preferred_element_type=F32)


def _dw_kernel(
    h_ref,
    w_ref,
    y_ref,
    lse_ref,
    e_ref,
    a_ref,
    g_ref,
    ge_ref,
    dw_ref,
    *,
    bn,
    bd,
    nn,
    nd,
    v_valid,
    ent,
):
    bv = w_ref.shape[1]
    j = pl.program_id(0)
    cols = pl.ds(0, bv)
    col_ids = _iota_cols(bn, bv, j)

    @pl.loop(0, nd)
    def _(k):
        dw_ref[pl.ds(k * bd, bd), :] = jnp.zeros((bd, bv), F32)

    @pl.loop(0, nn)
    def _(i):
        rows = pl.ds(i * bn, bn)
        z = _logits(h_ref, w_ref, rows, cols, bn, bv, bd, nd)
        dz = _dz(
            z, col_ids, v_valid, y_ref[rows], lse_ref[rows], e_ref[rows], a_ref[rows],
            g_ref[rows], ge_ref[rows], ent,
        ).astype(h_ref.dtype)  # fmt: skip

        @pl.loop(0, nd)
        def _(k):
            hk = h_ref[rows, pl.ds(k * bd, bd)]
            dw_ref[pl.ds(k * bd, bd), :] += jnp.dot(hk.T, dz, preferred_element_type=F32)


def _triton(bs: BlockSizes) -> pltriton.CompilerParams:
    # Explicit Triton parameters select the Triton lowering: without them jax >= 0.10 lowers
    # GPU pallas_calls with Mosaic GPU, which stages whole blocks (all of W) in shared memory.
    return pltriton.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages)


def _pad_to(x: jax.Array, axis: int, multiple: int) -> jax.Array:
    extra = -x.shape[axis] % multiple
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)


def _forward(h, w, y, bs: BlockSizes, with_entropy: bool, interpret: bool):
    n, d = h.shape
    v = w.shape[1]
    bn, bv, bd = bs.block_n, bs.block_v, bs.block_d
    hp, yp, wp = _pad_to(h, 0, bn), _pad_to(y, 0, bn), _pad_to(w, 1, bv)
    npad, vpad = hp.shape[0], wp.shape[1]
    kernel = functools.partial(
        _fwd_kernel, bv=bv, bd=bd, nv=vpad // bv, nd=d // bd, v_valid=v, ent=with_entropy
    )
    vec = pl.BlockSpec((bn,), lambda i: (i,))
    lse, t, mean_z = pl.pallas_call(
        kernel,
        grid=(npad // bn,),
        in_specs=[
            pl.BlockSpec((bn, d), lambda i: (i, 0)),
            pl.BlockSpec((d, vpad), lambda i: (0, 0)),
            vec,
        ],
        out_specs=[vec, vec, vec],
        out_shape=[jax.ShapeDtypeStruct((npad,), F32)] * 3,
        interpret=interpret,
        compiler_params=_triton(bs),
        name="token_logprobs_fwd",
    )(hp, wp, yp)
    return lse[:n], t[:n], mean_z[:n]


def _backward(h, w, y, lse, mean_z, a, g, ge, bs: BlockSizes, with_entropy, interpret):
    n, d = h.shape
    v = w.shape[1]
    bn, bv, bd = bs.block_n, bs.block_v, bs.block_d
    # Padded rows get zero cotangents (a = g = ge = 0), so they add nothing to d lm_head.
    hp, wp = _pad_to(h, 0, bn), _pad_to(w, 1, bv)
    vecs = [_pad_to(x, 0, bn) for x in (y, lse, mean_z, a, g, ge)]
    npad, vpad = hp.shape[0], wp.shape[1]
    nn, nv, nd = npad // bn, vpad // bv, d // bd
    row_vec = pl.BlockSpec((bn,), lambda i: (i,))
    dh = pl.pallas_call(
        functools.partial(_dh_kernel, bv=bv, bd=bd, nv=nv, nd=nd, v_valid=v, ent=with_entropy),
        grid=(nn,),
        in_specs=[
            pl.BlockSpec((bn, d), lambda i: (i, 0)),
            pl.BlockSpec((d, vpad), lambda i: (0, 0)),
        ]
        + [row_vec] * 6,
        out_specs=pl.BlockSpec((bn, d), lambda i: (i, 0)),
        out_shape=jax.ShapeDtypeStruct((npad, d), F32),
        interpret=interpret,
        compiler_params=_triton(bs),
        name="token_logprobs_dh",
    )(hp, wp, *vecs)
    all_vec = pl.BlockSpec((npad,), lambda j: (0,))
    dw = pl.pallas_call(
        functools.partial(_dw_kernel, bn=bn, bd=bd, nn=nn, nd=nd, v_valid=v, ent=with_entropy),
        grid=(nv,),
        in_specs=[
            pl.BlockSpec((npad, d), lambda j: (0, 0)),
            pl.BlockSpec((d, bv), lambda j: (0, j)),
        ]
        + [all_vec] * 6,
        out_specs=pl.BlockSpec((d, bv), lambda j: (0, j)),
        out_shape=jax.ShapeDtypeStruct((d, vpad), F32),
        interpret=interpret,
        compiler_params=_triton(bs),
        name="token_logprobs_dw",
    )(hp, wp, *vecs)
    return dh[:n].astype(h.dtype), dw[:, :v].astype(w.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def logprob_stats_vjp(h, w, y, bs: BlockSizes, with_entropy: bool, interpret: bool):
    """(logp, lse, entropy-or-None), each [N] float32; differentiable in h and w."""
    out, _ = _vjp_fwd(h, w, y, bs, with_entropy, interpret)
    return out


def _vjp_fwd(h, w, y, bs, with_entropy, interpret):
    lse, t, mean_z = _forward(h, w, y, bs, with_entropy, interpret)
    out = (t - lse, lse, (lse - mean_z) if with_entropy else None)
    return out, (h, w, y, lse, mean_z)


def _vjp_bwd(bs, with_entropy, interpret, res, cts):
    h, w, y, lse, mean_z = res
    g_logp, g_lse, g_ent = cts
    g = g_logp.astype(F32)
    a = g_lse.astype(F32) - g
    ge = g_ent.astype(F32) if with_entropy else jnp.zeros_like(g)
    dh, dw = _backward(h, w, y, lse, mean_z, a, g, ge, bs, with_entropy, interpret)
    return dh, dw, None


logprob_stats_vjp.defvjp(_vjp_fwd, _vjp_bwd)


def logprob_stats(
    hidden: jax.Array,
    lm_head: jax.Array,
    labels: jax.Array,
    *,
    block_sizes: BlockSizes | None = None,
    with_entropy: bool = False,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """log p(label), logsumexp and optional entropy with the fused Pallas kernels.

    Args:
        hidden: [N, D] float.
        lm_head: [D, V] float, same dtype as hidden.
        labels: [N] int in [0, V).
        block_sizes: tile sizes (default `BlockSizes()`); block_d is clamped to D.
        with_entropy: also return the entropy (differentiable too).
        interpret: run the kernels in Pallas' interpreter (CPU tests).

    Returns:
        logp [N], lse [N], entropy [N] or None, all float32.
    """
    if hidden.dtype != lm_head.dtype:
        raise ValueError(f"hidden {hidden.dtype} and lm_head {lm_head.dtype} dtypes differ")
    bs = (block_sizes or BlockSizes()).for_shape(hidden.shape[1])
    return logprob_stats_vjp(hidden, lm_head, labels.astype(jnp.int32), bs, with_entropy, interpret)
