"""The reward model: parameter layout, last-real-token reading, pairs, backbone loading."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nemotron_jax import sharding
from nemotron_jax.models.llama import Llama, LlamaConfig, abstract_params, init_params
from nemotron_jax.models.reward import (
    RewardModel,
    abstract_reward_params,
    init_reward_params,
    last_token_index,
    reward_params_from_backbone,
    scalar_reward,
)
from tests import tolerances

CFG = LlamaConfig.preset("tiny")
T = 8


@functools.cache
def _params():
    return init_reward_params(CFG, jax.random.PRNGKey(0))


@jax.jit
def _forward(params, tokens, mask):
    return RewardModel(CFG).apply({"params": params}, tokens, attention_mask=mask)


def _rows():
    """Two right-padded rows of lengths 5 and 8."""
    tokens = np.random.default_rng(0).integers(4, CFG.vocab_size, (2, T)).astype(np.int32)
    mask = (np.arange(T)[None] < np.array([[5], [8]])).astype(np.int32)
    return tokens, mask


def test_params_have_a_head_and_no_lm_head():
    params = _params()
    assert sorted(params) == ["embed_tokens", "layers", "norm", "reward_head"]
    head = params["reward_head"]
    assert head["kernel"].shape == (CFG.hidden_size, 9) and head["kernel"].dtype == jnp.float32
    assert head["bias"].shape == (9,) and np.all(np.asarray(head["bias"]) == 0.0)
    assert 0.01 < float(jnp.std(head["kernel"])) < 0.03  # normal(0.02)
    # Backbone shapes are exactly Llama's, so converted Llama weights load by key.
    llama = abstract_params(CFG)
    for key in ("embed_tokens", "layers", "norm"):
        assert jax.tree.map(lambda x: (x.shape, x.dtype), params[key]) == jax.tree.map(
            lambda x: (x.shape, x.dtype), llama[key]
        )
    abstract = abstract_reward_params(CFG)
    assert jax.tree.map(lambda x: x.shape, abstract) == jax.tree.map(lambda x: x.shape, params)
    assert abstract_reward_params(CFG, 3)["reward_head"]["bias"].shape == (3,)


def test_llama_without_lm_head():
    params = abstract_params(CFG)
    assert "lm_head" in params
    model = Llama(CFG, with_lm_head=False)
    tokens = jnp.zeros((1, 1), jnp.int32)
    init_fn = functools.partial(model.init, method="hidden_states")
    headless = jax.eval_shape(init_fn, jax.random.PRNGKey(0), tokens)["params"]
    assert sorted(headless) == ["embed_tokens", "layers", "norm"]
    with pytest.raises(ValueError, match="without an LM head"):
        jax.eval_shape(lambda p: model.apply({"params": p}, tokens), headless)
    with pytest.raises(ValueError, match="has no LM head"):
        RewardModel(CFG, with_lm_head=True).init(
            jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32), attention_mask=jnp.ones((1, 1))
        )


def test_head_is_annotated_and_ruled():
    boxed = abstract_reward_params(CFG, boxed=True)
    assert sharding.unannotated_leaves(boxed) == []
    specs = sharding.logical_specs(boxed)
    assert tuple(specs["reward_head"]["kernel"]) == ("embed", "attributes")
    assert tuple(specs["reward_head"]["bias"]) == ("attributes",)
    mesh = sharding.make_mesh((2, 2, 2))
    shardings = sharding.shardings_for(boxed, mesh)
    assert tuple(shardings["reward_head"]["kernel"].spec) == ("fsdp", None)


def test_reads_the_last_real_token():
    params = _params()
    tokens, mask = _rows()
    out = np.asarray(_forward(params, tokens, mask))
    assert out.shape == (2, 9) and out.dtype == np.float32

    # Against the definition: head(final hidden state at index sum(mask) - 1).
    hidden = RewardModel(CFG).apply(
        {"params": params}, tokens, attention_mask=mask, method="hidden_states"
    )
    last = np.asarray(hidden)[np.arange(2), mask.sum(1) - 1]
    head = params["reward_head"]
    want = last @ np.asarray(head["kernel"]) + np.asarray(head["bias"])
    np.testing.assert_allclose(out, want, atol=tolerances.SIMPLE_F32)

    # Tokens after the last real one (padding) do not matter at all.
    changed_pad = tokens.copy()
    changed_pad[0, 5:] = (changed_pad[0, 5:] + 1) % CFG.vocab_size
    np.testing.assert_array_equal(np.asarray(_forward(params, changed_pad, mask)), out)
    # The last real token does, and only for its own row.
    changed_last = tokens.copy()
    changed_last[0, 4] = (changed_last[0, 4] + 1) % CFG.vocab_size
    moved = np.asarray(_forward(params, changed_last, mask))
    assert np.abs(moved[0] - out[0]).max() > 1e-3
    np.testing.assert_array_equal(moved[1], out[1])


def test_left_padding_matches_right_padding():
    params = _params()
    tokens, mask = _rows()
    left_tokens = np.roll(tokens, 3, axis=1)
    left_mask = np.roll(mask, 3, axis=1)
    np.testing.assert_array_equal(np.asarray(last_token_index(left_mask)), [7, 7])
    np.testing.assert_array_equal(np.asarray(last_token_index(mask)), [4, 7])
    right = np.asarray(_forward(params, tokens, mask))
    left = np.asarray(_forward(params, left_tokens[:1], left_mask[:1]))
    # Same real tokens at the same positions: only the masked-out slots differ.
    np.testing.assert_allclose(left[0], right[0], atol=tolerances.SIMPLE_F32)


def test_pairs_shape_and_values():
    params = _params()
    tokens, mask = _rows()
    pairs = np.stack([tokens, tokens[::-1]], axis=1)  # [B=2, 2, T]
    pair_mask = np.stack([mask, mask[::-1]], axis=1)
    out = np.asarray(_forward(params, pairs, pair_mask))
    assert out.shape == (2, 2, 9)
    rows = np.asarray(_forward(params, tokens, mask))
    np.testing.assert_allclose(out[:, 0], rows, atol=tolerances.SIMPLE_F32)
    np.testing.assert_allclose(out[:, 1], rows[::-1], atol=tolerances.SIMPLE_F32)
    with pytest.raises(ValueError, match="attention_mask shape"):
        _forward(params, pairs, mask)


def test_scalar_reward():
    outputs = jnp.arange(18.0).reshape(2, 9)
    np.testing.assert_array_equal(np.asarray(scalar_reward(outputs)), [4.0, 13.0])
    np.testing.assert_array_equal(np.asarray(scalar_reward(outputs, slot=0)), [0.0, 9.0])
    weights = np.zeros(9)
    weights[4], weights[5] = 0.5, 2.0
    np.testing.assert_allclose(
        np.asarray(scalar_reward(outputs[None], weights=weights)), [[12.0, 34.5]], atol=0
    )
    with pytest.raises(ValueError, match="merge weights"):
        scalar_reward(outputs, weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="slot 9 out of range"):
        scalar_reward(outputs, slot=9)


def test_reward_params_from_backbone():
    backbone = init_params(CFG, jax.random.PRNGKey(1))
    params = reward_params_from_backbone(backbone, jax.random.PRNGKey(2))
    assert sorted(params) == ["embed_tokens", "layers", "norm", "reward_head"]
    assert params["embed_tokens"] is backbone["embed_tokens"]
    assert jax.tree.structure(params) == jax.tree.structure(_params())
    assert np.all(np.asarray(params["reward_head"]["bias"]) == 0.0)
    tokens, mask = _rows()
    assert np.isfinite(np.asarray(_forward(params, tokens, mask))).all()

    # Given head params are kept as they are (e.g. stage 2 starting from stage 1's head).
    head = _params()["reward_head"]
    reused = reward_params_from_backbone(backbone, head)
    assert reused["reward_head"]["kernel"] is head["kernel"]
    three = reward_params_from_backbone(backbone, jax.random.PRNGKey(2), num_attributes=3)
    assert three["reward_head"]["kernel"].shape == (CFG.hidden_size, 3)

    with pytest.raises(ValueError, match="head params must be"):
        reward_params_from_backbone(backbone, {"kernel": jnp.zeros((3, 9)), "bias": jnp.zeros(9)})
    with pytest.raises(ValueError, match="not Llama params"):
        reward_params_from_backbone(_params(), jax.random.PRNGKey(0))
