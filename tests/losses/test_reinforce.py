"""REINFORCE + RLOO (NeMo-Aligner, spec §4.2; TRL variants, §6.2): KL estimators, leave-one-out
baselines, advantages and the policy-gradient loss, against hand-computed numbers."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nemotron_jax.errors import ConfigError
from nemotron_jax.kernels.logprobs.reference import token_logprobs_reference
from nemotron_jax.losses import (
    LOSSES,
    get_loss,
    group_normalized_advantages,
    policy_advantages,
    reduce_batch,
    reinforce,
    reinforce_advantages,
    rloo_baseline,
    sequence_kl,
    token_kl,
)
from tests import tolerances

ATOL = tolerances.LOSS_F32
LN2, LN3 = math.log(2.0), math.log(3.0)
E = math.e


def _close(got, want, atol=ATOL):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want, np.float32), atol=atol, rtol=0)


# ----------------------------------------------------------------------------------- KL


# (logp, ref_logp) -> (k1, abs_k1, k3), with r = ref - logp and k3 = e^r - 1 - r.
KL_CASES = [
    ((-1.0, -2.0), (1.0, 1.0, 0.36787944117144233)),  # r = -1: e^-1 - 1 + 1 = e^-1
    ((-2.0, -1.0), (-1.0, 1.0, 0.7182818284590451)),  # r = 1: e - 2
    ((-1.5, -1.0), (-0.5, 0.5, 0.14872127070012819)),  # r = 0.5: e^0.5 - 1.5
    ((-0.5, -0.5), (0.0, 0.0, 0.0)),
]


@pytest.mark.parametrize("estimator, column", [("k1", 0), ("abs_k1", 1), ("k3", 2)])
def test_token_kl_hand_values(estimator, column):
    logp = np.array([[c[0][0] for c in KL_CASES]], np.float32)
    ref = np.array([[c[0][1] for c in KL_CASES]], np.float32)
    got = token_kl(logp, ref, estimator)
    assert got.dtype == jnp.float32 and got.shape == (1, 4)
    _close(got, [[c[1][column] for c in KL_CASES]])


def test_token_kl_k3_is_nonnegative():
    # e^r - 1 - r >= 0 for every r, including tiny |r| where it is ~r^2/2.
    ref = np.array([[-4.0, -1e-3, 0.0, 1e-3, 4.0]])
    assert np.all(np.asarray(token_kl(np.zeros((1, 5)), ref, "k3")) >= 0)


def test_sequence_kl_mean_sum_and_padding():
    # Row 0: the first three KL_CASES, then padding whose (9 vs 0) KL must not leak in.
    # Row 1: (-1.5, -1) then (0, 0), then padding. Row 2: empty mask.
    logp = np.array([[-1.0, -2.0, -0.5, 9.0], [-1.5, 0.0, 7.0, 7.0], [3.0, 3.0, 3.0, 3.0]])
    ref = np.array([[-2.0, -1.0, -0.5, 0.0], [-1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]])
    # abs_k1 tokens: row 0 [1, 1, 0], row 1 [0.5, 0].
    _close(sequence_kl(logp, ref, mask), [2 / 3, 0.25, 0.0])  # defaults: NeMo abs_k1, mean
    _close(sequence_kl(logp, ref, mask, "abs_k1", "sum"), [2.0, 0.5, 0.0])
    # k1 tokens: row 0 [1, -1, 0], row 1 [-0.5, 0]  (TRL: k1, sum).
    _close(sequence_kl(logp, ref, mask, "k1", "sum"), [0.0, -0.5, 0.0])
    _close(sequence_kl(logp, ref, mask, "k1", "mean"), [0.0, -0.25, 0.0])
    # k3 tokens: row 0 [e^-1, e - 2, 0], row 1 [e^0.5 - 1.5, 0].
    k3_row0 = math.exp(-1) + E - 2
    _close(sequence_kl(logp, ref, mask, "k3", "sum"), [k3_row0, math.exp(0.5) - 1.5, 0.0])
    _close(sequence_kl(logp, ref, mask, "k3", "mean"), [k3_row0 / 3, (math.exp(0.5) - 1.5) / 2, 0])


def test_kl_bad_options():
    x = np.zeros((1, 2))
    with pytest.raises(ConfigError, match=r"'k2'.*abs_k1.*k1.*k3"):
        token_kl(x, x, "k2")
    with pytest.raises(ConfigError, match=r"'max'.*mean.*sum"):
        sequence_kl(x, x, np.ones((1, 2)), "k1", "max")


# ------------------------------------------------------------------------------ baseline

REWARDS = np.array([[1.0, 2.0, 3.0, 4.0], [0.5, -1.0, 2.0, 0.0]], np.float32)
IS_END = np.array([[True, True, False, True], [False, True, False, False]])


def test_rloo_baseline_eos_only_nemo():
    base = rloo_baseline(REWARDS, IS_END)
    assert base.dtype == jnp.float32 and base.shape == (2, 4)
    # Prompt 0, ended samples 0, 1, 3 (rewards 1, 2, 4):
    #   k0: (2 + 4)/2 = 3; k1: (1 + 4)/2 = 2.5; k3: (1 + 2)/2 = 1.5;
    #   k2 is truncated: mean of all ended siblings (1 + 2 + 4)/3 = 7/3 (NeMo would divide by
    #   sum(e) - 1 = 2 and give 3.5).
    # Prompt 1: only one ended sample (sum e = 1): baseline = own reward, advantage 0 for all.
    _close(base, [[3.0, 2.5, 7 / 3, 1.5], [0.5, -1.0, 2.0, 0.0]])
    _close(REWARDS - base, [[-2.0, -0.5, 2 / 3, 2.5], [0.0, 0.0, 0.0, 0.0]])


def test_rloo_baseline_all_siblings_trl():
    base = rloo_baseline(REWARDS, IS_END, eos_only=False)
    # Prompt 0, total 10: (10 - r_k)/3 = [9/3, 8/3, 7/3, 6/3].
    # Prompt 1, total 1.5: (1.5 - r_k)/3 = [1/3, 2.5/3, -0.5/3, 1.5/3].
    _close(base, [[3.0, 8 / 3, 7 / 3, 2.0], [1 / 3, 2.5 / 3, -0.5 / 3, 0.5]])


def test_rloo_baseline_edge_cases():
    # No sample ended: advantage 0. K = 2, both ended: each sample's baseline is the other.
    _close(rloo_baseline(np.array([[5.0, -3.0, 1.0]]), np.zeros((1, 3), bool)), [[5.0, -3.0, 1]])
    _close(rloo_baseline(np.array([[1.0, 3.0]]), np.ones((1, 2), bool)), [[3.0, 1.0]])
    # Two ended and one truncated: the truncated one gets the mean of both, (10 + 20)/2.
    _close(rloo_baseline(np.array([[10.0, 20.0, 0.0]]), np.array([[1, 1, 0]])), [[20, 10, 15]])
    # jit-friendly (eos_only is static).
    jitted = jax.jit(functools.partial(rloo_baseline, eos_only=True))
    _close(jitted(REWARDS, IS_END), rloo_baseline(REWARDS, IS_END))


def test_rloo_baseline_needs_siblings():
    with pytest.raises(ConfigError, match="K=1"):
        rloo_baseline(np.array([[1.0], [2.0]]), np.ones((2, 1), bool))


# ---------------------------------------------------------------------------- advantages


def test_reinforce_advantages_hand_values():
    rewards = np.array([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0]])
    kl = np.array([[10.0, 20.0, 0.0, 50.0], [1.0, 2.0, 3.0, 4.0]])
    is_end = np.array([[True, True, True, True], [True, True, True, False]])
    out = reinforce_advantages(rewards, kl, is_end, beta=0.01)
    assert set(out) == {"shaped", "baseline", "advantage"}
    # Shaped = R - 0.01 KL.
    _close(out["shaped"], [[0.9, 1.8, 3.0, 3.5], [-0.01, -0.02, -0.03, -0.04]])
    # Prompt 0, all ended, total 9.2: (9.2 - s_k)/3 = [8.3/3, 7.4/3, 6.2/3, 5.7/3].
    # Prompt 1, sample 3 truncated: k0 (-0.02 - 0.03)/2, k1 (-0.01 - 0.03)/2,
    #   k2 (-0.01 - 0.02)/2, k3 (-0.01 - 0.02 - 0.03)/3.
    _close(
        out["baseline"],
        [[8.3 / 3, 7.4 / 3, 6.2 / 3, 1.9], [-0.025, -0.02, -0.015, -0.02]],
    )
    _close(
        out["advantage"],
        [[0.9 - 8.3 / 3, 1.8 - 7.4 / 3, 3.0 - 6.2 / 3, 1.6], [0.015, 0.0, -0.015, -0.02]],
    )
    # TRL-style: every sibling counts; prompt 1 sample 3 gets (-0.06)/3 = -0.02 too, but the
    # others now include it: k0 (-0.02 - 0.03 - 0.04)/3 = -0.03.
    trl = reinforce_advantages(rewards, kl, is_end, beta=0.01, eos_only=False)
    _close(trl["baseline"][1], [-0.03, -0.08 / 3, -0.07 / 3, -0.02])
    # beta = 0: shaped rewards are the rewards.
    _close(reinforce_advantages(rewards, kl, is_end, beta=0.0)["shaped"], rewards)


def test_reinforce_advantages_bad_beta_and_jit():
    z = np.zeros((1, 2))
    with pytest.raises(ConfigError, match="beta"):
        reinforce_advantages(z, z, np.ones((1, 2), bool), beta=-0.01)
    fn = jax.jit(functools.partial(reinforce_advantages, beta=0.01))
    out = fn(np.array([[1.0, 3.0]]), np.array([[100.0, 0.0]]), np.ones((1, 2), bool))
    _close(out["advantage"], [[-3.0, 3.0]])  # shaped [0, 3]: advantages 0 - 3, 3 - 0


# ---------------------------------------------------------------------------------- loss

# V = 3, D = 3, lm_head = I, so the logits are the hidden states. Two kinds of rows:
# U = [0, 0, 0]: log p(any) = -ln 3.  H = [0, ln 2, 0]: log p(1) = -ln 2, log p(0 or 2) = -2 ln 2.
U = [0.0, 0.0, 0.0]
H = [0.0, LN2, 0.0]
JUNK = [5.0, -5.0, 1.0]  # positions whose prediction is not a response token
HIDDEN = np.array(
    [
        # seq 0: prompt 0-1, response 2-4 (EOS-terminated): targets tok[2]=0 (U), tok[3]=1 (H),
        # tok[4]=0 (H): log p = [-ln3, -ln2, -2ln2].
        [JUNK, U, H, H, JUNK],
        # seq 1: response 1-2, then padding: tok[1]=1 (H), tok[2]=2 (U): [-ln2, -ln3].
        [H, U, JUNK, JUNK, JUNK],
        # seq 2: truncated response 1-4: tok 0 (U), 1 (U), 2 (H), 1 (H): [-ln3, -ln3, -2ln2, -ln2].
        [U, U, H, H, JUNK],
        # seq 3: no response token (mask[0] is ignored).
        [JUNK, JUNK, JUNK, JUNK, JUNK],
    ],
    np.float32,
)
TOKENS = np.array([[2, 2, 0, 1, 0], [0, 1, 2, 0, 0], [1, 0, 1, 2, 1], [1, 1, 1, 1, 1]])
RESPONSE_MASK = np.array([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0], [0, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
# Per-token log-probs of the response tokens, by hand.
TOKEN_LOGP = [[-LN3, -LN2, -2 * LN2], [-LN2, -LN3], [-LN3, -LN3, -2 * LN2, -LN2], []]
ADVANTAGE = np.array([0.5, -0.5, 0.25, 3.0], np.float32)


def _batch(**extra):
    return {"tokens": TOKENS, "response_mask": RESPONSE_MASK, "advantage": ADVANTAGE, **extra}


def _outputs():
    return jnp.asarray(HIDDEN), jnp.eye(3, dtype=jnp.float32)


@pytest.mark.parametrize("impl", ["chunked", "reference"])
def test_reinforce_sequence_normalisation_hand_values(impl):
    loss, weight, metrics = reinforce(_outputs(), _batch(), implementation=impl)
    # loss_b = -A_b * mean_t log p: seq 0 sum -(ln3 + 3ln2) = -ln 24 over 3 tokens,
    # seq 1 -ln 6 over 2, seq 2 -(2ln3 + 3ln2) = -ln 72 over 4.
    want = [0.5 * math.log(24) / 3, -0.5 * math.log(6) / 2, 0.25 * math.log(72) / 4, 0.0]
    _close(loss, want)
    _close(weight, [1.0, 1.0, 1.0, 0.0])
    # No is_end given, so every response counts as ended. NeMo with micro_batch_size 1: the mean
    # over sequences of each sequence's masked mean of -log p * A (the empty sequence is no
    # micro-batch at all).
    nemo = np.mean([-ADVANTAGE[b] * np.mean(TOKEN_LOGP[b]) for b in range(3)])
    means = reduce_batch(loss, weight, metrics)
    _close(means["loss"], nemo)
    _close(means["loss"], sum(want) / 3)
    # Metrics: mean logp per response token (token-weighted), advantage per sequence.
    _close(metrics["response_logp"][0], [-math.log(24) / 3, -math.log(6) / 2, -math.log(72) / 4, 0])
    _close(metrics["response_logp"][1], [3, 2, 4, 0])
    _close(means["response_logp"], -(math.log(24) + math.log(6) + math.log(72)) / 9)
    _close(means["advantage"], (0.5 - 0.5 + 0.25 + 3.0) / 4)
    assert "kl_abs_k1" not in metrics


@pytest.mark.parametrize("impl", ["chunked", "reference"])
def test_reinforce_token_normalisation_hand_values(impl):
    out = reinforce(_outputs(), _batch(), implementation=impl, normalize="token")
    loss, weight, _ = out
    want = [0.5 * math.log(24), -0.5 * math.log(6), 0.25 * math.log(72), 0.0]
    _close(loss, want)
    _close(weight, [3.0, 2.0, 4.0, 0.0])
    # NeMo's masked mean of -log p * A over every response token of one micro-batch.
    cells = [-ADVANTAGE[b] * lp for b in range(4) for lp in TOKEN_LOGP[b]]
    objective = reduce_batch(*out)["loss"]
    _close(objective, np.mean(cells))
    _close(objective, sum(want) / 9)


@pytest.mark.parametrize("truncated", ["zero_loss", "keep"])
def test_reinforce_truncated_responses(truncated):
    # Seq 2 did not end. NeMo (micro_batch_size 1): its micro-batch has no ended response, so
    # its loss is 0, and the step's loss is still the mean over all three micro-batches.
    is_end = np.array([True, True, False, True])
    out = reinforce(_outputs(), _batch(is_end=is_end), truncated=truncated)
    loss, weight, _ = out
    seq2 = 0.25 * math.log(72) / 4
    want = [0.5 * math.log(24) / 3, -0.5 * math.log(6) / 2, seq2, 0.0]
    if truncated == "zero_loss":
        want[2] = 0.0
    _close(loss, want)
    _close(weight, [1.0, 1.0, 1.0, 0.0])
    nemo = np.mean(
        [0.0 if not is_end[b] else -ADVANTAGE[b] * np.mean(TOKEN_LOGP[b]) for b in range(3)]
    )
    keep = np.mean([-ADVANTAGE[b] * np.mean(TOKEN_LOGP[b]) for b in range(3)])
    _close(reduce_batch(*out)["loss"], nemo if truncated == "zero_loss" else keep)
    with pytest.raises(ConfigError, match="truncated"):
        reinforce(_outputs(), _batch(is_end=is_end), truncated="drop")


def test_reinforce_kl_metric_uses_current_logp():
    # ref_logprobs aligned with tokens: -1 everywhere (values at t = 0 and outside the response
    # are never read). |log p - (-1)| per response token:
    #   -ln3 -> ln3 - 1, -ln2 -> 1 - ln2, -2ln2 -> 2ln2 - 1.
    a3, a2, a4 = LN3 - 1, 1 - LN2, 2 * LN2 - 1
    ref = np.full(TOKENS.shape, -1.0, np.float32)
    ref[:, 0] = 100.0  # unused position
    out = reinforce(_outputs(), _batch(ref_logprobs=ref))
    metrics = out[2]
    _close(metrics["kl_abs_k1"][0], [(a3 + a2 + a4) / 3, (a2 + a3) / 2, (2 * a3 + a4 + a2) / 4, 0])
    _close(metrics["kl_abs_k1"][1], [3, 2, 4, 0])
    # Token counts over the batch: ln3 - 1 four times, 1 - ln2 three times, 2ln2 - 1 twice.
    _close(reduce_batch(*out)["kl_abs_k1"], (4 * a3 + 3 * a2 + 2 * a4) / 9)


def _random_problem(seed, b=4, t=9, d=16, v=40):
    rng = np.random.default_rng(seed)
    hidden = jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32)
    head = jnp.asarray(rng.normal(size=(d, v)) * 0.3, jnp.float32)
    tokens = rng.integers(0, v, (b, t))
    lengths = rng.integers(1, t - 2, b)  # response starts at 3, lengths differ (some truncated)
    pos = np.arange(t)
    mask = ((pos >= 3) & (pos < 3 + lengths[:, None])).astype(np.int32)
    batch = {"tokens": tokens, "response_mask": mask, "advantage": rng.normal(size=b)}
    return hidden, head, batch


def _reference_objective(hidden, head, batch, normalize):
    """The objective from explicit logits through the float32 oracle (independent of the kernel):
    NeMo's masked mean, per sequence ("sequence") or over all tokens ("token")."""
    logits = jnp.einsum("btd,dv->btv", hidden, head)
    logp = token_logprobs_reference(logits[:, :-1], jnp.asarray(batch["tokens"])[:, 1:])
    mask = jnp.asarray(batch["response_mask"])[:, 1:].astype(jnp.float32)
    adv = jnp.asarray(batch["advantage"], jnp.float32)[:, None]
    cells = -logp * adv * mask
    if normalize == "token":
        return jnp.sum(cells) / jnp.sum(mask)
    return jnp.mean(jnp.sum(cells, 1) / jnp.sum(mask, 1))  # every row has a response here


