"""nemotron_jax.kernels.attention: every CPU implementation against a frozen naive reference.

Values and gradients (dq, dk, dv) in float32 and bfloat16, shapes that are not block multiples,
GQA groups 1/4/8, padding and packing via segment_ids, fully masked rows, shard_map on the 8 fake
devices, lowering of the GPU (Triton) kernels for "cuda" on this CPU, and equality of "xla" with
the model's position-based mask. Shapes are tiny: the Pallas interpreter is slow. The fused CPU
kernel ("cpu") also gets head dims that need padding, several key blocks and random masks with
and without causality.

Errors are max abs differences divided by max(1, max |reference|) (`_err`); limits live in
tests/tolerances.py (ATTENTION_*).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nemotron_jax.kernels.attention import (
    BlockSizes,
    attention,
    attention_sharded,
    pallas_attention,
    prepare,
    resolve_implementation,
)
from nemotron_jax.kernels.attention import position_mask as make_attention_mask
from nemotron_jax.kernels.attention.xla import block_causal_attention
from nemotron_jax.models.llama import positions_from_mask
from nemotron_jax.sharding import make_mesh
from tests import tolerances

CPU_IMPLEMENTATIONS = ("xla", "pallas_interpret", "cpu")
SMALL = BlockSizes(16, 16, 16, 16, 16, 16)
UNEVEN = BlockSizes(block_q=32, block_k=16, block_q_dq=16, block_k_dq=32, block_q_dkv=32,
                    block_k_dkv=16)  # fmt: skip


# FROZEN naive reference: repeats K/V per query head, float32 throughout, -inf masking with
# fully masked rows set to 0. Do not "optimise" it; it is the oracle for every implementation.
def _naive(q, k, v, allowed, scale):
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    g = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)  # [B, S, N, H]
    s = jnp.einsum("btnh,bsnh->bnts", q, k) * scale
    s = jnp.where(allowed[:, None], s, -jnp.inf)
    m = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom == 0.0, 1.0, denom)
    return jnp.einsum("bnts,bsnh->btnh", p, v)


def _allowed(b, t, s, segment_ids, causal):
    allowed = np.ones((b, t, s), bool)
    if segment_ids is not None:
        seg = np.asarray(segment_ids)
        allowed &= (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] != 0)
    if causal:
        allowed &= np.tril(np.ones((t, s), bool))[None]
    return jnp.asarray(allowed)


def _err(got, want):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert np.all(np.isfinite(got)), "non-finite values"
    return float(np.abs(got - want).max() / max(1.0, np.abs(want).max()))


def _inputs(b, t, s, n, k, h, dtype, seed=0):
    rngs = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(rngs[0], (b, t, n, h), jnp.float32).astype(dtype)
    kk = jax.random.normal(rngs[1], (b, s, k, h), jnp.float32).astype(dtype)
    v = jax.random.normal(rngs[2], (b, s, k, h), jnp.float32).astype(dtype)
    cot = jax.random.normal(rngs[3], (b, t, n, h), jnp.float32)
    return q, kk, v, cot


def _out_and_grads(fn, q, k, v, cot):
    """(out, (dq, dk, dv)) of fn at (q, k, v) for the float32 cotangent `cot`, one jit."""

    @jax.jit
    def run(q, k, v, cot):
        out, vjp = jax.vjp(fn, q, k, v)
        return out, vjp(cot.astype(out.dtype))

    return run(q, k, v, cot)


def _segments(b, t):
    """Row 0 packs two sequences and right-pads; row 1 left-pads; further rows are unpadded."""
    seg = np.ones((b, t), np.int32)
    seg[0, : t // 3] = 1
    seg[0, t // 3 : 2 * t // 3] = 2
    seg[0, 2 * t // 3 :] = 0
    if b > 1:
        seg[1, : t // 5] = 0
    return jnp.asarray(seg)


# name: (B, T, S, N, K, H, causal, segments, block sizes). T and S are not block multiples.
CASES = {
    "g1_causal_uneven_blocks": (2, 40, 40, 2, 2, 16, True, False, UNEVEN),
    "g4_causal_segments": (2, 37, 37, 8, 2, 16, True, True, SMALL),
    "g8_noncausal_cross_lengths": (1, 24, 50, 8, 1, 16, False, False, SMALL),
}
TOL = {
    jnp.float32: (tolerances.ATTENTION_F32, tolerances.ATTENTION_GRAD_F32),
    jnp.bfloat16: (tolerances.ATTENTION_BF16, tolerances.ATTENTION_GRAD_BF16),
}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("implementation", CPU_IMPLEMENTATIONS)
def test_values_and_grads_match_naive(implementation, case, dtype):
    b, t, s, n, k, h, causal, use_seg, blocks = CASES[case]
    q, kk, v, cot = _inputs(b, t, s, n, k, h, dtype)
    seg = _segments(b, t) if use_seg else None
    fn = functools.partial(
        attention,
        segment_ids=seg,
        causal=causal,
        implementation=implementation,
        block_sizes=blocks,
    )
    out, grads = _out_and_grads(fn, q, kk, v, cot)
    allowed = _allowed(b, t, s, seg, causal)
    want_fn = functools.partial(_naive, allowed=allowed, scale=h**-0.5)
    want, want_grads = _out_and_grads(want_fn, q, kk, v, cot)
    assert out.dtype == dtype and out.shape == (b, t, n, h)
    tol, grad_tol = TOL[dtype]
    errs = [_err(out, want)] + [_err(g, w) for g, w in zip(grads, want_grads, strict=True)]
    print(f"{implementation} {case} {jnp.dtype(dtype).name}: out/dq/dk/dv err {errs}")
    assert errs[0] <= tol, errs
    assert max(errs[1:]) <= grad_tol, errs
    if use_seg:  # padded query rows see no key: exactly 0, with zero dq
        pad = np.asarray(seg) == 0
        assert np.all(np.asarray(out, np.float32)[pad] == 0.0)
        assert np.all(np.asarray(grads[0], np.float32)[pad] == 0.0)


@pytest.mark.parametrize("implementation", CPU_IMPLEMENTATIONS)
def test_fully_masked_rows_are_zero_not_nan(implementation):
    b, t, n, k, h = 2, 20, 4, 2, 16
    q, kk, v, cot = _inputs(b, t, t, n, k, h, jnp.float32, seed=1)
    seg = np.ones((b, t), np.int32)
    seg[1] = 0  # a whole example of padding: every row (and every kv block) is masked
    seg[0, -3:] = 0
    seg = jnp.asarray(seg)
    fn = functools.partial(
        attention, segment_ids=seg, implementation=implementation, block_sizes=SMALL
    )
    out, grads = _out_and_grads(fn, q, kk, v, cot)
    for x in (out, *grads):
        assert np.all(np.isfinite(np.asarray(x)))
    assert np.all(np.asarray(out)[np.asarray(seg) == 0] == 0.0)
    assert np.all(np.asarray(grads[1])[1] == 0.0) and np.all(np.asarray(grads[2])[1] == 0.0)


def test_xla_explicit_mask_with_empty_rows():
    b, t, s, n, k, h = 1, 6, 9, 4, 2, 16
    q, kk, v, cot = _inputs(b, t, s, n, k, h, jnp.float32, seed=2)
    mask = np.random.default_rng(0).random((b, t, s)) < 0.5
    mask[0, 2] = False
    mask = jnp.asarray(mask)
    fn = functools.partial(attention, mask=mask, causal=False)
    out, grads = _out_and_grads(fn, q, kk, v, cot)
    want, want_grads = _out_and_grads(
        functools.partial(_naive, allowed=mask, scale=h**-0.5), q, kk, v, cot
    )
    assert np.all(np.asarray(out)[0, 2] == 0.0)
    assert _err(out, want) <= tolerances.ATTENTION_F32
    for g, w in zip(grads, want_grads, strict=True):
        assert _err(g, w) <= tolerances.ATTENTION_GRAD_F32


def test_pallas_reference_backward_matches_kernel_backward():
    b, t, n, k, h = 1, 33, 4, 1, 16
    q, kk, v, cot = _inputs(b, t, t, n, k, h, jnp.float32, seed=3)
    seg = _segments(b, t)
    results = [
        _out_and_grads(
            functools.partial(
                pallas_attention,
                segment_ids=seg,
                block_sizes=SMALL,
                interpret=True,
                backward_impl=impl,
            ),
            q,
            kk,
            v,
            cot,
        )[1]
        for impl in ("pallas", "xla")
    ]
    for g_kernel, g_ref in zip(*results, strict=True):
        assert _err(g_kernel, g_ref) <= tolerances.ATTENTION_GRAD_F32


def test_model_mask_and_segment_ids_agree():
    b, t, n, k, h = 2, 12, 8, 2, 16
    q, kk, v, _ = _inputs(b, t, t, n, k, h, jnp.float32, seed=4)
    valid = np.ones((b, t), bool)
    valid[0, 9:] = False  # right padding
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    mask = make_attention_mask(positions, positions, jnp.asarray(valid))
    want = _naive(q, kk, v, mask, 1.0 / np.sqrt(h))
    # The model's own mask (causal by position), passed explicitly as the model's xla path does.
    got = attention(q, kk, v, mask=mask, causal=False)
    assert _err(got, want) <= tolerances.ATTENTION_F32
    # Segment ids (0 = padding) build the same mask on real rows; padded rows are 0 here.
    got = attention(q, kk, v, segment_ids=jnp.asarray(valid, jnp.int32))
    assert _err(np.asarray(got)[valid], np.asarray(want)[valid]) <= tolerances.ATTENTION_F32
    assert np.all(np.asarray(got)[~valid] == 0.0)


@pytest.mark.parametrize("implementation", CPU_IMPLEMENTATIONS)
def test_shard_map_on_eight_devices(implementation):
    mesh = make_mesh((2, 2, 2))
    b, t, n, k, h = 4, 24, 4, 2, 16
    q, kk, v, cot = _inputs(b, t, t, n, k, h, jnp.float32, seed=5)
    seg = _segments(b, t)
    fn = functools.partial(
        attention_sharded,
        mesh=mesh,
        segment_ids=seg,
        implementation=implementation,
        block_sizes=SMALL,
    )
    out, grads = _out_and_grads(fn, q, kk, v, cot)
    spec = out.sharding.spec
    assert tuple(spec)[:3] == (("data", "fsdp"), None, "tensor"), spec  # per shard, not replicated
    want, want_grads = _out_and_grads(
        functools.partial(_naive, allowed=_allowed(b, t, t, seg, True), scale=h**-0.5),
        q,
        kk,
        v,
        cot,
    )
    assert _err(out, want) <= tolerances.ATTENTION_F32
    for g, w in zip(grads, want_grads, strict=True):
        assert _err(g, w) <= tolerances.ATTENTION_GRAD_F32


# name: (B, T, S, N, K, H, causal). H = 40 and 24 are padded to multiples of 16 by the wrapper;
# S = 130 spans three 64-key blocks; G = 3 leaves a partial block of 4 heads; T is not a
# multiple of the 16-position task size.
CPU_CASES = {
    "g3_h40_causal": (2, 37, 37, 6, 2, 40, True),
    "g8_h128_cross": (2, 70, 130, 8, 1, 128, False),
    "g1_h24_causal_long": (1, 130, 130, 2, 2, 24, True),
    "g2_h64_causal_short_queries": (3, 5, 67, 4, 2, 64, True),
}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", list(CPU_CASES))
def test_cpu_kernel_random_masks(case, dtype):
    """The fused CPU kernel with an arbitrary [B, T, S] mask (rows with no key included), on
    top of index causality or without it; values and gradients against the naive oracle."""
    b, t, s, n, k, h, causal = CPU_CASES[case]
    q, kk, v, cot = _inputs(b, t, s, n, k, h, dtype, seed=7)
    mask = np.random.default_rng(8).random((b, t, s)) < 0.7
    mask[0, 0] = False  # a query that sees nothing
    mask[-1, :, 0] = False  # a key nobody sees
    mask = jnp.asarray(mask)
    fn = functools.partial(attention, mask=mask, causal=causal, implementation="cpu")
    out, grads = _out_and_grads(fn, q, kk, v, cot)
    allowed = mask & _allowed(b, t, s, None, causal)
    want_fn = functools.partial(_naive, allowed=allowed, scale=h**-0.5)
    want, want_grads = _out_and_grads(want_fn, q, kk, v, cot)
    assert out.dtype == dtype
    tol, grad_tol = TOL[dtype]
    errs = [_err(out, want)] + [_err(g, w) for g, w in zip(grads, want_grads, strict=True)]
    print(f"cpu {case} {jnp.dtype(dtype).name}: out/dq/dk/dv err {errs}")
    assert errs[0] <= tol, errs
    assert max(errs[1:]) <= grad_tol, errs
    assert np.all(np.asarray(out, np.float32)[0, 0] == 0.0)
    # Without a mask the same call is plain (causal or full) attention.
    out = jax.jit(functools.partial(attention, causal=causal, implementation="cpu"))(q, kk, v)
    want = _naive(q, kk, v, _allowed(b, t, s, None, causal), h**-0.5)
    assert _err(out, want) <= tol


# FROZEN naive rotary embedding: features f and f + R/2 of the first R rotate as a pair by the
# angle whose cos and sin the tables hold at f (HF's rotate-half layout), float32 throughout.
def _naive_rope(x, cos, sin):
    x = x.astype(jnp.float32)
    r = cos.shape[-1]
    lo, hi, rest = x[..., : r // 2], x[..., r // 2 : r], x[..., r:]
    c, s = cos[:, :, None], sin[:, :, None]
    lo_c, hi_c, lo_s, hi_s = c[..., : r // 2], c[..., r // 2 :], s[..., : r // 2], s[..., r // 2 :]
    return jnp.concatenate([lo * lo_c - hi * lo_s, hi * hi_c + lo * hi_s, rest], axis=-1)


def _rope_tables(b, t, r, seed):
    """cos, sin [B, T, R] for positions that restart per row (as left padding gives)."""
    positions = np.arange(t)[None] - np.random.default_rng(seed).integers(0, 5, (b, 1))
    inv_freq = 1.0 / (10000.0 ** (np.arange(0, r, 2) / r))
    angles = np.maximum(positions, 0)[..., None] * inv_freq
    angles = np.concatenate([angles, angles], axis=-1).astype(np.float32)
    return jnp.asarray(np.cos(angles)), jnp.asarray(np.sin(angles))


# name: (B, T, N, K, H, R, causal): R = H as in Llama (H = 40 is padded to 48 by the "cpu"
# wrapper, the padding not rotated), and R < H (only the first R features rotate).
ROPE_CASES = {
    "g3_h40_causal": (2, 37, 6, 2, 40, 40, True),
    "g4_h32_full": (2, 20, 8, 2, 32, 32, False),
    "g1_h64_partial": (1, 70, 2, 2, 64, 16, True),
}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", list(ROPE_CASES))
@pytest.mark.parametrize("implementation", ["xla", "cpu"])
def test_rope_matches_rotating_first(implementation, case, dtype):
    """`rope=(cos, sin)`: the "cpu" kernel rotates q and k as it loads them, the others rotate
    first (`reference.apply_rope`); values and dq, dk, dv against the naive rotation followed by
    the naive attention, with a random mask."""
    b, t, n, k, h, r, causal = ROPE_CASES[case]
    q, kk, v, cot = _inputs(b, t, t, n, k, h, dtype, seed=11)
    cos, sin = _rope_tables(b, t, r, seed=12)
    mask = jnp.asarray(np.random.default_rng(13).random((b, t, t)) < 0.8)
    fn = functools.partial(attention, mask=mask, causal=causal, implementation=implementation,
                           rope=(cos, sin))  # fmt: skip
    out, grads = _out_and_grads(fn, q, kk, v, cot)
    allowed = mask & _allowed(b, t, t, None, causal)

    def want_fn(q, k, v):
        return _naive(_naive_rope(q, cos, sin), _naive_rope(k, cos, sin), v, allowed, h**-0.5)

    want, want_grads = _out_and_grads(want_fn, q, kk, v, cot)
    tol, grad_tol = TOL[dtype]
    errs = [_err(out, want)] + [_err(g, w) for g, w in zip(grads, want_grads, strict=True)]
    print(f"{implementation} rope {case} {jnp.dtype(dtype).name}: out/dq/dk/dv err {errs}")
    assert out.dtype == dtype and out.shape == (b, t, n, h)
    assert errs[0] <= tol, errs
    assert max(errs[1:]) <= grad_tol, errs


@pytest.mark.parametrize("implementation", ["xla", "cpu"])
def test_rope_sharded_on_eight_devices(implementation):
    mesh = make_mesh((2, 2, 2))
    b, t, n, k, h = 4, 24, 4, 2, 32
    q, kk, v, cot = _inputs(b, t, t, n, k, h, jnp.float32, seed=14)
    cos, sin = _rope_tables(b, t, h, seed=15)
    fn = functools.partial(attention_sharded, mesh=mesh, implementation=implementation,
                           rope=(cos, sin))  # fmt: skip
    out, grads = _out_and_grads(fn, q, kk, v, cot)
    allowed = _allowed(b, t, t, None, True)
    want, want_grads = _out_and_grads(
        lambda q, k, v: _naive(_naive_rope(q, cos, sin), _naive_rope(k, cos, sin), v, allowed,
                               h**-0.5),
        q, kk, v, cot,
    )  # fmt: skip
    assert _err(out, want) <= tolerances.ATTENTION_F32
    for g, w in zip(grads, want_grads, strict=True):
        assert _err(g, w) <= tolerances.ATTENTION_GRAD_F32


def test_rope_errors():
    q, kv = jnp.zeros((1, 8, 4, 16)), jnp.zeros((1, 8, 2, 16))
    cos = jnp.zeros((1, 8, 16))
    with pytest.raises(ValueError, match="rope must be a pair"):
        attention(q, kv, kv, implementation="cpu", rope=cos)
    with pytest.raises(ValueError, match=r"R even and <= H = 16"):
        attention(q, kv, kv, implementation="cpu", rope=(cos[..., :5], cos[..., :5]))
    with pytest.raises(ValueError, match=r"self-attention \(S == T = 8, got S = 9\)"):
        longer = jnp.zeros((1, 9, 2, 16))
        attention(q, longer, longer, implementation="xla", mask=jnp.ones((1, 8, 9), bool),
                  rope=(cos, cos))  # fmt: skip


def test_cpu_kernel_errors():
    q, kv = jnp.zeros((1, 8, 4, 16), jnp.float16), jnp.zeros((1, 8, 2, 16), jnp.float16)
    with pytest.raises(ValueError, match="'cpu' takes q, k and v all float32 or all bfloat16"):
        attention(q, kv, kv, implementation="cpu")
    with pytest.raises(ValueError, match="all float32 or all bfloat16, got .'bfloat16', 'float32'"):
        bf16 = kv.astype(jnp.bfloat16)
        attention(q.astype(jnp.float32), bf16, bf16, implementation="cpu")
    with pytest.raises(ValueError, match="multiple of kv heads"):
        f32 = jnp.zeros((1, 8, 3, 16))
        attention(jnp.zeros((1, 8, 4, 16)), f32, f32, implementation="cpu")


def test_pallas_lowers_for_cuda():
    """Traces the Triton kernels (fwd, dq, dk/dv) and lowers them for "cuda" on this CPU.

    This catches Pallas->Triton lowering errors (unsupported ops, block shapes); compiling the
    Triton IR and running it needs a GPU.
    """
    b, t, n, k, h = 1, 100, 8, 2, 64  # T not a block multiple; G = 4
    q = jax.ShapeDtypeStruct((b, t, n, h), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((b, t, k, h), jnp.bfloat16)
    seg = jax.ShapeDtypeStruct((b, t), jnp.int32)

    def loss(q, k, v, seg):
        out = attention(q, k, v, segment_ids=seg, implementation="pallas")
        return out.astype(jnp.float32).sum()

    grad_fn = jax.grad(loss, argnums=(0, 1, 2))
    text = jax.jit(grad_fn).trace(q, kv, kv, seg).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 3  # fwd, dq, dk/dv


@pytest.mark.gpu
@pytest.mark.parametrize("implementation", ["pallas", "cudnn"])
def test_compiled_gpu_implementations_match_naive(implementation):
    """The compiled Triton kernels and cuDNN, bf16, values and gradients (GPU only)."""
    if jax.default_backend() != "gpu":
        pytest.skip("needs a GPU backend")
    b, t, n, k, h = 2, 100, 8, 2, 64
    q, kk, v, cot = _inputs(b, t, t, n, k, h, jnp.bfloat16, seed=6)
    seg = _segments(b, t)
    fn = functools.partial(attention, segment_ids=seg, implementation=implementation)
    out, grads = _out_and_grads(fn, q, kk, v, cot)
    want_fn = functools.partial(_naive, allowed=_allowed(b, t, t, seg, True), scale=h**-0.5)
    want, want_grads = _out_and_grads(want_fn, q, kk, v, cot)
    assert _err(out, want) <= tolerances.ATTENTION_BF16
    for g, w in zip(grads, want_grads, strict=True):
        assert _err(g, w) <= tolerances.ATTENTION_GRAD_BF16


def test_validation_errors():
    with pytest.raises(ValueError, match="power of two"):
        BlockSizes(block_q=48)
    with pytest.raises(ValueError, match=">= 16"):
        BlockSizes(block_k=8)
    with pytest.raises(ValueError, match="num_warps"):
        BlockSizes(num_warps=3)
    q = jnp.zeros((1, 8, 4, 16))
    kv = jnp.zeros((1, 8, 2, 16))
    with pytest.raises(ValueError, match="implementation"):
        attention(q, kv, kv, implementation="flash")
    with pytest.raises(ValueError, match="multiple of kv heads"):
        attention(q, jnp.zeros((1, 8, 3, 16)), jnp.zeros((1, 8, 3, 16)))
    with pytest.raises(ValueError, match="explicit mask"):
        attention(q, kv, kv, mask=jnp.ones((1, 8, 8), bool), implementation="pallas_interpret")
    with pytest.raises(ValueError, match="at most one"):
        attention(q, kv, kv, mask=jnp.ones((1, 8, 8), bool), segment_ids=jnp.ones((1, 8)))
    with pytest.raises(ValueError, match="head_dim"):
        attention(jnp.zeros((1, 8, 4, 24)), jnp.zeros((1, 8, 2, 24)), jnp.zeros((1, 8, 2, 24)),
                  implementation="pallas")  # fmt: skip
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="needs a GPU"):
            attention(q, kv, kv, implementation="cudnn")


def test_auto_resolution_on_the_cpu():
    """ "auto" on the CPU backend: the fused kernel for float32 and bfloat16 on one device, XLA
    for float16 (the kernel's dtypes), under a multi-device mesh (where XLA partitions any
    batch) and for a KV cache's explicit mask; an explicit choice is kept."""
    from nemotron_jax.kernels.cpu import attention as cpu_attention

    prepare("auto", jnp.float32)
    fused = "cpu" if cpu_attention.available() else "xla"
    assert resolve_implementation("auto", jnp.float32) == fused
    assert resolve_implementation("auto", jnp.bfloat16) == fused
    assert resolve_implementation("auto", jnp.float16) == "xla"
    assert resolve_implementation("auto", jnp.float32, explicit_mask=True) == "xla"
    assert resolve_implementation("pallas", jnp.float32, explicit_mask=True) == "xla"
    assert resolve_implementation("xla", jnp.float32) == "xla"
    assert resolve_implementation("pallas_interpret", jnp.float32) == "pallas_interpret"
    assert resolve_implementation("auto", jnp.float32, mesh=make_mesh((2, 2, 2))) == "xla"
    with pytest.raises(ValueError, match="implementation must be one of"):
        resolve_implementation("flash", jnp.float32)
    with pytest.raises(ValueError, match="'cpu' takes float32 or bfloat16, not float16"):
        prepare("cpu", jnp.float16)


