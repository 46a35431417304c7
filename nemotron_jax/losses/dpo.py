"""Direct preference optimisation on HelpSteer2-Preference pairs, three ways.

With the policy's and the frozen reference's summed log-probs of each response,

    Δ = β · [(log π − log π_ref)(chosen) − (log π − log π_ref)(rejected)],   m = |strength| · s

(`s` = `strength_scale`, 1 or 1/3, so m is 1..3 or 1/3..1):

| variant | per-pair loss |
|---|---|
| regular | −log σ(Δ) (Rafailov et al., 2023) |
| margin | −log σ(Δ − m) |
| scaled | −m · log σ(Δ) |

The paper (HelpSteer2-Preference, Table 4) names Margin and Scaled DPO after Margin and Scaled
BT without giving their formulas; these are our definitions, the BT losses of
`losses/reward.py` with the implicit reward β·log(π/π_ref) in place of the reward model's score.

Options:
- `label_smoothing` ε (conservative DPO, as TRL's `sigmoid` loss): the preference label is taken
  as flipped with probability ε, so −log σ(x) becomes −(1 − ε)·log σ(x) − ε·log σ(−x), with x the
  argument above (and the scaled variant's factor m outside both terms).
- `sft_weight` w (NeMo's RPO-style SFT term): adds w times the mean negative log-likelihood per
  token of the chosen response.

Same contract as every loss here: per-pair loss and weight (1) [B], so the objective is the
mean over pairs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from nemotron_jax.losses.lm import token_logprobs

VARIANTS = ("regular", "margin", "scaled")
# Where the reference log-probs come from: a pre-pass before training, stored in the workdir
# (no reference model in memory while training) | the frozen reference kept on the devices and
# run on each training batch.
REFERENCE_MODES = ("precomputed", "resident")
Metrics = dict[str, tuple[jax.Array, jax.Array]]


def dpo_pair_loss(
    policy_chosen: jax.Array,
    policy_rejected: jax.Array,
    reference_chosen: jax.Array,
    reference_rejected: jax.Array,
    magnitude: jax.Array,
    *,
    beta: float,
    variant: str = "regular",
    label_smoothing: float = 0.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The module docstring's per-pair loss [B] from summed log-probs [B] and m [B] (float32).

    Returns (loss [B], implicit rewards and Δ: `chosen_reward`, `rejected_reward`, `delta`).
    """
    chosen = beta * (policy_chosen - reference_chosen)
    rejected = beta * (policy_rejected - reference_rejected)
    delta = chosen - rejected
    x = delta - magnitude if variant == "margin" else delta
    loss = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(x)
    if label_smoothing:
        loss = loss - label_smoothing * jax.nn.log_sigmoid(-x)
    if variant == "scaled":
        loss = magnitude * loss
    return loss, {"chosen_reward": chosen, "rejected_reward": rejected, "delta": delta}


def response_logprobs(
    outputs: tuple[jax.Array, jax.Array], batch: Mapping[str, Any], implementation: str
) -> tuple[jax.Array, jax.Array]:
    """(summed log-probs [B, 2], target tokens [B, 2]) of each side's response tokens.

    `outputs` is (hidden [2B, T, D], head [D, V]) for the pair batch's tokens flattened to
    [2B, T]; `batch` has `tokens` and `loss_mask` [B, 2, T] (`loss_mask[t] = 1`: token t is a
    response target, predicted at t - 1). No [2B, T, V] logits are formed.
    """
    hidden, head = outputs
    tokens = jnp.asarray(batch["tokens"])
    b, _, t = tokens.shape
    flat = tokens.reshape(b * 2, t).astype(jnp.int32)
    mask = jnp.asarray(batch["loss_mask"]).reshape(b * 2, t)[:, 1:].astype(bool)
    logp = token_logprobs(hidden[:, :-1], head, flat[:, 1:], implementation)
    summed = jnp.sum(jnp.where(mask, logp, 0.0), axis=-1).reshape(b, 2)
    return summed, jnp.sum(mask, axis=-1).reshape(b, 2).astype(jnp.float32)


def chosen_first(x: jax.Array, strength: jax.Array) -> jax.Array:
    """[B, 2] per-side values reordered to (chosen, rejected): strength < 0 means response_1
    (side 0) is better, > 0 response_2 (ties are dropped from DPO data)."""
    swap = (jnp.asarray(strength) > 0)[:, None]
    return jnp.where(swap, x[:, ::-1], x)


def dpo(
    outputs: tuple[jax.Array, jax.Array],
    batch: Mapping[str, Any],
    *,
    beta: float,
    variant: str = "regular",
    label_smoothing: float = 0.0,
    sft_weight: float = 0.0,
    strength_scale: float = 1.0,
    implementation: str = "chunked",
) -> tuple[jax.Array, jax.Array, Metrics]:
    """DPO on a pair batch: `tokens`, `attention_mask`, `loss_mask` [B, 2, T], `strength` [B]
    (signed preference strength, non-zero) and `reference_logprobs` [B, 2] (the reference's
    summed response log-probs per side, from the pre-pass).

    Metrics: `accuracy` (chosen implicit reward above the rejected one), `chosen_reward`,
    `rejected_reward`, `margin` (their difference), `kl_chosen` (log π − log π_ref summed over
    the chosen response, the sequence-level estimate of the policy's drift on the data) and,
    with `sft_weight`, `sft_nll` (per-token NLL of the chosen response).
    """
    policy, counts = response_logprobs(outputs, batch, implementation)
    strength = jnp.asarray(batch["strength"])
    policy = chosen_first(policy, strength)
    counts = chosen_first(counts, strength)
    reference = chosen_first(jnp.asarray(batch["reference_logprobs"], jnp.float32), strength)
    magnitude = jnp.abs(strength).astype(jnp.float32) * strength_scale
    loss, parts = dpo_pair_loss(
        policy[:, 0],
        policy[:, 1],
        reference[:, 0],
        reference[:, 1],
        magnitude,
        beta=beta,
        variant=variant,
        label_smoothing=label_smoothing,
    )
    ones = jnp.ones_like(loss)
    metrics = {
        "accuracy": ((parts["delta"] > 0).astype(jnp.float32), ones),
        "chosen_reward": (parts["chosen_reward"], ones),
        "rejected_reward": (parts["rejected_reward"], ones),
        "margin": (parts["delta"], ones),
        "kl_chosen": (policy[:, 0] - reference[:, 0], ones),
    }
    if sft_weight:
        nll = -policy[:, 0] / jnp.maximum(counts[:, 0], 1.0)
        loss = loss + sft_weight * nll
        metrics["sft_nll"] = (nll, ones)
    return loss, ones, metrics