@pytest.mark.parametrize("normalize", ["sequence", "token"])
def test_reinforce_matches_explicit_logits_reference_values_and_grads(normalize):
    hidden, head, batch = _random_problem(0)
    fn = functools.partial(reinforce, normalize=normalize)

    def objective(h, w):
        return reduce_batch(*fn((h, w), batch))["loss"]

    got = jax.jit(objective)(hidden, head)
    want = _reference_objective(hidden, head, batch, normalize)
    _close(got, want, atol=tolerances.LOGPROBS_F32)
    g = jax.grad(objective, argnums=(0, 1))(hidden, head)
    g_ref = jax.grad(lambda h, w: _reference_objective(h, w, batch, normalize), (0, 1))(
        hidden, head
    )
    for a, r in zip(g, g_ref, strict=True):
        _close(a, r, atol=tolerances.LOGPROBS_F32)


def test_reinforce_advantage_is_a_constant():
    hidden, head, batch = _random_problem(1)

    def objective(adv):
        return reduce_batch(*reinforce((hidden, head), {**batch, "advantage": adv}))["loss"]

    grad = jax.grad(objective)(jnp.asarray(batch["advantage"], jnp.float32))
    assert np.all(np.asarray(grad) == 0.0)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_reinforce_sgd_step_moves_logp_with_the_advantage(sign):
    hidden, head, batch = _random_problem(2, b=1)
    batch = {**batch, "advantage": np.array([sign])}

    def mean_logp(w):  # the sequence's mean response log-prob, via the oracle
        logp = token_logprobs_reference(
            jnp.einsum("btd,dv->btv", hidden, w)[:, :-1], jnp.asarray(batch["tokens"])[:, 1:]
        )
        mask = batch["response_mask"][:, 1:]
        return jnp.sum(logp * mask) / np.sum(mask)

    grad = jax.grad(lambda w: reduce_batch(*reinforce((hidden, w), batch))["loss"])(head)
    before, after = mean_logp(head), mean_logp(head - 0.05 * grad)
    # Positive advantage: the sampled response becomes more likely; negative: less likely.
    assert sign * (float(after) - float(before)) > 1e-4