@pytest.mark.parametrize("implementation", ["xla", "cpu"])
def test_positions_give_the_position_mask(implementation):
    """`positions` with `segment_ids`: causal by position on left-padded rows, equal to the
    explicit position mask; with `causal=True` as well, equal on the real rows."""
    b, t, n, k, h = 2, 11, 4, 2, 16
    q, kk, v, _ = _inputs(b, t, t, n, k, h, jnp.float32, seed=9)
    valid = np.ones((b, t), bool)
    valid[1, :4] = False  # left padding
    positions = positions_from_mask(jnp.asarray(valid))
    seg = jnp.asarray(valid, jnp.int32)
    want = _naive(q, kk, v, make_attention_mask(positions, positions, seg != 0), h**-0.5)
    got = attention(q, kk, v, segment_ids=seg, positions=positions, causal=False,
                    implementation=implementation)  # fmt: skip
    assert _err(got, want) <= tolerances.ATTENTION_F32
    got = attention(q, kk, v, segment_ids=seg, positions=positions, causal=True,
                    implementation=implementation)  # fmt: skip
    assert _err(np.asarray(got)[valid], np.asarray(want)[valid]) <= tolerances.ATTENTION_F32
    with pytest.raises(ValueError, match="positions need segment_ids"):
        attention(q, kk, v, positions=positions)


