"""Reward-model objectives with NeMo-Aligner's names and numerics (helpsteer2_spec.md §2).

Every function follows the contract in `nemotron_jax.losses`:
`loss_fn(outputs, batch, **options) -> (per_example_loss [B], per_example_weight [B], metrics)`,
and the objective is `sum(loss) / sum(weight)` over the global batch.

Pair losses read `outputs [B, 2, A]` (row 0 = response_1, row 1 = response_2) and
`batch["strength"] [B]`, HelpSteer2-Preference's signed label: < 0 means response_1 is better,
> 0 response_2, 0 a tie; m = |strength|. With Δ = r(chosen) - r(rejected):

    regular_bt   -log σ(Δ)
    margin_bt    -log σ(Δ - m)
    scaled_bt    -m log σ(Δ)

Padding examples (a short last batch) are not a loss's concern: the reduction
(`nemotron_jax.losses.batch_sums`) scales every example by `batch["example_weight"]`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from nemotron_jax.errors import ConfigError
from nemotron_jax.models.reward import HELPFULNESS_SLOT, scalar_reward

# "drop": ties get weight 0 (the paper trains without them). "nemo": NeMo's `label >= 0 -> row 1
# chosen`, so a tie counts as a pair won by response_2 with m = 0.
TIE_POLICIES = ("drop", "nemo")
# "pairs": NeMo's mean over pairs, not normalised by Σm. "sum_m": Σ m·loss / Σ m.
NORMALIZATIONS = ("pairs", "sum_m")
# NeMo's `loss_mask_val`: a label equal to it is not supervised.
MASK_VALUE = -100.0

Metrics = dict[str, tuple[jax.Array, jax.Array]]


def _metric(values: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(values, weights) in float32; values are zeroed where invalid so a NaN there cannot leak
    into a weighted sum."""
    weights = valid.astype(jnp.float32)
    return jnp.where(weights > 0, values.astype(jnp.float32), 0.0), weights


# --- regression ----------------------------------------------------------------------------


def regression(
    outputs: jax.Array, batch: Mapping[str, Any], *, mask_value: float = MASK_VALUE
) -> tuple[jax.Array, jax.Array, Metrics]:
    """SteerLM regression: masked MSE averaged over every supervised (example, attribute) cell.

    NeMo's `reg_loss_func` is `Σ M (o - y)² / Σ M` with `M = [y != -100]`; returning
    `loss_i = Σ_a M_ia (o_ia - y_ia)²` and `weight_i = Σ_a M_ia` makes the global ratio exactly
    that mean over all valid cells, however the batch is split.

    Args:
        outputs: head outputs [B, A].
        batch: `labels` [B, A] (`mask_value` = not supervised).
        mask_value: the label meaning "missing".

    Returns:
        loss [B], weight [B] (number of supervised cells), metrics: `mse` (the objective) and
        `mae/<slot>` for every slot, each over its supervised cells.
    """
    o = jnp.asarray(outputs).astype(jnp.float32)
    y = jnp.asarray(batch["labels"]).astype(jnp.float32)
    if o.ndim != 2 or y.shape != o.shape:
        raise ValueError(f"regression needs outputs and labels [B, A], got {o.shape}, {y.shape}")
    cell = y != mask_value  # [B, A]
    err = jnp.where(cell, o - y, 0.0)
    loss = jnp.sum(err * err, axis=-1)
    weight = jnp.sum(cell, axis=-1).astype(jnp.float32)
    # Weighted by the cell count, so the reduced `mse` is the global mean over cells.
    metrics = {"mse": (loss / jnp.maximum(weight, 1.0), weight)}
    for a in range(o.shape[1]):
        metrics[f"mae/{a}"] = _metric(jnp.abs(err[:, a]), cell[:, a])
    return loss, weight, metrics


# --- Bradley-Terry -------------------------------------------------------------------------


class _Pairs(NamedTuple):
    delta: jax.Array  # [B] r(chosen) - r(rejected)
    margin: jax.Array  # [B] m = |strength|, float32
    scored: jax.Array  # [B] bool: the pair enters the loss
    ranked: jax.Array  # [B] bool: a non-tie pair (the one metrics use)
    chosen: jax.Array  # [B] r(chosen)
    rejected: jax.Array  # [B] r(rejected)
    tie: jax.Array  # [B] bool