@pytest.mark.parametrize("normalize", ["sequence", "token"])
def test_reinforce_split_invariance(normalize):
    hidden, head, batch = _random_problem(3, b=6)
    fn = functools.partial(reinforce, normalize=normalize)
    whole = reduce_batch(*fn((hidden, head), batch))["loss"]
    halves = [
        fn((hidden[s], head), {k: np.asarray(v)[s] for k, v in batch.items()})[:2]
        for s in (slice(0, 3), slice(3, 6))
    ]
    split = (halves[0][0].sum() + halves[1][0].sum()) / (halves[0][1].sum() + halves[1][1].sum())
    _close(split, whole)


def test_reinforce_registered_and_validates_options():
    assert LOSSES["reinforce"] is reinforce and get_loss("reinforce") is reinforce
    with pytest.raises(ConfigError, match=r"'mean'.*sequence.*token"):
        reinforce(_outputs(), _batch(), normalize="mean")


# ------------------------------------------------------------- GRPO: group norm, clip, k3


def test_group_normalized_advantages_hand_values_and_std_zero():
    rewards = jnp.asarray([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]])
    # Group 0: mean 2, unbiased std 1; group 1: std 0 -> advantage 0, not NaN.
    want = [[-1.0 / (1 + 1e-4), 0.0, 1.0 / (1 + 1e-4)], [0.0, 0.0, 0.0]]
    _close(group_normalized_advantages(rewards), want)
    with pytest.raises(ConfigError, match="at least 2 samples"):
        group_normalized_advantages(jnp.ones((3, 1)))


