"""Training objectives, all with one contract:

    per_example_loss, per_example_weight, metrics = loss_fn(outputs, batch, **options)

- `per_example_loss` [B] float32: each example's share of the numerator (already multiplied by
  whatever the example counts for; 0 for examples that do not count).
- `per_example_weight` [B] float32: its share of the denominator.
- The objective is `sum(loss) / sum(weight)` over the *global* batch (`reduce_loss`). Because
  the normalisation happens once, after summing, every NeMo normalisation (mean over valid
  cells, over pairs, over tokens) is exact however examples are split into micro-batches or
  across devices.
- `metrics`: dict name -> `(values [B], weights [B])`, both float32. The metric is the weighted
  mean `Σ values·weights / Σ weights` (`reduce_metrics`); to accumulate over micro-batches, add
  the `(sum, count)` pairs of `metric_sums` and divide at the end (`metric_means`). A metric
  whose count is 0 reports 0.
- `options` are static Python values (bind them with `functools.partial` before jit).

Losses: `regression`, `regular_bt`, `margin_bt`, `scaled_bt` (NeMo-Aligner's names; see
`losses/reward.py`) and `sft` (`losses/lm.py`).
`reinforce` (`losses/reinforce.py`): NeMo-Aligner REINFORCE policy gradient with an RLOO baseline.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from nemotron_jax.errors import ConfigError
from nemotron_jax.losses.lm import sft, sft_fused, token_logprobs_reference
from nemotron_jax.losses.reinforce import (
    KL_ESTIMATORS,
    KL_REDUCTIONS,
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
}


def get_loss(name: str) -> LossFn:
    """The loss function registered under `name`; an unknown name raises `ConfigError`."""
    if name not in LOSSES:
        raise ConfigError(f"unknown loss {name!r}; valid losses: {sorted(LOSSES)}")
    return LOSSES[name]


def _safe_ratio(total: jax.Array, count: jax.Array) -> jax.Array:
    # An all-zero count (e.g. a batch of ties under "drop") gives 0, not NaN, with finite grads.
    return jnp.where(count > 0, total / jnp.where(count > 0, count, 1.0), 0.0)


def reduce_loss(per_example_loss: jax.Array, per_example_weight: jax.Array) -> jax.Array:
    """The objective: `sum(loss) / sum(weight)` in float32 (0 when the weights sum to 0)."""
    total = jnp.sum(jnp.asarray(per_example_loss, jnp.float32))
    return _safe_ratio(total, jnp.sum(jnp.asarray(per_example_weight, jnp.float32)))


def metric_sums(metrics: Mapping[str, tuple[Any, Any]]) -> dict[str, tuple[jax.Array, jax.Array]]:
    """name -> (Σ values·weights, Σ weights): additive across micro-batches and devices."""
    return {
        name: (
            jnp.sum(jnp.asarray(v, jnp.float32) * jnp.asarray(w, jnp.float32)),
            jnp.sum(jnp.asarray(w, jnp.float32)),
        )
        for name, (v, w) in metrics.items()
    }


def metric_means(sums: Mapping[str, tuple[Any, Any]]) -> dict[str, jax.Array]:
    """name -> Σ values·weights / Σ weights from `metric_sums` output (0 when the count is 0)."""
    return {name: _safe_ratio(total, count) for name, (total, count) in sums.items()}


def reduce_metrics(metrics: Mapping[str, tuple[Any, Any]]) -> dict[str, jax.Array]:
    """Weighted means of per-example metrics: `metric_means(metric_sums(metrics))`."""
    return metric_means(metric_sums(metrics))


__all__ = [
    "KL_ESTIMATORS",
    "KL_REDUCTIONS",
    "LOSSES",
    "NORMALIZATIONS",
    "TIE_POLICIES",
    "LossFn",
    "Metrics",
    "get_loss",
    "margin_bt",
    "metric_means",
    "metric_sums",
    "reduce_loss",
    "reduce_metrics",
    "regression",
    "regular_bt",
    "reinforce",
    "reinforce_advantages",
    "rloo_baseline",
    "scaled_bt",
    "sequence_kl",
    "sft",
    "token_kl",
    "token_logprobs_reference",
]
