"""PPO's pieces (NeMo-Aligner PPO): per-token rewards, GAE against a plain recursive
implementation on ragged responses, whitening, the clipped value loss at, inside and outside
its range, and the PPO loss (actor + critic) against hand-computed values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nemotron_jax.losses import LOSSES, gae, get_loss, ppo
from nemotron_jax.losses.reinforce import clipped_value_terms, token_rewards, whiten
from tests import tolerances
from tests.losses.test_reinforce import RATIOS, RESPONSE_MASK, _clip_batch, _outputs

ATOL = tolerances.LOSS_F32


def _close(got, want, atol=ATOL):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want, np.float32), atol=atol, rtol=0)


def _recursive_gae(rewards, values, mask, gamma, lam):
    """GAE by the textbook recursion, one response at a time, in Python floats."""
    adv = np.zeros_like(rewards, dtype=np.float64)
    for b in range(rewards.shape[0]):
        positions = [t for t in range(rewards.shape[1]) if mask[b, t]]
        running = 0.0
        for i in reversed(range(len(positions))):
            t = positions[i]
            next_value = values[b, positions[i + 1]] if i + 1 < len(positions) else 0.0
            delta = rewards[b, t] + gamma * next_value - values[b, t]
            running = delta + gamma * lam * running
            adv[b, t] = running
    return adv, (adv + values) * mask


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.5), (1.0, 1.0), (0.99, 0.0)])
def test_gae_matches_the_recursion_on_ragged_responses(gamma, lam):
    rng = np.random.default_rng(0)
    # Responses of lengths 3, 1, 5 and 0, after prompts of different lengths, then padding.
    mask = np.zeros((4, 9), np.int32)
    mask[0, 2:5] = 1
    mask[1, 6:7] = 1
    mask[2, 3:8] = 1
    rewards = rng.normal(size=mask.shape).astype(np.float32)
    values = rng.normal(size=mask.shape).astype(np.float32)
    adv, returns = gae(rewards, values, mask, gamma=gamma, lam=lam)
    want_adv, want_returns = _recursive_gae(rewards, values, mask, gamma, lam)
    _close(adv, want_adv * mask, atol=tolerances.SIMPLE_F32)
    _close(returns, want_returns, atol=tolerances.SIMPLE_F32)
    assert np.all(np.asarray(adv)[mask == 0] == 0.0)


def test_gae_hand_values():
    # One response of 3 tokens, gamma 1, lambda 0.5: delta = r + V' - V.
    rewards = np.array([[0.0, 0.0, 0.0, 1.0]], np.float32)
    values = np.array([[9.0, 0.5, 0.25, 0.75]], np.float32)
    mask = np.array([[0, 1, 1, 1]])
    adv, returns = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    d1, d2, d3 = 0.0 + 0.25 - 0.5, 0.0 + 0.75 - 0.25, 1.0 - 0.75
    a3 = d3
    a2 = d2 + 0.5 * a3
    a1 = d1 + 0.5 * a2
    _close(adv, [[0.0, a1, a2, a3]])
    _close(returns, [[0.0, a1 + 0.5, a2 + 0.25, a3 + 0.75]])


def test_token_rewards_put_the_score_on_the_last_response_token():
    mask = np.array([[0, 1, 1, 1, 0], [0, 0, 1, 0, 0], [0, 0, 0, 0, 0]])
    kl = np.full(mask.shape, 2.0, np.float32)
    got = token_rewards(np.array([5.0, -1.0, 7.0]), kl, mask, beta=0.1)
    _close(got, [[0, -0.2, -0.2, 4.8, 0], [0, 0, -1.2, 0, 0], [0, 0, 0, 0, 0]])


def test_whiten_over_the_masked_entries():
    x = np.array([[9.0, 1.0, 2.0], [3.0, 9.0, 9.0]], np.float32)
    mask = np.array([[0, 1, 1], [1, 0, 0]])
    got = np.asarray(whiten(x, mask))
    vals = np.array([1.0, 2.0, 3.0])
    want = (vals - vals.mean()) / np.sqrt(vals.var() + 1e-8)
    _close(got[mask == 1], want[[0, 1, 2]], atol=tolerances.SIMPLE_F32)
    assert np.all(got[mask == 0] == 0.0)


def test_clipped_value_loss_at_inside_and_outside_the_range():
    clip = 0.2
    old = np.zeros(5, np.float32)
    values = np.array([0.1, 0.2, 0.5, -0.5, 0.5], np.float32)
    returns = np.array([0.0, 0.0, 1.0, 1.0, 0.0], np.float32)
    terms, clipped = clipped_value_terms(values, old, returns, clip)
    # Inside: the clip changes nothing. At the edge: the same. Outside, moving towards the
    # return (0.5 -> 1): the clipped value 0.2 is further from it, so it counts (0.5 * 0.64);
    # moving away (-0.5 from 1): the unclipped error is already the larger (0.5 * 2.25);
    # moving away from 0 (0.5): the unclipped error 0.25 > clipped 0.04.
    _close(terms, [0.005, 0.02, 0.32, 1.125, 0.125])
    assert clipped.tolist() == [False, False, True, False, False]
    terms, clipped = clipped_value_terms(values, old, returns, 0.0)
    _close(terms, 0.5 * (values - returns) ** 2)
    assert not np.any(clipped)


def _ppo_batch():
    batch, logp = _clip_batch(np.zeros(4))
    del batch["advantage"]
    token_adv = np.zeros(logp.shape, np.float32)
    token_adv[0, 2:5] = [1.0, 1.0, -1.0]  # ratios 1.0, 1.1, 1.5
    token_adv[1, 1:3] = [-1.0, 1.0]  # ratios 0.5, 0.9
    values = np.zeros(logp.shape, np.float32)
    values[0, 2:5] = [0.5, 0.5, 0.5]
    batch |= {
        "token_advantage": token_adv,
        "old_values": np.zeros(logp.shape, np.float32),
        "returns": np.ones(logp.shape, np.float32),
    }
    return batch, values


def _term(a, r, eps=0.2):
    return max(-a * r, -a * min(max(r, 1 - eps), 1 + eps))


@pytest.mark.parametrize("normalize", ["token", "sequence"])
def test_ppo_loss_hand_values(normalize):
    batch, values = _ppo_batch()
    (hidden, head) = _outputs()
    loss, weight, metrics = ppo(
        ((hidden, head), jnp.asarray(values)), batch, normalize=normalize, value_clip=0.2
    )
    adv = batch["token_advantage"]
    policy = {
        0: [_term(adv[0, t], RATIOS[(0, t)]) for t in (2, 3, 4)],
        1: [_term(adv[1, t], RATIOS[(1, t)]) for t in (1, 2)],
    }
    # Values 0.5 (from 0, clipped to 0.2) towards the return 1: the clipped error counts,
    # 0.5 * 0.8^2; values 0 on sequence 1: 0.5 * 1.
    value = {0: [0.32] * 3, 1: [0.5, 0.5]}
    for b in (0, 1):
        total = sum(policy[b]) + sum(value[b])
        n = len(policy[b])
        want = total / n if normalize == "sequence" else total
        _close(loss[b], want, atol=tolerances.LOGPROBS_F32)
        _close(weight[b], 1.0 if normalize == "sequence" else n)
        _close(metrics["policy_loss"][0][b], np.mean(policy[b]), atol=tolerances.LOGPROBS_F32)
        _close(metrics["value_loss"][0][b], np.mean(value[b]), atol=tolerances.LOGPROBS_F32)
    _close(metrics["value_clip_fraction"][0][:2], [1.0, 0.0])
    # A = +1 at ratio 1.5 is not there; A = -1 at ratio 1.5 is not clipped (it is the larger
    # loss); A = -1 at ratio 0.5 is: below 1 - eps, pushed further down.
    _close(metrics["clip_fraction"][0][:2], [0.0, 0.5])


def test_ppo_gradients_reach_each_model_only_through_its_own_term():
    batch, values = _ppo_batch()
    (hidden, head) = _outputs()

    def total(h, v):
        loss, weight, _ = ppo(((h, head), v), batch, value_clip=0.0)
        return jnp.sum(loss) / jnp.sum(weight)

    g_hidden, g_values = jax.grad(total, argnums=(0, 1))(hidden, jnp.asarray(values))
    # d/dV of 0.5 (V - G)^2 summed over tokens / n_tokens: (V - G) / n on response tokens.
    n = RESPONSE_MASK[:, 1:].sum()
    want = np.where(RESPONSE_MASK == 1, (values - 1.0) / n, 0.0)
    want[:, 0] = 0.0
    _close(g_values, want)
    # The values leave the policy's gradient unchanged.
    g_hidden_other, _ = jax.grad(total, argnums=(0, 1))(hidden, jnp.asarray(values) + 3.0)
    _close(g_hidden, g_hidden_other)


def test_ppo_registered():
    assert LOSSES["ppo"] is ppo and get_loss("ppo") is ppo
