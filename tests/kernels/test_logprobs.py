"""Fused token log-probs: every implementation against the full-logits reference.

Small shapes that are not multiples of the blocks (N=100, V=300 against 32 / 64 tiles), Pallas
in interpret mode, and the GPU (Triton) kernels lowered for CUDA on this CPU.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from nemotron_jax import sharding
from nemotron_jax.kernels import token_logprobs, token_logprobs_sharded
from nemotron_jax.kernels.logprobs import BlockSizes
from nemotron_jax.kernels.logprobs.reference import token_logprobs_reference
from tests import tolerances as tol

N, D, V = 100, 64, 300
# Chunk 64 leaves a ragged last chunk (300 = 4 * 64 + 44); Pallas tiles pad N to 128, V to 320.
IMPLS = [
    ("chunked", 64),
    ("pallas_interpret", BlockSizes(block_n=32, block_v=64, block_d=32)),
]


def _inputs(dtype=jnp.float32, n=N, v=V):
    k = jax.random.split(jax.random.key(0), 3)
    h = jax.random.normal(k[0], (n, D), jnp.float32)
    w = jax.random.normal(k[1], (D, v), jnp.float32) * 0.3
    y = jax.random.randint(k[2], (n,), 0, v)
    # Vocabulary edges, and labels inside the clamped last chunk's re-read overlap (236..255).
    y = y.at[:6].set(jnp.array([0, v - 1, v - 44, 240, 255, 256]))
    return h.astype(dtype), w.astype(dtype), y


def _value_and_grads(impl, bs, h, w, y):
    def loss(h, w):
        lp, lse, ent = token_logprobs(
            h, w, y, implementation=impl, block_sizes=bs, return_lse=True, return_entropy=True
        )
        # Distinct, non-trivial cotangents for each output exercise every backward term.
        return jnp.sum(1.3 * lp) + jnp.sum(jnp.sin(lse)) + jnp.sum(0.7 * ent), (lp, lse, ent)

    (_, outs), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(h, w)
    return outs + grads


def _max_err(got, ref, relative):
    got, ref = np.asarray(got, np.float32), np.asarray(ref, np.float32)
    scale = max(1.0, float(np.max(np.abs(ref)))) if relative else 1.0
    return float(np.max(np.abs(got - ref))) / scale


NAMES = ("logp", "lse", "entropy", "d_hidden", "d_lm_head")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("impl,bs", IMPLS, ids=[i for i, _ in IMPLS])
def test_values_and_grads_match_reference(impl, bs, dtype):
    h, w, y = _inputs(dtype)
    ref = _value_and_grads("reference", None, h, w, y)
    got = _value_and_grads(impl, bs, h, w, y)
    bf16 = dtype == jnp.bfloat16
    limit = tol.LOGPROBS_BF16 if bf16 else tol.LOGPROBS_F32
    for name, g, r in zip(NAMES, got, ref, strict=True):
        assert g.dtype == r.dtype and g.shape == r.shape, name
        assert _max_err(g, r, bf16) < limit, (name, _max_err(g, r, bf16))


def test_token_logprobs_reference():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 11)).astype(np.float32) * 3
    targets = rng.integers(0, 11, (2, 5))
    want = np.take_along_axis(jax.nn.log_softmax(logits, -1), targets[..., None], -1)[..., 0]
    got = token_logprobs_reference(jnp.asarray(logits), targets)
    assert got.dtype == jnp.float32 and got.shape == (2, 5)
    np.testing.assert_allclose(got, want, atol=tol.LOSS_F32, rtol=0)
    # Stable for huge logits: log p = [-log(1 + e^-1e4), -1e4] = [0, -1e4], no overflow.
    huge = token_logprobs_reference(jnp.asarray([[[1e4, 0.0], [1e4, 0.0]]]), np.array([[0, 1]]))
    np.testing.assert_allclose(huge, [[0.0, -1e4]], atol=tol.LOSS_F32, rtol=0)
    # bf16 inputs come back as float32.
    assert token_logprobs_reference(jnp.asarray(logits, jnp.bfloat16), targets).dtype == (
        jnp.float32
    )


def test_reference_from_hidden_matches_the_logits_oracle():
    h, w, y = _inputs()
    want = token_logprobs_reference(h @ w, y)
    got = token_logprobs(h, w, y, implementation="reference")
    np.testing.assert_allclose(got, want, atol=tol.SIMPLE_F32)


@pytest.mark.parametrize("chunk", [1, 300, 1024])
def test_chunk_sizes_incl_degenerate(chunk):
    h, w, y = _inputs(n=8, v=37)
    ref = token_logprobs(h, w, y, implementation="reference")
    got = token_logprobs(h, w, y, implementation="chunked", block_sizes=chunk)
    np.testing.assert_allclose(got, ref, atol=tol.LOGPROBS_F32)


def test_leading_dims_and_single_output():
    h, w, y = _inputs()
    got = token_logprobs(h.reshape(4, 25, D), w, y.reshape(4, 25))
    assert got.shape == (4, 25) and got.dtype == jnp.float32
    ref = token_logprobs(h, w, y, implementation="reference")
    np.testing.assert_allclose(got.reshape(-1), ref, atol=tol.LOGPROBS_F32)


def test_validation_errors():
    h, w, y = _inputs()
    with pytest.raises(ValueError, match="power of two"):
        BlockSizes(block_n=48)
    with pytest.raises(ValueError, match=">= 16"):
        BlockSizes(block_v=8)
    with pytest.raises(ValueError, match="num_warps"):
        BlockSizes(num_warps=3)
    with pytest.raises(ValueError, match="multiple of block_d"):
        token_logprobs(h[:, :48], w[:48], y, implementation="pallas_interpret",
                       block_sizes=BlockSizes(block_d=32))  # fmt: skip
    with pytest.raises(ValueError, match="implementation must be one of"):
        token_logprobs(h, w, y, implementation="triton")
    with pytest.raises(ValueError, match="labels"):
        token_logprobs(h, w, y[:-1])
    with pytest.raises(ValueError, match="chunk must be positive"):
        token_logprobs(h, w, y, implementation="chunked", block_sizes=0)
    with pytest.raises(AttributeError):
        BlockSizes().block_n = 32  # frozen


def test_chunked_never_holds_full_logits():
    """Compiled temp memory: the reference holds [N, V] float32 logits, chunked does not."""
    n, v = 256, 16384
    h = jax.ShapeDtypeStruct((n, 32), jnp.float32)
    w = jax.ShapeDtypeStruct((32, v), jnp.float32)
    y = jax.ShapeDtypeStruct((n,), jnp.int32)

    def temp(impl, bs):
        f = jax.grad(
            lambda h, w, y: jnp.sum(token_logprobs(h, w, y, implementation=impl, block_sizes=bs)),
            argnums=(0, 1),
        )
        return jax.jit(f).lower(h, w, y).compile().memory_analysis().temp_size_in_bytes

    full = n * v * 4
    assert temp("reference", None) >= full
    assert temp("chunked", 1024) < full / 4


@pytest.mark.parametrize("vocab_axis", ["tensor", None])
@pytest.mark.parametrize("impl,bs", IMPLS, ids=[i for i, _ in IMPLS])
def test_sharded_matches_reference(impl, bs, vocab_axis):
    mesh = sharding.make_mesh((2, 2, 2))
    h, w, y = _inputs(n=96, v=320)  # 96 tokens over 4 batch shards; 160 columns per shard
    y = y.at[6:10].set(jnp.array([159, 160, 161, 319]))  # either side of the shard boundary
    h = jax.device_put(h, NamedSharding(mesh, P(("data", "fsdp"), None)))
    w = jax.device_put(w, NamedSharding(mesh, P(None, "tensor")))

    def loss(fn):
        def f(h, w):
            lp, lse, ent = fn(h, w, y, return_lse=True, return_entropy=True)
            return jnp.sum(1.3 * lp) + jnp.sum(jnp.sin(lse)) + jnp.sum(0.7 * ent), (lp, lse, ent)

        return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))

    def sharded(h, w, y, **kw):
        return token_logprobs_sharded(
            h, w, y, mesh=mesh, vocab_axis=vocab_axis, implementation=impl, block_sizes=bs, **kw
        )

    def plain(h, w, y, **kw):
        return token_logprobs(h, w, y, implementation="reference", **kw)

    (_, got), got_g = loss(sharded)(h, w)
    (_, ref), ref_g = loss(plain)(h, w)
    assert got[0].sharding.spec == P(("data", "fsdp"))
    for name, g, r in zip(NAMES, list(got) + list(got_g), list(ref) + list(ref_g), strict=True):
        assert _max_err(g, r, False) < tol.LOGPROBS_F32, (name, _max_err(g, r, False))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_pallas_lowers_for_cuda(dtype):
    """The Triton kernels (forward, d hidden, d lm_head) lower for CUDA without a GPU."""
    structs = (
        jax.ShapeDtypeStruct((200, 256), dtype),
        jax.ShapeDtypeStruct((256, 1000), dtype),
        jax.ShapeDtypeStruct((200,), jnp.int32),
    )

    def fwd(h, w, y):
        return token_logprobs(
            h, w, y, implementation="pallas", return_lse=True, return_entropy=True
        )

    def fwd_bwd(h, w, y):
        return jax.grad(lambda h, w: sum(jnp.sum(o) for o in fwd(h, w, y)), argnums=(0, 1))(h, w)

    for fn, n_kernels in ((fwd, 1), (fwd_bwd, 3)):
        try:
            text = jax.jit(fn).trace(*structs).lower(lowering_platforms=("cuda",)).as_text()
        except Exception as e:  # pragma: no cover - depends on the installed jax
            pytest.skip(f"cannot lower for cuda on jax {jax.__version__}: {type(e).__name__}: {e}")
        assert text.count("triton") >= n_kernels, fn.__name__
