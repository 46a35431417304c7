"""Training objectives, all with one contract:

    per_example_loss, per_example_weight, metrics = loss_fn(outputs, batch, **options)

- `per_example_loss` [B] float32: each example's share of the numerator (already multiplied by
  whatever the example counts for; 0 for examples that do not count).
- `per_example_weight` [B] float32: its share of the denominator.
- `metrics`: dict name -> `(values [B], weights [B])`, both float32; the metric is the weighted
  mean `Σ values·weights / Σ weights`.
- `options` are static Python values (bind them with `functools.partial` before jit).

One reduction serves training, evaluation and tests: `batch_sums` turns a batch's outputs into
`(sum, count)` pairs, "loss" -> `(Σ loss, Σ weight)` and one per metric, which add across
micro-batches and devices; `metric_means` divides once, at the end (0 where the count is 0).
Because the normalisation happens once, after summing over the *global* batch, the objective
is the same however examples are split into micro-batches or devices. What that matches in NeMo:
its mean over pairs (BT losses), since its micro-batches hold equal numbers of pairs; its mean
over valid attribute cells (regression) and over tokens only when its global batch is one
micro-batch: NeMo averages per-micro-batch means, which weighs a cell of a sparse micro-batch
more. The scaled-BT `sum_m` normalisation is this project's option; NeMo has none. Padding is
the reduction's business, not a loss's: `batch["example_weight"]` [B] (0 for a padding row)
scales every example's terms there.

Losses: `regression`, `regular_bt`, `margin_bt`, `scaled_bt` (NeMo-Aligner's names; see
`losses/reward.py`) and `sft` (`losses/lm.py`).
`reinforce` (`losses/reinforce.py`): NeMo-Aligner REINFORCE policy gradient with an RLOO baseline;
`ppo` (same file): PPO's clipped actor loss on GAE advantages plus the clipped critic loss.
`dpo` (`losses/dpo.py`): DPO on preference pairs, regular, margin and scaled.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from nemotron_jax.errors import ConfigError
from nemotron_jax.losses.dpo import dpo
from nemotron_jax.losses.lm import sft, sft_fused, token_logprobs
from nemotron_jax.losses.reinforce import (
    KL_ESTIMATORS,
    KL_REDUCTIONS,
    gae,
    group_normalized_advantages,
    policy_advantages,
    ppo,
    reinforce,
    reinforce_advantages,
    rloo_baseline,
    sequence_kl,
    token_kl,
)
from nemotron_jax.losses.reward import (
    NORMALIZATIONS,
    TIE_POLICIES,
    margin_bt,
    regression,
    regular_bt,
    scaled_bt,
)

Metrics = dict[str, tuple[jax.Array, jax.Array]]
LossFn = Callable[..., tuple[jax.Array, jax.Array, Metrics]]

LOSSES: dict[str, LossFn] = {
    "regression": regression,
    "regular_bt": regular_bt,
    "margin_bt": margin_bt,
    "scaled_bt": scaled_bt,
    "sft": sft,
    "sft_fused": sft_fused,
    "reinforce": reinforce,
    "ppo": ppo,
    "dpo": dpo,
}


def get_loss(name: str) -> LossFn:
    """The loss function registered under `name`; an unknown name raises `ConfigError`."""
    if name not in LOSSES:
        raise ConfigError(f"unknown loss {name!r}; valid losses: {sorted(LOSSES)}")
    return LOSSES[name]


Sums = dict[str, tuple[jax.Array, jax.Array]]


def _safe_ratio(total: jax.Array, count: jax.Array) -> jax.Array:
    # An all-zero count (e.g. a batch of ties under "drop") gives 0, not NaN, with finite grads.
    return jnp.where(count > 0, total / jnp.where(count > 0, count, 1.0), 0.0)


def batch_sums(
    per_example_loss: jax.Array,
    per_example_weight: jax.Array,
    metrics: Mapping[str, tuple[Any, Any]],
    example_weight: Any = None,
) -> Sums:
    """name -> (Σ value·weight, Σ weight) in float32 for "loss" (Σ loss, Σ weight) and every
    metric: additive across micro-batches and devices.

    `example_weight` [B] (None: all 1) scales each example's terms; a row with weight 0 (padding)
    adds nothing, even where its outputs are NaN.
    """
    if example_weight is not None:
        example_weight = jnp.asarray(example_weight, jnp.float32)

    def scaled(x):  # [B] float32 times example_weight, exactly 0 on padding rows
        x = jnp.asarray(x, jnp.float32)
        if example_weight is None:
            return x
        return jnp.where(example_weight > 0, x * example_weight, 0.0)

    sums = {"loss": (jnp.sum(scaled(per_example_loss)), jnp.sum(scaled(per_example_weight)))}
    for name, (values, weights) in metrics.items():
        weights = scaled(weights)
        values = jnp.where(weights > 0, jnp.asarray(values, jnp.float32), 0.0)
        sums[name] = (jnp.sum(values * weights), jnp.sum(weights))
    return sums


def metric_means(sums: Mapping[str, tuple[Any, Any]]) -> dict[str, jax.Array]:
    """name -> Σ / count from `batch_sums` output (0 when the count is 0)."""
    return {name: _safe_ratio(total, count) for name, (total, count) in sums.items()}


def reduce_batch(
    per_example_loss: jax.Array,
    per_example_weight: jax.Array,
    metrics: Mapping[str, tuple[Any, Any]],
    example_weight: Any = None,
) -> dict[str, jax.Array]:
    """One batch's objective ("loss") and metric means: `metric_means(batch_sums(...))`."""
    return metric_means(batch_sums(per_example_loss, per_example_weight, metrics, example_weight))


__all__ = [
    "KL_ESTIMATORS",
    "KL_REDUCTIONS",
    "LOSSES",
    "NORMALIZATIONS",
    "TIE_POLICIES",
    "LossFn",
    "Metrics",
    "Sums",
    "batch_sums",
    "dpo",
    "get_loss",
    "group_normalized_advantages",
    "margin_bt",
    "metric_means",
    "policy_advantages",
    "reduce_batch",
    "regression",
    "regular_bt",
    "gae",
    "ppo",
    "reinforce",
    "reinforce_advantages",
    "rloo_baseline",
    "scaled_bt",
    "sequence_kl",
    "sft",
    "token_kl",
    "token_logprobs",
]