def test_policy_advantages_kl_in_reward_or_loss():
    rewards = jnp.asarray([[1.0, 3.0]])
    kl = jnp.asarray([[2.0, 0.0]])
    is_end = jnp.ones((1, 2), bool)
    in_reward = policy_advantages(rewards, kl, is_end, beta=0.5, advantage="group_norm")
    _close(in_reward["shaped"], [[0.0, 3.0]])  # R - 0.5 KL
    _close(in_reward["baseline"], [[1.5, 1.5]])
    s = 3.0 / math.sqrt(2.0)  # unbiased std of (0, 3)
    _close(in_reward["advantage"], [[-1.5 / (s + 1e-4), 1.5 / (s + 1e-4)]])
    in_loss = policy_advantages(rewards, kl, is_end, beta=0.5, advantage="group_norm", kl_in="loss")
    _close(in_loss["shaped"], rewards)  # the KL is left to the loss
    rloo = policy_advantages(rewards, kl, is_end, beta=0.5, advantage="rloo", eos_only=False)
    _close(
        rloo["advantage"],
        reinforce_advantages(rewards, kl, is_end, beta=0.5, eos_only=False)["advantage"],
    )
    with pytest.raises(ConfigError, match="advantage"):
        policy_advantages(rewards, kl, is_end, beta=0.5, advantage="gae")