@pytest.mark.parametrize("t", [13, 16])
def test_block_causal_attention_matches_plain(t):
    """Query blocks that skip the keys above the diagonal give the plain masked attention, values
    and gradients, on a right- and a left-padded row (left padding: real rows only)."""
    b, n, kv, h = 2, 4, 2, 8
    rng = np.random.default_rng(4)
    q, k, v = (jnp.asarray(rng.normal(size=(b, t, m, h)), jnp.float32) for m in (n, kv, kv))
    valid = np.ones((b, t), bool)
    valid[0, t - 4 :] = False  # right padding
    valid[1, :3] = False  # left padding
    positions = positions_from_mask(jnp.asarray(valid))
    mask = make_attention_mask(positions, positions, jnp.asarray(valid))
    weight = jnp.asarray(valid, jnp.float32)[:, :, None, None]

    def loss(fn, q, k, v):
        out = fn(q, k, v)
        return jnp.sum(weight * out * jnp.sin(out)), out

    plain = functools.partial(attention, mask=mask, causal=False)
    blocked = functools.partial(block_causal_attention, mask=mask)
    (_, want), g_want = jax.value_and_grad(loss, argnums=(1, 2, 3), has_aux=True)(plain, q, k, v)
    (_, got), g_got = jax.value_and_grad(loss, argnums=(1, 2, 3), has_aux=True)(blocked, q, k, v)
    np.testing.assert_allclose(got[valid], want[valid], atol=tolerances.ATTENTION_F32)
    np.testing.assert_allclose(got[0], want[0], atol=tolerances.ATTENTION_F32)  # right-padded
    for a, e in zip(g_got, g_want, strict=True):
        np.testing.assert_allclose(a, e, atol=tolerances.ATTENTION_GRAD_F32)
