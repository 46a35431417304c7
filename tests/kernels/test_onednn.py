"""oneDNN CPU matmuls (`matmul_impl="onednn"`) against XLA's dot, alone and inside the model."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nemotron_jax.errors import ConfigError
from nemotron_jax.kernels import onednn
from nemotron_jax.losses.reward import scaled_bt
from nemotron_jax.models import Llama, LlamaConfig, init_params
from nemotron_jax.models.reward import HELPFULNESS_SLOT, RewardModel
from tests import tolerances

pytestmark = pytest.mark.skipif(
    not onednn.available(),
    reason="oneDNN matmul unavailable here (needs the onednn extra, g++ and the CPU backend)",
)


def _rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    return float(np.abs(got - want).max() / max(1.0, np.abs(want).max()))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("out_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("transpose_a,transpose_b", [(0, 0), (1, 0), (0, 1), (1, 1)])
def test_matches_xla_dot(dtype, out_dtype, transpose_a, transpose_b):
    rng = np.random.default_rng(0)
    m, k, n = 130, 72, 50
    a = jnp.asarray(rng.normal(size=(k, m) if transpose_a else (m, k)), dtype)
    b = jnp.asarray(rng.normal(size=(n, k) if transpose_b else (k, n)), dtype)
    fn = functools.partial(
        onednn.matmul, out_dtype=out_dtype, transpose_a=bool(transpose_a),
        transpose_b=bool(transpose_b),
    )  # fmt: skip
    got = jax.jit(fn)(a, b)
    want = jnp.dot(
        a.T if transpose_a else a, b.T if transpose_b else b, preferred_element_type=jnp.float32
    ).astype(out_dtype)
    assert got.shape == (m, n) and got.dtype == jnp.dtype(out_dtype)
    tol = tolerances.MATMUL_F32 if out_dtype == "float32" else tolerances.MATMUL_BF16
    assert _rel_err(got, want) <= tol


@pytest.mark.parametrize("transpose_a,transpose_b", [(0, 0), (1, 0), (0, 1), (1, 1)])
def test_batched_matches_einsum(transpose_a, transpose_b):
    rng = np.random.default_rng(1)
    z, m, k, n = 3, 40, 24, 18
    a = jnp.asarray(rng.normal(size=(z, k, m) if transpose_a else (z, m, k)), jnp.bfloat16)
    b = jnp.asarray(rng.normal(size=(z, n, k) if transpose_b else (z, k, n)), jnp.bfloat16)
    fn = functools.partial(
        onednn.matmul, transpose_a=bool(transpose_a), transpose_b=bool(transpose_b)
    )
    got = jax.jit(fn)(a, b)
    a_, b_ = (
        (jnp.swapaxes(a, 1, 2) if transpose_a else a),
        (jnp.swapaxes(b, 1, 2) if transpose_b else b),
    )
    want = jnp.einsum("zmk,zkn->zmn", a_, b_, preferred_element_type=jnp.float32)
    assert got.shape == (z, m, n) and _rel_err(got, want) <= tolerances.MATMUL_F32
    with pytest.raises(ValueError, match="same batch size"):
        onednn.matmul(a, b[:2])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("transpose_b", [False, True])
def test_silu_times_matches_xla(dtype, transpose_b):
    """`silu_times`: SwiGLU's silu(a @ b) * m as oneDNN post-ops, against XLA (float32 silu of
    the float32 product, times m, rounded once)."""
    rng = np.random.default_rng(3)
    m, k, n = 130, 72, 50
    a = jnp.asarray(rng.normal(size=(m, k)) / 4, dtype)
    b = jnp.asarray(rng.normal(size=(n, k) if transpose_b else (k, n)), dtype)
    mul = jnp.asarray(rng.normal(size=(m, n)), dtype)
    fn = functools.partial(onednn.matmul, out_dtype=dtype, transpose_b=transpose_b)
    got = jax.jit(lambda a, b, mul: fn(a, b, silu_times=mul))(a, b, mul)
    gate = jnp.dot(a, b.T if transpose_b else b, preferred_element_type=jnp.float32)
    want = (jax.nn.silu(gate) * mul.astype(jnp.float32)).astype(dtype)
    assert got.shape == (m, n) and got.dtype == jnp.dtype(dtype)
    tol = tolerances.MATMUL_F32 if dtype == "float32" else tolerances.MATMUL_BF16
    assert _rel_err(got, want) <= tol
    assert np.array_equal(fn(a[:, :0], b[:, :0] if transpose_b else b[:0], silu_times=mul), 0 * mul)
    with pytest.raises(ValueError, match=r"silu_times must be float32 or bfloat16 of the result's"):
        fn(a, b, silu_times=mul[:, :3])


def test_empty_contraction_and_rows():
    a, b = jnp.ones((3, 0), jnp.float32), jnp.ones((0, 4), jnp.float32)
    assert np.array_equal(jax.jit(onednn.matmul)(a, b), np.zeros((3, 4)))
    assert jax.jit(onednn.matmul)(jnp.ones((0, 5)), jnp.ones((5, 4))).shape == (0, 4)


def test_bad_operands_are_named():
    with pytest.raises(ValueError, match="both be float32 or bfloat16"):
        onednn.matmul(jnp.ones((2, 3), jnp.float32), jnp.ones((3, 2), jnp.bfloat16))
    with pytest.raises(ValueError, match="contracting sizes differ"):
        onednn.matmul(jnp.ones((2, 3)), jnp.ones((4, 2)))
    with pytest.raises(ConfigError, match="unknown matmul_impl 'mkl'"):
        LlamaConfig.preset("tiny", matmul_impl="mkl")
    with pytest.raises(ConfigError, match="float32 or bfloat16, not dtype 'float16'"):
        LlamaConfig.preset("tiny", matmul_impl="onednn", dtype="float16")


def _tiny(**overrides):
    return LlamaConfig.preset("tiny", num_layers=2, **overrides)


@pytest.mark.parametrize("tie", [False, True])
def test_model_logits_and_gradients_match_xla(tie):
    """Forward logits and the gradient of a loss on them, every projection and the LM head
    through oneDNN, against the default XLA products (float32)."""
    config = _tiny(tie_word_embeddings=tie)
    params = init_params(config, jax.random.PRNGKey(0))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (3, 17), 0, config.vocab_size)
    mask = jnp.ones_like(tokens).at[2, 11:].set(0)

    def loss_and_grad(cfg):
        def loss(p):
            logits = Llama(cfg).apply({"params": p}, tokens, attention_mask=mask)
            return jnp.mean(jax.nn.log_softmax(logits)[..., 7] * mask), logits

        return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

    (_, want_logits), want_grad = loss_and_grad(config)
    (_, got_logits), got_grad = loss_and_grad(config.replace(matmul_impl="onednn"))
    assert _rel_err(got_logits, want_logits) <= tolerances.MATMUL_F32
    for (path, got), want in zip(
        jax.tree_util.tree_leaves_with_path(got_grad), jax.tree.leaves(want_grad), strict=True
    ):
        scale = max(float(np.abs(want).max()), 1e-30)  # each leaf relative to its own scale
        err = float(np.abs(np.asarray(got) - np.asarray(want)).max()) / scale
        assert err <= tolerances.MATMUL_F32, f"{jax.tree_util.keystr(path)}: {err:.3g}"


def test_bf16_reward_loss_close_to_xla():
    """bf16 compute over float32 params, a Scaled BT loss: oneDNN and XLA round the same sums."""
    config = _tiny(dtype="bfloat16")
    model = RewardModel(config)
    tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 2, 16), 1, config.vocab_size)
    params = model.init(jax.random.PRNGKey(3), tokens, attention_mask=tokens > 0)["params"]
    batch = {"tokens": tokens, "attention_mask": jnp.ones_like(tokens)}
    batch |= {"strength": jnp.array([2, -1]), "example_weight": jnp.ones(2)}

    def loss(cfg):
        def f(p):
            rewards = RewardModel(cfg).apply({"params": p}, tokens, attention_mask=tokens > 0)
            total, weight = scaled_bt(rewards, batch, slot=HELPFULNESS_SLOT)[:2]
            return total.sum() / weight.sum()

        return jax.jit(jax.value_and_grad(f))(params)

    want, want_grad = loss(config)
    got, got_grad = loss(config.replace(matmul_impl="onednn"))
    assert abs(float(got) - float(want)) <= tolerances.BF16 * max(1.0, abs(float(want)))
    for g, w in zip(jax.tree.leaves(got_grad), jax.tree.leaves(want_grad), strict=True):
        scale = max(float(np.abs(w).max()), 1e-30)
        assert float(np.abs(np.asarray(g) - np.asarray(w)).max()) / scale <= tolerances.BF16


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_attention_matches_reference(dtype):
    """onednn.attention (the reference's masking and softmax, oneDNN products) against the
    reference: values and q/k/v gradients, on a right- and a left-padded row."""
    from nemotron_jax.kernels.attention.reference import attention_reference
    from nemotron_jax.models.llama import make_attention_mask, positions_from_mask

    b, t, n, kv, h = 2, 12, 4, 2, 8
    rng = np.random.default_rng(5)
    q, k, v = (jnp.asarray(rng.normal(size=(b, t, m, h)), dtype) for m in (n, kv, kv))
    valid = np.ones((b, t), bool)
    valid[0, t - 3 :] = False
    valid[1, :2] = False
    positions = positions_from_mask(jnp.asarray(valid))
    mask = make_attention_mask(positions, positions, jnp.asarray(valid))
    weight = jnp.asarray(valid, jnp.float32)[:, :, None, None]

    def loss(fn, q, k, v):
        out = fn(q, k, v, mask=mask).astype(jnp.float32)
        return jnp.sum(weight * out * jnp.sin(out)), out

    ref = functools.partial(attention_reference, causal=False)
    grad = jax.value_and_grad(loss, argnums=(1, 2, 3), has_aux=True)
    (_, want), g_want = jax.jit(grad, static_argnums=0)(ref, q, k, v)
    (_, got), g_got = jax.jit(grad, static_argnums=0)(onednn.attention, q, k, v)
    f32 = dtype == "float32"
    tol, grad_tol = (
        (tolerances.ATTENTION_F32, tolerances.ATTENTION_GRAD_F32)
        if f32
        else (tolerances.ATTENTION_BF16, tolerances.ATTENTION_GRAD_BF16)
    )
    assert _rel_err(np.asarray(got)[valid], np.asarray(want)[valid]) <= tol
    for a, e in zip(g_got, g_want, strict=True):
        assert _rel_err(a, e) <= grad_tol


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_inference_forward_fuses_swiglu(dtype):
    """Not differentiated, each MLP runs its gate product, silu and * up as one oneDNN call
    (`silu_times`); under `jax.grad` the unfused products run instead, for their residuals.
    Logits of the fused forward against the XLA path's."""
    config = _tiny(dtype=dtype, param_dtype=dtype)
    params = init_params(config, jax.random.PRNGKey(0))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (3, 17), 0, config.vocab_size)
    mask = jnp.ones_like(tokens).at[2, 11:].set(0)
    fused = config.replace(matmul_impl="onednn")

    def forward(cfg):
        return lambda p: Llama(cfg).apply({"params": p}, tokens, attention_mask=mask)

    hlo = jax.jit(forward(fused)).lower(params).as_text()
    assert onednn.SILU_MUL_TARGET in hlo
    grad_hlo = jax.jit(jax.grad(lambda p: forward(fused)(p).astype(jnp.float32).sum()))
    assert onednn.SILU_MUL_TARGET not in grad_hlo.lower(params).as_text()
    got, want = jax.jit(forward(fused))(params), jax.jit(forward(config))(params)
    tol = tolerances.MATMUL_F32 if dtype == "float32" else tolerances.BF16
    assert _rel_err(got, want) <= tol


