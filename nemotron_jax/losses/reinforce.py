"""REINFORCE with a leave-one-out (RLOO) baseline, as in NeMo-Aligner (spec §4.2), with the
TRL RLOO variants (spec §6.2) as options.

The pieces, in the order a rollout step uses them:

1. `token_kl` / `sequence_kl`: KL(pi || pi_ref) estimated on the sampled response tokens.
   NeMo: |k1| per token (`use_absolute_kl: True`), masked mean over the response.
   TRL: signed k1, summed over the response.
2. `reinforce_advantages`: KL-shaped reward R - beta * KL, its leave-one-out baseline
   (`rloo_baseline`) and the advantage. NeMo: beta = `initial_policy_kl_penalty` (0.01), only
   EOS-terminated siblings in the baseline. TRL: every sibling.
   `group_normalized_advantages` instead: GRPO's (R - mean_K R) / (std_K R + eps).
3. `reinforce`: the policy-gradient loss under the contract of `nemotron_jax.losses`
   (objective = sum(loss) / sum(weight)): plain -A * log pi(y) (NeMo REINFORCE: no ratio, no
   clipping, no value network, no entropy bonus), or with `clip_eps` the clipped surrogate
   per token, max(-A r_t, -A clip(r_t, 1 - eps, 1 + eps)), r_t = pi / pi_old (PPO, GRPO); and
   optionally the KL as a loss term (`kl_loss_coef` * k3 per token, GRPO) instead of in the
   reward.

PPO (`ppo`) has a critic instead of a group baseline: per-token rewards (`token_rewards`:
-beta * KL_t, plus the score on the last token), GAE advantages and returns (`gae`), whitened
over the batch (`whiten`), the clipped surrogate per token (`clipped_policy_terms`) and the
critic's clipped value loss (`clipped_value_terms`).

REINFORCE, RLOO, GRPO and PPO are configurations of these pieces (`rl.advantage`,
`rl.clip_eps`, `rl.kl_in`; experiments/configs/reinforce.py, grpo.py and ppo.py).

All functions are pure, return float32 and are jit-friendly once their string / float options
are bound (they are static).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from nemotron_jax.errors import ConfigError
from nemotron_jax.losses.lm import token_logprobs

Metrics = dict[str, tuple[jax.Array, jax.Array]]

KL_ESTIMATORS = ("abs_k1", "k1", "k3")
KL_REDUCTIONS = ("mean", "sum")
REINFORCE_NORMALIZATIONS = ("sequence", "token")
# What a response without EOS (cut at max_new_tokens) contributes to the loss.
TRUNCATED_POLICIES = ("zero_loss", "keep")
# rloo: leave-one-out baseline | group_norm: GRPO | gae: per-token GAE(gamma, lambda) from a
# critic (PPO).
ADVANTAGES = ("rloo", "group_norm", "gae")
# Where the KL penalty goes: reward (R - beta * KL, NeMo, TRL RLOO) | loss (beta * k3 per token
# as a loss term, GRPO).
KL_PLACEMENTS = ("reward", "loss")
POLICY_LOSSES = ("plain", "clipped")  # -A log pi | the clipped ratio surrogate
GROUP_NORM_EPS = 1e-4  # TRL GRPO's epsilon under the std


def _check_option(kind: str, value: Any, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ConfigError(f"unknown {kind} {value!r}; valid: {list(valid)}")


def _f32(x: Any) -> jax.Array:
    return jnp.asarray(x).astype(jnp.float32)


def token_kl(logp: jax.Array, ref_logp: jax.Array, estimator: str) -> jax.Array:
    """Per-token estimate of KL(pi || pi_ref) from the log-probs of the sampled tokens.

    With r = ref_logp - logp = log(pi_ref / pi) at the sampled token:

    - "k1": logp - ref_logp = -r (unbiased, can be negative; TRL RLOO).
    - "abs_k1": |logp - ref_logp| (NeMo-Aligner's default, `use_absolute_kl: True`; NeMo's
      `use_absolute_kl: False` is "k1").
    - "k3": exp(r) - 1 - r (Schulman's low-variance, non-negative, unbiased estimator).

    Args:
        logp: [B, T] log pi(y_t) of the sampled tokens.
        ref_logp: [B, T] log pi_ref(y_t) of the same tokens.
        estimator: one of `KL_ESTIMATORS`.

    Returns:
        [B, T] float32 (no masking: padding positions hold whatever the inputs give).
    """
    _check_option("KL estimator", estimator, KL_ESTIMATORS)
    logp, ref_logp = _f32(logp), _f32(ref_logp)
    if logp.shape != ref_logp.shape:
        raise ValueError(f"logp {logp.shape} and ref_logp {ref_logp.shape} differ in shape")
    k1 = logp - ref_logp
    if estimator == "k1":
        return k1
    if estimator == "abs_k1":
        return jnp.abs(k1)
    r = -k1
    return jnp.expm1(r) - r  # exp(r) - 1 - r; >= 0 after rounding too, since expm1(r) >= r


def sequence_kl(
    logp: jax.Array,
    ref_logp: jax.Array,
    mask: jax.Array,
    estimator: str = "abs_k1",
    reduce: str = "mean",
) -> jax.Array:
    """Per-sequence KL estimate: `token_kl` reduced over the response tokens.

    Args:
        logp, ref_logp: [B, T] log-probs of the sampled tokens under pi and pi_ref.
        mask: [B, T], nonzero on response tokens (NeMo's mask includes the EOS token).
        estimator: one of `KL_ESTIMATORS` ("abs_k1" is NeMo's default, "k1" TRL's).
        reduce: "mean" over the response tokens (NeMo) or "sum" (TRL).

    Returns:
        [B] float32; 0 for a sequence with an empty mask.
    """
    _check_option("KL reduction", reduce, KL_REDUCTIONS)
    kl = token_kl(logp, ref_logp, estimator)
    mask = jnp.asarray(mask).astype(bool)
    if mask.shape != kl.shape:
        raise ValueError(f"mask {mask.shape} does not match logp {kl.shape}")
    total = jnp.sum(jnp.where(mask, kl, 0.0), axis=-1)
    if reduce == "sum":
        return total
    count = jnp.sum(mask, axis=-1).astype(jnp.float32)
    return total / jnp.maximum(count, 1.0)


def rloo_baseline(rewards: jax.Array, is_end: jax.Array, *, eos_only: bool = True) -> jax.Array:
    """Leave-one-out baseline: for each sample, the mean reward of the OTHER samples of its prompt.

    Args:
        rewards: [P, K] float, K samples for each of P prompts (already KL-shaped).
        is_end: [P, K] bool, True where the response ended with a stop token (EOS).
        eos_only: True (NeMo): only siblings that ended (`is_end`) count, so truncated responses
            are left out of every baseline (they still get one themselves). False (TRL): every
            sibling counts and `is_end` is ignored.

    Returns:
        baseline [P, K] float32. `b_k = sum_{j != k} e_j R_j / sum_{j != k} e_j` with
        e_j = is_end[j] (eos_only) or 1. When fewer than two samples of the prompt count
        (sum_j e_j <= 1, NeMo's condition; never for eos_only=False since K >= 2), every
        sample of the prompt gets its own reward (advantage 0), as NeMo does.

    NeMo quirk, deliberately NOT copied (`ppo_utils.calculate_rloo_baseline`): NeMo computes
    `b_k = sum_{j != k} e_j R_j / (sum_j e_j - 1)`. For an ended sample that is the mean above,
    but for a truncated sample (e_k = 0) the numerator holds all sum_j e_j ended siblings while
    the denominator is still sum_j e_j - 1, inflating its baseline by sum e / (sum e - 1). Here a
    truncated sample's baseline is the true mean of its ended siblings.

    Raises:
        ConfigError: K < 2 (leave-one-out needs at least one sibling).
    """
    rewards = _f32(rewards)
    is_end = jnp.asarray(is_end).astype(bool)
    if rewards.ndim != 2 or is_end.shape != rewards.shape:
        raise ValueError(
            f"rloo_baseline needs rewards and is_end [P, K]; got {rewards.shape}, {is_end.shape}"
        )
    k = rewards.shape[1]
    if k < 2:
        raise ConfigError(
            f"RLOO needs at least 2 samples per prompt (num_rollouts_per_prompt), got K={k}"
        )
    counts = is_end.astype(jnp.float32) if eos_only else jnp.ones_like(rewards)
    # others[j, k] = 1 for j != k: an explicit [P, K, K] sum (K is small), not total - own,
    # so a large reward does not cancel away the others' precision.
    others = 1.0 - jnp.eye(k, dtype=jnp.float32)
    weights = counts[:, :, None] * others  # [P, j, k]
    other_sum = jnp.einsum("pj,pjk->pk", rewards, weights)
    other_count = jnp.sum(weights, axis=1)  # [P, K]
    enough = jnp.sum(counts, axis=1, keepdims=True) > 1.0  # NeMo: sum(e) <= 1 -> advantage 0
    safe = jnp.where(enough, other_count, 1.0)  # enough implies other_count >= 1
    return jnp.where(enough, other_sum / safe, rewards)


def reinforce_advantages(
    rewards: jax.Array,
    kl: jax.Array,
    is_end: jax.Array,
    *,
    beta: float,
    eos_only: bool = True,
) -> dict[str, jax.Array]:
    """KL-shaped rewards, their RLOO baseline and the advantages (NeMo `generate_reinforce_data`).

    Args:
        rewards: [P, K] reward-model scores R (K samples of each of P prompts).
        kl: [P, K] per-sequence KL estimates (`sequence_kl`: NeMo "abs_k1"/"mean", TRL
            "k1"/"sum").
        is_end: [P, K] bool, True where the response ended with EOS.
        beta: KL coefficient >= 0 (NeMo `initial_policy_kl_penalty`, default 0.01; TRL 0.05).
        eos_only: as for `rloo_baseline` (True: NeMo, False: TRL).

    Returns:
        {"shaped": R - beta * KL, "baseline": rloo_baseline(shaped), "advantage": shaped -
        baseline}, each [P, K] float32. No advantage normalisation (neither NeMo nor TRL's
        default does one).

    Raises:
        ConfigError: beta < 0, or K < 2.
    """
    if not isinstance(beta, jax.core.Tracer) and float(beta) < 0:
        raise ConfigError(f"the KL coefficient beta must be >= 0, got {beta}")
    rewards, kl = _f32(rewards), _f32(kl)
    if kl.shape != rewards.shape:
        raise ValueError(f"kl {kl.shape} does not match rewards {rewards.shape}")
    shaped = rewards - beta * kl
    baseline = rloo_baseline(shaped, is_end, eos_only=eos_only)
    return {"shaped": shaped, "baseline": baseline, "advantage": shaped - baseline}


def group_normalized_advantages(rewards: jax.Array, *, eps: float = GROUP_NORM_EPS) -> jax.Array:
    """GRPO's advantages: each sample's reward less its group's mean, over the group's standard
    deviation (unbiased, ddof = 1, as TRL's torch `std`) plus `eps`.

    Args:
        rewards: [P, K] float (already KL-shaped when the KL goes in the reward).

    Returns:
        [P, K] float32. A group whose rewards are all equal (std 0) gets advantage 0, not NaN.

    Raises:
        ConfigError: K < 2 (a group of one has no spread).
    """
    rewards = _f32(rewards)
    if rewards.ndim != 2:
        raise ValueError(f"group_normalized_advantages needs rewards [P, K], got {rewards.shape}")
    if rewards.shape[1] < 2:
        raise ConfigError(
            f"GRPO needs at least 2 samples per prompt (num_rollouts_per_prompt), got "
            f"K={rewards.shape[1]}"
        )
    centred = rewards - jnp.mean(rewards, axis=1, keepdims=True)
    std = jnp.std(rewards, axis=1, keepdims=True, ddof=1)
    return centred / (std + eps)


def policy_advantages(
    rewards: jax.Array,
    kl: jax.Array,
    is_end: jax.Array,
    *,
    beta: float,
    advantage: str = "rloo",
    kl_in: str = "reward",
    eos_only: bool = True,
) -> dict[str, jax.Array]:
    """The advantages of one rollout batch by `advantage` and `kl_in` (module docstring).

    Args:
        rewards, kl, is_end: [P, K], as for `reinforce_advantages`.

    Returns:
        {"shaped", "baseline", "advantage"}, each [P, K] float32: "shaped" is R - beta * KL
        (kl_in "reward") or R (kl_in "loss"); for group_norm "baseline" is the group mean.
    """
    # gae is per token, from a critic's values: `token_rewards` and `gae`, not this.
    _check_option("sequence-level advantage", advantage, ("rloo", "group_norm"))
    _check_option("KL placement", kl_in, KL_PLACEMENTS)
    shaped_beta = beta if kl_in == "reward" else 0.0
    if advantage == "rloo":
        return reinforce_advantages(rewards, kl, is_end, beta=shaped_beta, eos_only=eos_only)
    shaped = _f32(rewards) - shaped_beta * _f32(kl)
    baseline = jnp.broadcast_to(jnp.mean(shaped, axis=1, keepdims=True), shaped.shape)
    return {
        "shaped": shaped,
        "baseline": baseline,
        "advantage": group_normalized_advantages(shaped),
    }


def _masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """[B, T] -> [B]: the mean of x over each row's mask (0 for an empty row)."""
    total = jnp.sum(jnp.where(mask, _f32(x), 0.0), axis=-1)
    return total / jnp.maximum(jnp.sum(mask, axis=-1).astype(jnp.float32), 1.0)


def clipped_policy_terms(
    logp: jax.Array, old_logp: jax.Array, advantage: jax.Array, clip_eps: float
) -> tuple[jax.Array, jax.Array]:
    """PPO's clipped surrogate per token, max(-A r, -A clip(r, 1 - eps, 1 + eps)) with
    r = exp(logp - old_logp).

    Args:
        logp: [B, T] log pi of the sampled tokens (differentiated).
        old_logp: [B, T] the rollout policy's log-probs (constants).
        advantage: [B, T] per token (PPO's GAE) or [B, 1] per sequence (GRPO), constants.
        clip_eps: eps in (0, 1).

    Returns:
        (terms [B, T] float32, clipped [B, T] bool: where the clip cuts the gradient, i.e. the
        ratio has left the range on the side the advantage pushes it to).
    """
    ratio = jnp.exp(_f32(logp) - _f32(old_logp))
    a = _f32(advantage)
    terms = jnp.maximum(-a * ratio, -a * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps))
    clipped = ((a > 0) & (ratio > 1.0 + clip_eps)) | ((a < 0) & (ratio < 1.0 - clip_eps))
    return terms, clipped


def clipped_value_terms(
    values: jax.Array, old_values: jax.Array, returns: jax.Array, clip: float
) -> tuple[jax.Array, jax.Array]:
    """The critic's clipped squared error per token (NeMo-Aligner's critic, PPO2):
    0.5 * max((V - G)^2, (V_old + clip(V - V_old, -c, c) - G)^2).

    Args:
        values: [B, T] the critic's current values (differentiated).
        old_values, returns: [B, T] the rollout's values and GAE returns (constants).
        clip: c > 0 (a value range, in reward units); 0 turns the clip off.

    Returns:
        (terms [B, T] float32, clipped [B, T] bool: where the clipped error is the larger).
    """
    values, old_values, returns = _f32(values), _f32(old_values), _f32(returns)
    plain = jnp.square(values - returns)
    if not clip:
        return 0.5 * plain, jnp.zeros(plain.shape, bool)
    kept = old_values + jnp.clip(values - old_values, -clip, clip)
    cut = jnp.square(kept - returns)
    return 0.5 * jnp.maximum(plain, cut), cut > plain


def token_rewards(scores: jax.Array, kl: jax.Array, mask: jax.Array, *, beta: float) -> jax.Array:
    """PPO's per-token reward (NeMo-Aligner `calculate_ppo_rewards`): -beta * KL_t on every
    response token, plus the reward-model score on the last one.

    Args:
        scores: [B] reward-model scores of the whole responses.
        kl: [B, T] per-token KL estimates (`token_kl`).
        mask: [B, T] nonzero on response tokens; each row's response is one contiguous run.

    Returns:
        [B, T] float32, 0 off the response.
    """
    mask = jnp.asarray(mask).astype(bool)
    t = mask.shape[-1]
    last = t - 1 - jnp.argmax(mask[:, ::-1], axis=-1)  # [B] the last response position
    at_last = (jnp.arange(t)[None, :] == last[:, None]) & jnp.any(mask, axis=-1, keepdims=True)
    return jnp.where(mask, -beta * _f32(kl), 0.0) + jnp.where(at_last, _f32(scores)[:, None], 0.0)


def gae(
    rewards: jax.Array, values: jax.Array, mask: jax.Array, *, gamma: float, lam: float
) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimation over each row's response tokens (NeMo-Aligner
    `calculate_advantages_and_returns`, with the episode ending at the last response token):

        delta_t = r_t + gamma * V_{t+1} - V_t,   A_t = delta_t + gamma * lam * A_{t+1},

    where V_{t+1} and A_{t+1} are 0 past the response's last token.

    Args:
        rewards: [B, T] per-token rewards (`token_rewards`).
        values: [B, T] the critic's value of the state before token t is generated.
        mask: [B, T] nonzero on response tokens (one contiguous run per row, ragged lengths).
        gamma, lam: the discount and GAE's lambda, in [0, 1].

    Returns:
        (advantages, returns = advantages + values), each [B, T] float32, 0 off the response.
    """
    mask = jnp.asarray(mask).astype(jnp.float32)
    rewards, values = _f32(rewards) * mask, _f32(values) * mask

    # Scan from the end; a masked position passes nothing on (mask 0 zeroes the carry).
    def body(carry, x):
        next_value, next_adv = carry
        r, v, m = x
        delta = r + gamma * next_value - v
        adv = (delta + gamma * lam * next_adv) * m
        return (v * m, adv), adv

    zeros = jnp.zeros(rewards.shape[:1], jnp.float32)
    xs = (rewards.T[::-1], values.T[::-1], mask.T[::-1])  # [T, B], last position first
    _, adv = jax.lax.scan(body, (zeros, zeros), xs)
    adv = adv[::-1].T
    return adv, (adv + values) * mask


def whiten(x: jax.Array, mask: jax.Array, eps: float = 1e-8) -> jax.Array:
    """(x - mean) / std over the masked entries of the whole batch (NeMo PPO's
    `normalize_advantages`); 0 off the mask."""
    mask = jnp.asarray(mask).astype(bool)
    x = _f32(x)
    n = jnp.maximum(jnp.sum(mask).astype(jnp.float32), 1.0)
    mean = jnp.sum(jnp.where(mask, x, 0.0)) / n
    var = jnp.sum(jnp.where(mask, jnp.square(x - mean), 0.0)) / n
    return jnp.where(mask, (x - mean) * jax.lax.rsqrt(var + eps), 0.0)


def reinforce(
    outputs: tuple[jax.Array, jax.Array],
    batch: Mapping[str, Any],
    *,
    implementation: str = "chunked",
    normalize: str = "sequence",
    truncated: str = "zero_loss",
    clip_eps: float = 0.0,
    kl_loss_coef: float = 0.0,
) -> tuple[jax.Array, jax.Array, Metrics]:
    """REINFORCE policy-gradient loss -A * log pi(y) (NeMo `megatron_gpt_reinforce_actor`), or
    the clipped surrogate with `clip_eps` > 0 (PPO / GRPO).

    Args:
        outputs: (hidden [B, T, D], lm_head [D, V]), as `Llama.hidden_and_head` returns them
            (exactly as for `sft_fused`).
        batch:
            - "tokens" int [B, T]: prompt + sampled response (+ padding).
            - "response_mask" [B, T]: 1 on generated tokens (EOS included). Same shift as
              `sft`'s `loss_mask`: token t is predicted by position t - 1, so
              `response_mask[:, 0]` is ignored.
            - "advantage" float [B]: per-sequence advantage (`reinforce_advantages`); treated as
              a constant (stop_gradient).
            - "ref_logprobs" float [B, T], optional: log pi_ref(tokens[t]) at t (aligned with
              tokens, so [:, 0] is unused); only for the `kl_abs_k1` metric.
            - "is_end" bool [B], optional: the response ended with EOS (all True if absent).
        implementation: `nemotron_jax.kernels.token_logprobs` implementation ("chunked" on CPU,
            "pallas" on GPUs).
        normalize:
            - "sequence" (NeMo with `micro_batch_size: 1`, every sequence equal weight):
              loss_b = -A_b * mean_t log pi(y_t) over b's response tokens, weight_b = 1 if b has
              any response token, else 0.
            - "token" (one masked mean over every response token of the global batch, i.e.
              NeMo's masked mean over a whole micro-batch): loss_b = -A_b * sum_t log pi(y_t),
              weight_b = the number of b's response tokens.
        truncated: what a response with `is_end` False contributes:
            - "zero_loss" (NeMo): loss 0, weight unchanged, so it still counts in the mean.
              NeMo's actor zeroes the loss of a micro-batch with no ended response; with its
              default micro_batch_size of 1 that is exactly each truncated response.
            - "keep": the full -A * log pi gradient, like an ended response.
        clip_eps: 0 (plain REINFORCE) or the clip range eps in (0, 1): each response token's
            term is max(-A r_t, -A clip(r_t, 1 - eps, 1 + eps)) with r_t = exp(log pi - log
            pi_old) and `batch["old_logprobs"]` [B, T] the rollout policy's log-probs (aligned
            with tokens like "ref_logprobs"). At r_t = 1 its gradient is plain REINFORCE's.
            The terms are reduced over the response as `normalize` says.
        kl_loss_coef: beta of a KL loss term, beta * k3_t = beta * (exp(q_t) - q_t - 1) with
            q_t = log pi_ref - log pi per response token, reduced like the policy terms
            (GRPO); needs "ref_logprobs". 0: none (the KL is in the reward).

    Returns:
        loss [B], weight [B] (objective `sum(loss) / sum(weight)`), and metrics, each
        (values [B], weights [B]):
            - "response_logp": mean log pi per response token (weighted by token count: the
              batch value is the mean over all response tokens).
            - "advantage": A (weight 1 per sequence).
            - "kl_abs_k1" (only with "ref_logprobs"): mean |log pi - log pi_ref| per response
              token with the CURRENT policy's log-probs (weighted by token count).
            - "clip_fraction" (with clip_eps): the share of response tokens whose term the clip
              cut off (A > 0 and r > 1 + eps, or A < 0 and r < 1 - eps), weighted by token count.
            - "kl_k3" (with kl_loss_coef): mean k3 per response token.

    """
    _check_option("REINFORCE normalization", normalize, REINFORCE_NORMALIZATIONS)
    _check_option("truncated-response policy", truncated, TRUNCATED_POLICIES)
    hidden, lm_head = outputs
    tokens = jnp.asarray(batch["tokens"])
    response_mask = jnp.asarray(batch["response_mask"])
    advantage = jax.lax.stop_gradient(_f32(batch["advantage"]))
    b = tokens.shape[0]
    if hidden.shape[:2] != tokens.shape or response_mask.shape != tokens.shape:
        raise ValueError(
            f"reinforce needs hidden [B, T, D], tokens and response_mask [B, T]; got "
            f"{hidden.shape}, {tokens.shape}, {response_mask.shape}"
        )
    if advantage.shape != (b,):
        raise ValueError(f"advantage must be [B] = [{b}], got {advantage.shape}")
    mask = response_mask[:, 1:].astype(bool)  # [B, T-1]
    logp = token_logprobs(hidden[:, :-1], lm_head, tokens[:, 1:].astype(jnp.int32), implementation)
    logp_sum = jnp.sum(jnp.where(mask, logp, 0.0), axis=-1)
    n_tokens = jnp.sum(mask, axis=-1).astype(jnp.float32)
    mean_logp = logp_sum / jnp.maximum(n_tokens, 1.0)
    extra: Metrics = {}
    if clip_eps:
        old = jax.lax.stop_gradient(_f32(batch["old_logprobs"])[:, 1:])
        terms, clipped = clipped_policy_terms(logp, old, advantage[:, None], clip_eps)
        extra["clip_fraction"] = (_masked_mean(clipped, mask), n_tokens)
    else:
        terms = -advantage[:, None] * logp
    if kl_loss_coef:
        q = _f32(batch["ref_logprobs"])[:, 1:] - logp
        k3 = jnp.exp(q) - q - 1.0
        terms = terms + kl_loss_coef * k3
        k3_mean = jnp.sum(jnp.where(mask, k3, 0.0), axis=-1) / jnp.maximum(n_tokens, 1.0)
        extra["kl_k3"] = (jax.lax.stop_gradient(k3_mean), n_tokens)
    terms_sum = jnp.sum(jnp.where(mask, terms, 0.0), axis=-1)
    if normalize == "sequence":
        loss = terms_sum / jnp.maximum(n_tokens, 1.0)
        weight = (n_tokens > 0).astype(jnp.float32)
    else:
        loss = terms_sum
        weight = n_tokens
    if truncated == "zero_loss" and batch.get("is_end") is not None:
        is_end = jnp.asarray(batch["is_end"]).astype(bool)
        if is_end.shape != (b,):
            raise ValueError(f"is_end must be [B] = [{b}], got {is_end.shape}")
        loss = jnp.where(is_end, loss, 0.0)
    metrics: Metrics = {
        "response_logp": (jax.lax.stop_gradient(mean_logp), n_tokens),
        "advantage": (advantage, jnp.ones((b,), jnp.float32)),
    }
    if batch.get("ref_logprobs") is not None:
        ref = _f32(batch["ref_logprobs"])
        if ref.shape != tokens.shape:
            raise ValueError(f"ref_logprobs must be [B, T] = {tokens.shape}, got {ref.shape}")
        kl = sequence_kl(jax.lax.stop_gradient(logp), ref[:, 1:], mask, "abs_k1", "mean")
        metrics["kl_abs_k1"] = (kl, n_tokens)
    return loss, weight, {**metrics, **extra}


def ppo(
    outputs: tuple[tuple[jax.Array, jax.Array], jax.Array],
    batch: Mapping[str, Any],
    *,
    implementation: str = "chunked",
    normalize: str = "token",
    clip_eps: float = 0.2,
    value_clip: float = 0.2,
) -> tuple[jax.Array, jax.Array, Metrics]:
    """PPO's actor and critic losses on one minibatch of a rollout, summed per token: the
    clipped surrogate with per-token (GAE) advantages, plus the clipped value loss. The actor
    and the critic are separate parameter trees, so each gets the gradient of its own term
    only (as NeMo-Aligner's separate actor and critic jobs do).

    Args:
        outputs: ((hidden [B, T, D], lm_head [D, V]), values [B, T]), as
            `ActorCritic.__call__` returns them; values[:, t] is the critic's value of the
            state that generates token t (aligned with tokens; [:, 0] is unused).
        batch:
            - "tokens", "response_mask": as for `reinforce`.
            - "token_advantage" [B, T]: GAE advantages (whitened by the rollout), constants.
            - "returns", "old_values", "old_logprobs" [B, T]: GAE returns, the rollout
              critic's values and the rollout policy's log-probs, aligned with tokens.
            - "ref_logprobs" [B, T], optional: for the `kl_abs_k1` metric.
        normalize: "token" (NeMo PPO: a masked mean over every response token of the batch)
            or "sequence" (each response weighs 1).
        clip_eps: the ratio's clip range in (0, 1).
        value_clip: the value clip range (reward units); 0: no clip.

    Returns:
        loss [B], weight [B] and metrics: "policy_loss", "value_loss", "clip_fraction",
        "value_clip_fraction", "value_mean", "response_logp" (each per response token),
        "kl_abs_k1" with "ref_logprobs".
    """
    _check_option("PPO normalization", normalize, REINFORCE_NORMALIZATIONS)
    (hidden, lm_head), values = outputs
    tokens = jnp.asarray(batch["tokens"])
    response_mask = jnp.asarray(batch["response_mask"])
    if hidden.shape[:2] != tokens.shape or values.shape != tokens.shape:
        raise ValueError(
            f"ppo needs hidden [B, T, D] and values [B, T] of tokens {tokens.shape}; got "
            f"{hidden.shape}, {values.shape}"
        )
    mask = response_mask[:, 1:].astype(bool)  # [B, T-1]
    logp = token_logprobs(hidden[:, :-1], lm_head, tokens[:, 1:].astype(jnp.int32), implementation)
    const = lambda key: jax.lax.stop_gradient(_f32(batch[key])[:, 1:])  # noqa: E731
    policy_terms, clipped = clipped_policy_terms(
        logp, const("old_logprobs"), const("token_advantage"), clip_eps
    )
    value_terms, value_clipped = clipped_value_terms(
        values[:, 1:], const("old_values"), const("returns"), value_clip
    )
    n_tokens = jnp.sum(mask, axis=-1).astype(jnp.float32)
    terms_sum = jnp.sum(jnp.where(mask, policy_terms + value_terms, 0.0), axis=-1)
    if normalize == "sequence":
        loss = terms_sum / jnp.maximum(n_tokens, 1.0)
        weight = (n_tokens > 0).astype(jnp.float32)
    else:
        loss, weight = terms_sum, n_tokens
    per_token = lambda x: (jax.lax.stop_gradient(_masked_mean(x, mask)), n_tokens)  # noqa: E731
    metrics: Metrics = {
        "policy_loss": per_token(policy_terms),
        "value_loss": per_token(value_terms),
        "clip_fraction": per_token(clipped),
        "value_clip_fraction": per_token(value_clipped),
        "value_mean": per_token(values[:, 1:]),
        "response_logp": per_token(logp),
    }
    if batch.get("ref_logprobs") is not None:
        kl = sequence_kl(jax.lax.stop_gradient(logp), const("ref_logprobs"), mask)
        metrics["kl_abs_k1"] = (kl, n_tokens)
    return loss, weight, metrics


__all__ = [
    "ADVANTAGES",
    "KL_ESTIMATORS",
    "KL_PLACEMENTS",
    "POLICY_LOSSES",
    "KL_REDUCTIONS",
    "REINFORCE_NORMALIZATIONS",
    "TRUNCATED_POLICIES",
    "group_normalized_advantages",
    "policy_advantages",
    "reinforce",
    "reinforce_advantages",
    "rloo_baseline",
    "sequence_kl",
    "token_kl",
    "clipped_policy_terms",
    "clipped_value_terms",
    "gae",
    "ppo",
    "token_rewards",
    "whiten",
]
