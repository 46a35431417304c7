"""The one reduction (`batch_sums`, `metric_means`) against hand-computed numbers."""

import jax.numpy as jnp
import numpy as np

from nemotron_jax.losses import batch_sums, metric_means, reduce_batch
from tests import tolerances


def _close(got, want):
    np.testing.assert_allclose(
        np.asarray(got), np.asarray(want, np.float32), atol=tolerances.LOSS_F32, rtol=0
    )


def test_batch_sums_scale_by_example_weight_and_skip_padding():
    loss = jnp.array([1.0, 2.0, jnp.nan])
    weight = jnp.array([1.0, 3.0, 1.0])
    metrics = {"m": (jnp.array([0.5, jnp.nan, 4.0]), jnp.array([2.0, 0.0, 1.0]))}
    # Row 2 is padding (weight 0, NaN loss); row 1 counts half.
    sums = batch_sums(loss, weight, metrics, np.array([1.0, 0.5, 0.0], np.float32))
    _close(sums["loss"], (1.0 + 0.5 * 2.0, 1.0 + 0.5 * 3.0))
    _close(sums["m"], (0.5 * 2.0, 2.0))  # row 1 has metric weight 0, so its NaN is skipped
    means = metric_means(sums)
    _close(means["loss"], 2.0 / 2.5)
    _close(means["m"], 0.5)


def test_reduce_batch_without_example_weight_and_empty_counts():
    means = reduce_batch(
        jnp.array([3.0, 1.0]), jnp.array([2.0, 2.0]), {"m": (jnp.ones(2), jnp.zeros(2))}
    )
    _close(means["loss"], 4.0 / 4.0)
    _close(means["m"], 0.0)  # no weight: 0, not NaN