def test_bf16_logits_through_onednn():
    """logits_dtype="bfloat16" with oneDNN: a bf16-output product, one bf16 ulp from XLA's."""
    config = _tiny(dtype="bfloat16", logits_dtype="bfloat16")
    params = init_params(config, jax.random.PRNGKey(0))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 11), 0, config.vocab_size)
    want = Llama(config).apply({"params": params}, tokens)
    got = Llama(config.replace(matmul_impl="onednn")).apply({"params": params}, tokens)
    assert got.dtype == jnp.bfloat16
    assert _rel_err(got, want) <= tolerances.BF16


def test_checkpoint_from_xla_run_accepted_with_onednn(tmp_path):
    """matmul_impl / logits_dtype change no parameter: a checkpoint recorded with the defaults
    passes the architecture check of a run that sets them."""
    from nemotron_jax import checkpoint as params_ckpt
    from nemotron_jax.train.objectives import check_model_config

    config = _tiny()
    params_ckpt.save_params(str(tmp_path / "p"), init_params(config, jax.random.PRNGKey(0)),
                            metadata={"model_config": config.to_dict()})  # fmt: skip
    other = config.replace(matmul_impl="onednn", logits_dtype="bfloat16", dtype="bfloat16")
    check_model_config(str(tmp_path / "p"), other, "init_from")
    with pytest.raises(ConfigError, match="num_layers"):
        check_model_config(str(tmp_path / "p"), other.replace(num_layers=3), "init_from")
