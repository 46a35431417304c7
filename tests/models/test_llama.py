"""Configs, presets, shapes and masking of the Flax Llama (no transformers needed)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nemotron_jax.errors import ConfigError
from nemotron_jax.models import Llama, LlamaConfig, count_params, init_params, positions_from_mask
from tests import tolerances


@pytest.mark.parametrize(
    "name,expected",
    [
        ("llama3.1-8b", 8_030_261_248),
        ("llama3.1-70b", 70_553_706_496),
        ("llama3.1-405b", 405_853_388_800),
    ],
)
def test_preset_parameter_counts(name, expected):
    assert count_params(LlamaConfig.preset(name)) == expected


def test_unknown_preset_lists_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown preset 'llama3-8b'; valid presets: \["):
        LlamaConfig.preset("llama3-8b")


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("dtype", "int8", "unsupported dtype 'int8'"),
        ("param_dtype", "float64", "unsupported param_dtype"),
        ("rope_type", "yarn", "unsupported rope type 'yarn'"),
        ("num_kv_heads", 3, "multiple of num_kv_heads"),
        ("remat", "some", "unknown remat"),
        ("scan_unroll", 0, "scan_unroll must be a positive int"),
    ],
)
def test_bad_config_values(field, value, match):
    with pytest.raises(ConfigError, match=match):
        LlamaConfig.preset("tiny", **{field: value})


def test_unknown_field():
    with pytest.raises(ConfigError, match="unknown LlamaConfig field"):
        LlamaConfig.preset("tiny", hidden=3)


def test_config_dict_round_trip():
    cfg = LlamaConfig.preset("tiny")
    assert LlamaConfig.from_dict(cfg.to_dict()) == cfg
    hash(cfg)  # a jit static argument


@pytest.fixture(scope="module")
def tiny():
    cfg = LlamaConfig.preset("tiny")
    return cfg, init_params(cfg, jax.random.PRNGKey(0))


def test_causal(tiny):
    cfg, params = tiny
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 10))
    changed = tokens.copy()
    changed[0, 6:] = (changed[0, 6:] + 1) % cfg.vocab_size
    a = Llama(cfg).apply({"params": params}, tokens)
    b = Llama(cfg).apply({"params": params}, changed)
    np.testing.assert_array_equal(a[:, :6], b[:, :6])
    assert not np.allclose(a[:, 6:], b[:, 6:])


def test_right_padding_does_not_change_real_tokens(tiny):
    cfg, params = tiny
    tokens = np.random.default_rng(1).integers(4, cfg.vocab_size, (1, 7))
    padded = np.concatenate([tokens, np.zeros((1, 5), int)], axis=1)
    mask = (np.arange(12) < 7)[None].astype(np.int32)
    a = Llama(cfg).apply({"params": params}, tokens)
    b = Llama(cfg).apply({"params": params}, padded, attention_mask=mask)
    np.testing.assert_allclose(a, b[:, :7], atol=1e-5)


def test_left_padding_with_positions(tiny):
    cfg, params = tiny
    tokens = np.random.default_rng(2).integers(4, cfg.vocab_size, (1, 7))
    padded = np.concatenate([np.zeros((1, 3), int), tokens], axis=1)
    mask = (np.arange(10) >= 3)[None].astype(np.int32)
    a = Llama(cfg).apply({"params": params}, tokens)
    b = Llama(cfg).apply(
        {"params": params}, padded, attention_mask=mask, positions=positions_from_mask(mask)
    )
    np.testing.assert_allclose(a, b[:, 3:], atol=1e-5)
    assert np.isfinite(np.asarray(b)).all()  # fully masked pad rows: no NaN


def test_hidden_states_and_remat(tiny):
    cfg, params = tiny
    tokens = np.arange(12).reshape(2, 6)
    logits, hidden = Llama(cfg).apply({"params": params}, tokens, return_hidden=True)
    assert hidden.shape == (2, 6, cfg.hidden_size) and logits.shape == (2, 6, cfg.vocab_size)
    h2 = Llama(cfg).apply({"params": params}, tokens, method=Llama.hidden_states)
    np.testing.assert_array_equal(hidden, h2)

    def loss(p, c):
        return jnp.mean(Llama(c).apply({"params": p}, tokens) ** 2)

    g = jax.grad(loss)(params, cfg)
    g_remat = jax.grad(loss)(params, cfg.replace(remat="full"))
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_remat), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_pallas_attention_in_the_model_matches_xla(tiny):
    cfg, params = tiny
    tokens = np.random.default_rng(3).integers(4, cfg.vocab_size, (2, 20))
    mask = (np.arange(20)[None] < np.array([[20], [13]])).astype(np.int32)
    want = Llama(cfg.replace(attention_impl="xla")).apply(
        {"params": params}, tokens, attention_mask=mask
    )
    got = Llama(cfg.replace(attention_impl="pallas_interpret")).apply(
        {"params": params}, tokens, attention_mask=mask
    )
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=1e-5)


def test_cpu_attention_in_the_model_matches_xla(tiny):
    """attention_impl="cpu": logits and every parameter gradient equal the XLA path's, with a
    right-padded row (default positions: the kernel skips keys by index)."""
    cfg, params = tiny
    tokens = np.random.default_rng(4).integers(4, cfg.vocab_size, (2, 20))
    mask = (np.arange(20)[None] < np.array([[20], [13]])).astype(np.int32)
    real = mask.astype(bool)

    def loss(p, impl):
        logits = Llama(cfg.replace(attention_impl=impl)).apply(
            {"params": p}, tokens, attention_mask=mask
        )
        return jnp.sum(real[:, :, None] * jnp.sin(logits)), logits

    (_, want), g_want = jax.value_and_grad(loss, has_aux=True)(params, "xla")
    (_, got), g_got = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)(
        params, "cpu"
    )
    scale = max(1.0, float(jnp.max(jnp.abs(want[real]))))
    np.testing.assert_allclose(got[real], want[real], atol=tolerances.ATTENTION_F32 * scale)
    for a, e in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want), strict=True):
        scale = max(1.0, float(jnp.max(jnp.abs(e))))
        np.testing.assert_allclose(a, e, atol=tolerances.ATTENTION_GRAD_F32 * scale)
    with pytest.raises(ConfigError, match="attention_impl 'cpu': .* float32 or bfloat16"):
        cfg.replace(attention_impl="cpu", dtype="float16")


def test_unknown_attention_impl():
    with pytest.raises(ConfigError, match="unknown attention_impl 'flash'"):
        LlamaConfig.preset("tiny", attention_impl="flash")


def test_real_rows_only_matches_plain_attention(tiny):
    cfg, params = tiny
    tokens = np.random.default_rng(5).integers(4, cfg.vocab_size, (2, 14))
    mask = np.ones((2, 14), np.int32)
    mask[0, 10:] = 0
    mask[1, :5] = 0
    positions = positions_from_mask(mask)

    def hidden(p, real_rows_only):
        return Llama(cfg).apply(
            {"params": p},
            tokens,
            attention_mask=mask,
            positions=positions,
            real_rows_only=real_rows_only,
            method=Llama.hidden_states,
        )

    def loss(p, real_rows_only):
        return jnp.sum(mask[:, :, None] * jnp.sin(hidden(p, real_rows_only)))

    real = mask.astype(bool)
    want, got = hidden(params, False), hidden(params, True)
    scale = max(1.0, float(jnp.max(jnp.abs(want[real]))))
    np.testing.assert_allclose(got[real], want[real], atol=tolerances.ATTENTION_F32 * scale)
    for a, e in zip(
        jax.tree.leaves(jax.grad(loss)(params, True)),
        jax.tree.leaves(jax.grad(loss)(params, False)),
        strict=True,
    ):  # relative to the gradient's scale, as the attention tolerances are defined
        scale = max(1.0, float(jnp.max(jnp.abs(e))))
        np.testing.assert_allclose(a, e, atol=tolerances.ATTENTION_GRAD_F32 * scale)


def test_scan_unroll_changes_no_result(tiny):
    cfg, params = tiny
    tokens = np.arange(12).reshape(2, 6)
    want = Llama(cfg).apply({"params": params}, tokens)
    for unroll in (2, cfg.num_layers + 1):
        got = Llama(cfg.replace(scan_unroll=unroll)).apply({"params": params}, tokens)
        np.testing.assert_allclose(got, want, atol=tolerances.SIMPLE_F32)


def test_logits_dtype_rounds_the_float32_logits(tiny):
    """logits_dtype="bfloat16" gives the float32 logits rounded to bf16 (same accumulation)."""
    config, params = tiny
    tokens = jax.random.randint(jax.random.PRNGKey(7), (2, 9), 0, config.vocab_size)
    want = Llama(config).apply({"params": params}, tokens)
    got = Llama(config.replace(logits_dtype="bfloat16")).apply({"params": params}, tokens)
    assert want.dtype == jnp.float32 and got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want.astype(jnp.bfloat16)))
