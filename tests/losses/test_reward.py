"""Reward objectives against hand-computed numbers (NeMo-Aligner semantics, spec §2)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nemotron_jax.errors import ConfigError
from nemotron_jax.losses import (
    LOSSES,
    batch_sums,
    get_loss,
    margin_bt,
    metric_means,
    reduce_batch,
    regression,
    regular_bt,
    scaled_bt,
)
from tests import tolerances

ATOL = tolerances.LOSS_F32

# -log σ(x) = log(1 + e^-x), written out for the Δ values used below.
NLL_1 = 0.31326168751822286  # Δ = 1
NLL_M1 = 1.3132616875182228  # Δ = -1 (margin BT with Δ = 1, m = 2)
NLL_M2 = 2.1269280110429727  # Δ = -2
NLL_M3 = 3.048587351573742  # Δ = -3 (margin BT with Δ = -2, m = 1)
NLL_HALF = 0.4740769841801067  # Δ = 0.5

# Four pairs; column 0 is response_1's slot-4 reward, column 1 response_2's.
#   pair 0: strength -2 -> response_1 chosen, Δ = 1.5 - 0.5 = 1,  m = 2
#   pair 1: strength  2 -> response_2 chosen, Δ = 1.25 - 0.25 = 1, m = 2
#   pair 2: strength  0 -> tie; under "nemo" response_2 wins, Δ = 0.5, m = 0
#   pair 3: strength  1 -> response_2 chosen, Δ = 0 - 2 = -2,   m = 1
REWARDS = np.array([[1.5, 0.5], [0.25, 1.25], [0.0, 0.5], [2.0, 0.0]], np.float32)
STRENGTH = np.array([-2, 2, 0, 1], np.int32)


def _pair_outputs(rewards=REWARDS, slot=4, num_attributes=9):
    """[B, 2, A] with `rewards` in `slot` and large junk elsewhere (must be ignored)."""
    junk = np.random.default_rng(0).normal(scale=50.0, size=(*rewards.shape, num_attributes))
    out = junk.astype(np.float32)
    out[..., slot] = rewards
    return jnp.asarray(out)


def _close(got, want):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want, np.float32), atol=ATOL, rtol=0)


def test_single_pair_values_written_out():
    # Δ = 1, m = 2, response_1 chosen (strength -2).
    outputs = _pair_outputs(np.array([[1.5, 0.5]], np.float32))
    batch = {"strength": np.array([-2])}
    assert math.isclose(NLL_1, math.log1p(math.exp(-1.0)))
    _close(regular_bt(outputs, batch)[0], [NLL_1])
    _close(margin_bt(outputs, batch)[0], [NLL_M1])  # -log σ(1 - 2) = log(1 + e)
    _close(scaled_bt(outputs, batch)[0], [2 * NLL_1])


def test_orientation_follows_the_sign_of_strength():
    # Same rewards, strength flipped: now response_2 (reward 0.5) is chosen, Δ = -1.
    outputs = _pair_outputs(np.array([[1.5, 0.5]], np.float32))
    _close(regular_bt(outputs, {"strength": np.array([-1])})[0], [NLL_1])
    _close(regular_bt(outputs, {"strength": np.array([1])})[0], [NLL_M1])


def test_drop_policy_on_a_batch_with_a_tie():
    outputs, batch = _pair_outputs(), {"strength": STRENGTH}
    loss, weight, _ = regular_bt(outputs, batch)
    _close(loss, [NLL_1, NLL_1, 0.0, NLL_M2])
    _close(weight, [1, 1, 0, 1])
    loss, weight, _ = margin_bt(outputs, batch)
    _close(loss, [NLL_M1, NLL_M1, 0.0, NLL_M3])
    _close(weight, [1, 1, 0, 1])
    loss, weight, _ = scaled_bt(outputs, batch)
    _close(loss, [2 * NLL_1, 2 * NLL_1, 0.0, NLL_M2])
    _close(weight, [1, 1, 0, 1])

    means = reduce_batch(*regular_bt(outputs, batch))
    _close(means["accuracy"], 2 / 3)
    _close(means["reward_gap"], (1 + 1 - 2) / 3)
    _close(means["reward_chosen"], (1.5 + 1.25 + 0.0) / 3)
    _close(means["reward_rejected"], (0.5 + 0.25 + 2.0) / 3)
    _close(means["ties"], 1 / 4)


def test_nemo_tie_policy():
    outputs, batch = _pair_outputs(), {"strength": STRENGTH}
    # Label 0 >= 0: response_2 is the winner, so the tie costs -log σ(0.5) at weight 1.
    loss, weight, metrics = regular_bt(outputs, batch, tie_policy="nemo")
    _close(loss, [NLL_1, NLL_1, NLL_HALF, NLL_M2])
    _close(weight, [1, 1, 1, 1])
    # Margin with m = 0 is Regular BT on the tie.
    loss, weight, _ = margin_bt(outputs, batch, tie_policy="nemo")
    _close(loss, [NLL_M1, NLL_M1, NLL_HALF, NLL_M3])
    _close(weight, [1, 1, 1, 1])
    # Scaled: zero loss but, as in NeMo's mean over micro-batches, it still counts as a pair.
    loss, weight, metrics = scaled_bt(outputs, batch, tie_policy="nemo")
    _close(loss, [2 * NLL_1, 2 * NLL_1, 0.0, NLL_M2])
    _close(weight, [1, 1, 1, 1])
    means = reduce_batch(loss, weight, metrics)
    _close(means["loss"], (4 * NLL_1 + NLL_M2) / 4)
    # Metrics still exclude the tie.
    _close(means["accuracy"], 2 / 3)


def test_scaled_normalisations():
    outputs, batch = _pair_outputs(), {"strength": STRENGTH}
    out = scaled_bt(outputs, batch, normalization="pairs")
    _close(reduce_batch(*out)["loss"], (4 * NLL_1 + NLL_M2) / 3)  # not divided by Σm
    out = scaled_bt(outputs, batch, normalization="sum_m")
    _close(out[1], [2, 2, 0, 1])
    _close(reduce_batch(*out)["loss"], (4 * NLL_1 + NLL_M2) / 5)
    loss, weight, _ = scaled_bt(outputs, batch, normalization="sum_m", tie_policy="nemo")
    _close(weight, [2, 2, 0, 1])  # a tie has m = 0


def test_global_normalisation_is_independent_of_micro_batching():
    outputs, batch = _pair_outputs(), {"strength": STRENGTH}
    loss, weight, metrics = scaled_bt(outputs, batch, normalization="sum_m")
    halves = [
        scaled_bt(outputs[s], {"strength": STRENGTH[s]}, normalization="sum_m")
        for s in (slice(0, 1), slice(1, 4))
    ]
    total = sum(jnp.sum(h[0]) for h in halves) / sum(jnp.sum(h[1]) for h in halves)
    whole = reduce_batch(loss, weight, metrics)
    _close(total, whole["loss"])
    sums = [batch_sums(*h) for h in halves]
    merged = {k: (sums[0][k][0] + sums[1][k][0], sums[0][k][1] + sums[1][k][1]) for k in sums[0]}
    for name, value in metric_means(merged).items():
        _close(value, whole[name])


def test_zero_gap_is_not_correct():
    outputs = _pair_outputs(np.array([[0.7, 0.7], [0.1, 0.9]], np.float32))
    _, _, metrics = regular_bt(outputs, {"strength": np.array([3, 1])})
    _close(metrics["accuracy"][0], [0.0, 1.0])


def test_padding_rows_and_all_dropped_batch():
    outputs = _pair_outputs()
    # Row 1 is padding (example_weight 0): only pairs 0 and 3 count; pair 2 is a dropped tie.
    sums = batch_sums(*regular_bt(outputs, {"strength": STRENGTH}), np.array([1, 0, 1, 1]))
    _close(sums["loss"], (NLL_1 + NLL_M2, 2))
    _close(metric_means(sums)["ties"], 1 / 3)
    # Only ties: the objective is 0, not NaN, and so is its gradient.
    ties = {"strength": np.zeros(4, np.int32)}

    def objective(o):
        return reduce_batch(*scaled_bt(o, ties))["loss"]

    value, grad = jax.value_and_grad(objective)(outputs)
    assert float(value) == 0.0 and np.all(np.asarray(grad) == 0.0)


@pytest.mark.parametrize("loss_fn", [regular_bt, margin_bt, scaled_bt])
def test_gradient_pushes_chosen_up_and_rejected_down(loss_fn):
    outputs = _pair_outputs()
    batch = {"strength": STRENGTH}
    grad = np.asarray(jax.grad(lambda o: jnp.sum(loss_fn(o, batch)[0]))(outputs))
    chosen_row = np.where(STRENGTH >= 0, 1, 0)
    for i in (0, 1, 3):  # the non-tie pairs
        assert grad[i, chosen_row[i], 4] < 0 < grad[i, 1 - chosen_row[i], 4]
    assert np.all(grad[2] == 0.0)  # dropped tie
    assert np.all(np.delete(grad, 4, axis=-1) == 0.0)  # only the reward slot is read
    # Scaled BT's gradient is -m (1 - σ(Δ)) (spec §2.1): for pair 0, Δ = 1, m = 2.
    if loss_fn is scaled_bt:
        _close(grad[0, 0, 4], -2 * (1 - 1 / (1 + math.exp(-1.0))))


def test_merged_reward_weights():
    # Reward = 0.5·slot0 + 2·slot1; response_1: 0.5·2 + 2·1 = 3, response_2: 0.5·0 + 2·1 = 2.
    outputs = jnp.asarray([[[2.0, 1.0, 9.0], [0.0, 1.0, -9.0]]])
    loss, _, _ = regular_bt(outputs, {"strength": np.array([-1])}, weights=(0.5, 2.0, 0.0))
    _close(loss, [NLL_1])


def test_regression_masks_minus_100_cells():
    outputs = jnp.asarray([[1.0, 2.0, 3.0], [0.5, -1.0, 4.0]])
    labels = np.array([[-100, 1.0, 5.0], [1.5, -100, -100]], np.float32)
    # Row 0: (2-1)^2 + (3-5)^2 = 5 over 2 cells; row 1: (0.5-1.5)^2 = 1 over 1 cell.
    loss, weight, metrics = regression(outputs, {"labels": labels})
    _close(loss, [5.0, 1.0])
    _close(weight, [2.0, 1.0])
    means = reduce_batch(loss, weight, metrics)
    _close(means["loss"], 6.0 / 3.0)
    _close(means["mse"], 2.0)
    _close([means["mae/0"], means["mae/1"], means["mae/2"]], [1.0, 1.0, 2.0])

    def objective(o):
        return reduce_batch(*regression(o, {"labels": labels}))["loss"]

    grad = np.asarray(jax.grad(objective)(outputs))
    assert grad[0, 0] == 0.0 and grad[1, 1] == 0.0 and grad[1, 2] == 0.0
    _close(grad[0, 2], 2 * (3.0 - 5.0) / 3.0)


def test_regression_padding_row_and_shapes():
    # Row 1 is padding (example_weight 0) with a NaN output: it must not reach any sum.
    outputs = jnp.asarray([[1.0, 2.0], [np.nan, 0.0]])
    labels = np.array([[0.0, 0.0], [1.0, 1.0]], np.float32)
    sums = batch_sums(*regression(outputs, {"labels": labels}), np.array([1.0, 0.0]))
    _close(sums["loss"], (5.0, 2.0))
    _close(metric_means(sums)["mse"], 2.5)
    with pytest.raises(ValueError, match="labels"):
        regression(outputs, {"labels": labels[:, :1]})


def test_registry_and_option_errors():
    assert set(LOSSES) == {
        "regression", "regular_bt", "margin_bt", "scaled_bt", "sft", "sft_fused", "reinforce",
        "dpo", "ppo",
    }  # fmt: skip
    assert get_loss("scaled_bt") is scaled_bt
    with pytest.raises(ConfigError, match=r"unknown loss 'bt'; valid losses: \['dpo', 'margin_bt'"):
        get_loss("bt")
    outputs, batch = _pair_outputs(), {"strength": STRENGTH}
    with pytest.raises(ConfigError, match="unknown tie_policy 'keep'"):
        regular_bt(outputs, batch, tie_policy="keep")
    with pytest.raises(ConfigError, match="unknown normalization 'mean'"):
        scaled_bt(outputs, batch, normalization="mean")
    with pytest.raises(ValueError, match=r"outputs \[B, 2, A\]"):
        regular_bt(outputs[:, 0], batch)


def test_jit_with_bound_options():
    outputs, batch = _pair_outputs(), {"strength": STRENGTH}

    @jax.jit
    def step(o, b):
        return reduce_batch(*scaled_bt(o, b, tie_policy="nemo", normalization="sum_m"))

    metrics = step(outputs, batch)
    _close(metrics["loss"], (4 * NLL_1 + NLL_M2) / 5)
    assert all(v.dtype == jnp.float32 for v in metrics.values())