# Sequence 0's three response tokens get ratios 1 (at), 1.1 (inside eps 0.2) and 1.5 (outside,
# above); sequence 1's two get 0.5 (outside, below) and 0.9 (inside).
RATIOS = {(0, 2): 1.0, (0, 3): 1.1, (0, 4): 1.5, (1, 1): 0.5, (1, 2): 0.9}


def _clip_batch(advantage):
    logp = np.zeros(TOKENS.shape, np.float32)
    flat = [lp for row in TOKEN_LOGP for lp in row]
    positions = [(b, t) for b in range(4) for t in range(1, 5) if RESPONSE_MASK[b, t]]
    for (b, t), lp in zip(positions, flat, strict=True):
        logp[b, t] = lp
    old = logp.copy()
    for (b, t), r in RATIOS.items():
        old[b, t] = logp[b, t] - math.log(r)  # ratio = exp(logp - old) = r
    batch = _batch(old_logprobs=old)
    batch["advantage"] = np.asarray(advantage, np.float32)
    return batch, logp


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_clipped_surrogate_at_inside_and_outside_the_range(sign):
    eps = 0.2
    advantage = [sign, sign, 0.0, 0.0]
    batch, _ = _clip_batch(advantage)
    batch["old_logprobs"][2:] = -100.0  # sequences 2, 3: advantage 0 -> terms 0 however clipped
    loss, weight, metrics = reinforce(_outputs(), batch, clip_eps=eps, truncated="keep")

    def term(a, r):
        return max(-a * r, -a * min(max(r, 1 - eps), 1 + eps))

    s0 = [term(sign, RATIOS[(0, t)]) for t in (2, 3, 4)]
    s1 = [term(sign, RATIOS[(1, t)]) for t in (1, 2)]
    _close(loss[:2], [np.mean(s0), np.mean(s1)], atol=tolerances.LOGPROBS_F32)
    _close(weight, [1.0, 1.0, 1.0, 0.0])
    # By hand for A = +1: 1.5 is clipped to 1.2, 0.5 is not (min picks the unclipped -0.5);
    # for A = -1: 1.5 is not, 0.5 is clipped to 0.8.
    want0 = [-1.0, -1.1, -1.2] if sign > 0 else [1.0, 1.1, 1.5]
    want1 = [-0.5, -0.9] if sign > 0 else [0.8, 0.9]
    _close(loss[:2], [np.mean(want0), np.mean(want1)], atol=tolerances.LOGPROBS_F32)
    # Clipped where the clip cuts the gradient: A > 0 and r > 1 + eps (1.5), or A < 0 and
    # r < 1 - eps (0.5).
    want_clipped = [1 / 3, 0.0] if sign > 0 else [0.0, 1 / 2]
    _close(metrics["clip_fraction"][0][:2], want_clipped)

    # The gradient reaches a token's logit row only where its term is not clipped.
    grad = np.asarray(
        jax.grad(lambda h: jnp.sum(reinforce((h, jnp.eye(3)), batch, clip_eps=eps)[0]))(
            jnp.asarray(HIDDEN)
        )
    )
    frozen = (0, 3) if sign > 0 else (1, 0)  # the row that predicts the clipped token
    assert np.all(grad[frozen] == 0.0)
    live = (0, 2) if sign > 0 else (0, 3)  # predicts the ratio-1.1 / ratio-1.5 token
    assert np.any(grad[live] != 0.0)