def _pairs(
    outputs: jax.Array,
    batch: Mapping[str, Any],
    slot: int,
    weights: Sequence[float] | None,
    tie_policy: str,
) -> _Pairs:
    if tie_policy not in TIE_POLICIES:
        raise ConfigError(f"unknown tie_policy {tie_policy!r}; choose from {list(TIE_POLICIES)}")
    outputs = jnp.asarray(outputs)
    if outputs.ndim != 3 or outputs.shape[1] != 2:
        raise ValueError(f"pair losses need outputs [B, 2, A], got {outputs.shape}")
    rewards = scalar_reward(outputs, slot=slot, weights=weights)  # [B, 2] float32
    strength = jnp.asarray(batch["strength"]).astype(jnp.float32)
    if strength.shape != rewards.shape[:1]:
        raise ValueError(f"strength must have shape ({rewards.shape[0]},), got {strength.shape}")
    tie = strength == 0
    # NeMo: label >= 0 -> row 1 chosen, so under "nemo" a tie is won by response_2. Under "drop"
    # ties are masked out, so the same rule serves both.
    row1 = strength >= 0
    chosen = jnp.where(row1, rewards[:, 1], rewards[:, 0])
    rejected = jnp.where(row1, rewards[:, 0], rewards[:, 1])
    ranked = ~tie
    scored = ranked if tie_policy == "drop" else jnp.ones_like(tie)
    return _Pairs(chosen - rejected, jnp.abs(strength), scored, ranked, chosen, rejected, tie)


def _pair_metrics(p: _Pairs) -> Metrics:
    """Accuracy (Δ > 0; Δ == 0 counts as wrong), gap and both rewards over non-tie pairs, and
    `ties`, the fraction of pairs that are ties."""
    return {
        "accuracy": _metric(p.delta > 0, p.ranked),
        "reward_gap": _metric(p.delta, p.ranked),
        "reward_chosen": _metric(p.chosen, p.ranked),
        "reward_rejected": _metric(p.rejected, p.ranked),
        "ties": _metric(p.tie, jnp.ones_like(p.tie)),
    }


def _nll(x: jax.Array) -> jax.Array:
    """-log σ(x) without overflow for large |x|."""
    return -jax.nn.log_sigmoid(x)


def regular_bt(
    outputs: jax.Array,
    batch: Mapping[str, Any],
    *,
    slot: int = HELPFULNESS_SLOT,
    weights: Sequence[float] | None = None,
    tie_policy: str = "drop",
) -> tuple[jax.Array, jax.Array, Metrics]:
    """Regular Bradley-Terry: `-log σ(Δ)`, mean over scored pairs.

    Args:
        outputs: head outputs [B, 2, A]; row 0 = response_1, row 1 = response_2.
        batch: `strength` [B] (signed, see the module docstring).
        slot: the attribute used as the reward (4 = helpfulness).
        weights: [A] merge weights instead of a single slot (see `scalar_reward`).
        tie_policy: "drop" (ties get weight 0) or "nemo" (a tie counts as won by response_2).

    Returns:
        loss [B], weight [B] (1 per scored pair), metrics (see `_pair_metrics`).
    """
    p = _pairs(outputs, batch, slot, weights, tie_policy)
    loss = jnp.where(p.scored, _nll(p.delta), 0.0)
    return loss, p.scored.astype(jnp.float32), _pair_metrics(p)


def margin_bt(
    outputs: jax.Array,
    batch: Mapping[str, Any],
    *,
    slot: int = HELPFULNESS_SLOT,
    weights: Sequence[float] | None = None,
    tie_policy: str = "drop",
) -> tuple[jax.Array, jax.Array, Metrics]:
    """Margin Bradley-Terry (Llama 2): `-log σ(Δ - m)`, mean over scored pairs.

    Arguments and returns as in `regular_bt`; a "nemo" tie uses m = 0 (Regular BT).
    """
    p = _pairs(outputs, batch, slot, weights, tie_policy)
    loss = jnp.where(p.scored, _nll(p.delta - p.margin), 0.0)
    return loss, p.scored.astype(jnp.float32), _pair_metrics(p)


def scaled_bt(
    outputs: jax.Array,
    batch: Mapping[str, Any],
    *,
    slot: int = HELPFULNESS_SLOT,
    weights: Sequence[float] | None = None,
    tie_policy: str = "drop",
    normalization: str = "pairs",
) -> tuple[jax.Array, jax.Array, Metrics]:
    """Scaled Bradley-Terry (HelpSteer2-Preference): `-m log σ(Δ)`.

    Args:
        outputs, batch, slot, weights, tie_policy: as in `regular_bt`. A "nemo" tie has m = 0,
            so it adds zero loss but still counts in the "pairs" denominator, as in NeMo.
        normalization: "pairs" (NeMo: weight 1 per scored pair, so the loss scale grows with
            mean m) or "sum_m" (weight m: `Σ m·(-log σ(Δ)) / Σ m`).

    Returns:
        loss [B], weight [B], metrics (see `_pair_metrics`).
    """
    if normalization not in NORMALIZATIONS:
        raise ConfigError(
            f"unknown normalization {normalization!r}; choose from {list(NORMALIZATIONS)}"
        )
    p = _pairs(outputs, batch, slot, weights, tie_policy)
    loss = jnp.where(p.scored, p.margin * _nll(p.delta), 0.0)
    weight = p.scored.astype(jnp.float32)
    if normalization == "sum_m":
        weight = weight * p.margin
    return loss, weight, _pair_metrics(p)
