"""SFT cross entropy (shift by one, masking), plain and fused."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nemotron_jax.losses import reduce_batch, sft
from tests import tolerances

ATOL = tolerances.LOSS_F32
LOG2, LOG3 = math.log(2.0), math.log(3.0)


def _close(got, want):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want, np.float32), atol=ATOL, rtol=0)


def _example():
    """V = 3, T = 3. logits[0] is uniform (p = 1/3 for any token); logits[1] = [0, ln 2, 0]
    gives p(1) = 2/4; logits[2] predicts past the end and must be ignored."""
    logits = np.array([[0.0, 0.0, 0.0], [0.0, LOG2, 0.0], [1e4, -1e4, 7.0]], np.float32)
    return jnp.asarray(np.stack([logits, logits]))  # [B=2, T=3, V=3]


def test_sft_shift_by_one_and_mask():
    logits = _example()
    # Row 0: targets token 1 (= 1, from logits[0]) and token 2 (= 1, from logits[1]).
    # Row 1: only token 2 (= 1) is a target; loss_mask[:, 0] is ignored.
    tokens = np.array([[2, 1, 1], [2, 1, 1]])
    loss_mask = np.array([[0, 1, 1], [1, 0, 1]])
    loss, weight, metrics = sft(logits, {"tokens": tokens, "loss_mask": loss_mask})
    _close(loss, [LOG3 + LOG2, LOG2])  # row 0: -log(1/3) - log(1/2) = log 6
    _close(weight, [2.0, 1.0])
    means = reduce_batch(loss, weight, metrics)
    _close(means["loss"], (LOG3 + 2 * LOG2) / 3)  # mean over all target tokens
    # argmax of logits[0] is token 0 (wrong for target 1), of logits[1] token 1 (right).
    _close(metrics["token_accuracy"][0], [0.5, 1.0])
    _close(means["token_accuracy"], 2 / 3)


def test_sft_gradient_only_on_predicting_positions():
    logits = _example()
    batch = {"tokens": np.array([[2, 0, 1], [2, 0, 1]]), "loss_mask": np.array([[1, 0, 1]] * 2)}
    grad = np.asarray(jax.grad(lambda x: jnp.sum(sft(x, batch)[0]))(logits))
    # Position 0 predicts an unmasked token and position 2 predicts nothing: no gradient.
    assert np.all(grad[:, 0] == 0.0) and np.all(grad[:, 2] == 0.0)
    # At position 1: softmax - onehot(1) = [1/4, 2/4 - 1, 1/4].
    _close(grad[:, 1], [[0.25, -0.5, 0.25]] * 2)


def test_sft_empty_mask_gives_zero_weight():
    loss, weight, _ = sft(_example(), {"tokens": np.ones((2, 3), int), "loss_mask": np.eye(2, 3)})
    # Row 0 only marks token 0 (never a target); row 1 marks token 1.
    _close(weight, [0.0, 1.0])
    _close(loss, [0.0, LOG3])


def test_sft_fused_equals_sft_on_logits():
    import jax
    import jax.numpy as jnp
    import numpy as np

    from nemotron_jax.losses.lm import sft, sft_fused

    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.normal(size=(2, 7, 16)), jnp.float32)
    head = jnp.asarray(rng.normal(size=(16, 50)), jnp.float32)
    batch = {
        "tokens": rng.integers(0, 50, (2, 7)),
        "loss_mask": np.array([[0, 0, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1, 1]]),
    }
    logits = jnp.einsum("btd,dv->btv", hidden, head)
    want_loss, want_w, _ = sft(logits, batch)
    for impl in ("chunked", "reference"):
        loss, w, metrics = sft_fused((hidden, head), batch, implementation=impl)
        np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
        np.testing.assert_array_equal(w, want_w)
    g_ref = jax.grad(lambda h: sft(jnp.einsum("btd,dv->btv", h, head), batch)[0].sum())(hidden)
    g = jax.grad(lambda h: sft_fused((h, head), batch)[0].sum())(hidden)
    np.testing.assert_allclose(g, g_ref, atol=1e-5)


@pytest.mark.parametrize("implementation", ["chunked", "pallas_interpret"])
def test_sft_fused_per_shard_under_mesh(implementation):
    """Under a (2, 2, 2) mesh every implementation runs per shard (examples over data x fsdp,
    vocabulary over tensor): values and the hidden / head gradients equal the unsharded
    reference, and the hidden states are never all-gathered."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np

    from nemotron_jax import sharding
    from nemotron_jax.losses.lm import sft_fused

    rng = np.random.default_rng(1)
    hidden = jnp.asarray(rng.normal(size=(4, 9, 16)), jnp.float32)
    head = jnp.asarray(rng.normal(size=(16, 64)), jnp.float32)
    batch = {"tokens": rng.integers(0, 64, (4, 9)), "loss_mask": np.ones((4, 9), np.int32)}

    def total(h, w, impl):
        return jnp.sum(sft_fused((h, w), batch, implementation=impl)[0])

    want, want_grads = jax.value_and_grad(total, argnums=(0, 1))(hidden, head, "reference")
    mesh = sharding.make_mesh((2, 2, 2))
    fn = jax.jit(jax.value_and_grad(total, argnums=(0, 1)), static_argnums=2)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
        got, got_grads = fn(hidden, head, implementation)
        hlo = fn.lower(hidden, head, implementation).compile().as_text()
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5)
    for g, w in zip(got_grads, want_grads, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)
    # GSPMD's chunked path all-gathers the hidden states to all 32 tokens x D = 16: f32[32,16].
    gathered = [line for line in hlo.splitlines() if "all-gather(" in line and "[32,16]" in line]
    assert not gathered, gathered