def test_clipped_gradient_at_ratio_one_equals_plain_reinforce():
    batch, logp = _clip_batch(ADVANTAGE)
    batch["old_logprobs"] = logp  # on-policy: every ratio is 1

    def objective(h, **options):
        return reduce_batch(*reinforce((h, jnp.eye(3)), batch, **options))["loss"]

    hidden = jnp.asarray(HIDDEN)
    plain = jax.grad(objective)(hidden)
    clipped = jax.grad(functools.partial(objective, clip_eps=0.2))(hidden)
    _close(clipped, plain, atol=tolerances.LOGPROBS_F32)


def test_k3_loss_term_hand_values():
    batch, logp = _clip_batch(np.zeros(4))  # advantage 0: only the KL term remains
    ref = logp.copy()
    ref[0, 2:5] = logp[0, 2:5] + 1.0  # q = ref - logp = 1 on sequence 0: k3 = e - 2
    batch["ref_logprobs"] = ref
    loss, _, metrics = reinforce(_outputs(), batch, kl_loss_coef=0.1, truncated="keep")
    _close(loss, [0.1 * (E - 2.0), 0.0, 0.0, 0.0], atol=tolerances.LOGPROBS_F32)
    _close(metrics["kl_k3"][0], [E - 2.0, 0.0, 0.0, 0.0], atol=tolerances.LOGPROBS_F32)
