"""DPO's three forms against hand-computed values, with and without label smoothing; the regular
form against TRL's sigmoid loss; chosen/rejected from the strength's sign; response log-probs
against the full-logits reference."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nemotron_jax.kernels.logprobs.reference import token_logprobs_reference
from nemotron_jax.losses.dpo import chosen_first, dpo, dpo_pair_loss, response_logprobs
from tests import tolerances

ATOL = tolerances.LOSS_F32


def _close(got, want, atol=ATOL):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want, np.float32), atol=atol, rtol=0)


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


# Summed log-probs of two pairs: Δ/β = (-10 - -12) - (-15 - -14) = 3 and (-5 - -5) - (-5 - -5) = 0.
POLICY_C, POLICY_R = np.array([-10.0, -5.0]), np.array([-15.0, -5.0])
REF_C, REF_R = np.array([-12.0, -5.0]), np.array([-14.0, -5.0])
M = np.array([2.0, 3.0])
BETA = 0.5
DELTA = np.array([1.5, 0.0])  # beta * (3, 0)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("variant", ["regular", "margin", "scaled"])
def test_pair_loss_by_hand(variant, smoothing):
    def smoothed(x):  # -(1-e) log s(x) - e log s(-x)
        return -(1 - smoothing) * _log_sigmoid(x) - smoothing * _log_sigmoid(-x)

    want = {
        "regular": [smoothed(1.5), smoothed(0.0)],
        "margin": [smoothed(1.5 - 2.0), smoothed(0.0 - 3.0)],
        "scaled": [2.0 * smoothed(1.5), 3.0 * smoothed(0.0)],
    }[variant]
    loss, parts = dpo_pair_loss(
        *map(jnp.asarray, (POLICY_C, POLICY_R, REF_C, REF_R, M)),
        beta=BETA,
        variant=variant,
        label_smoothing=smoothing,
    )
    _close(loss, want)
    _close(parts["delta"], DELTA)
    _close(parts["chosen_reward"], BETA * (POLICY_C - REF_C))
    _close(parts["rejected_reward"], BETA * (POLICY_R - REF_R))
    # At Δ = 0 with no margin the loss is log 2 whatever the smoothing.
    if variant == "regular":
        _close(loss[1], math.log(2.0))


def test_regular_equals_trl_sigmoid_loss():
    """TRL 1.16.0, `DPOTrainer` (trl/trainer/dpo_trainer.py, loss_type "sigmoid"):
    chosen_logratios = chosen_logps - ref_chosen_logps (same for rejected),
    delta_score = chosen_logratios - rejected_logratios,
    per_sequence_loss = -F.logsigmoid(self.beta * delta_score). Reproduced in torch."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    pc, pr, rc, rr = (rng.normal(-20, 5, size=16).astype(np.float32) for _ in range(4))
    beta = 0.1
    t = [torch.from_numpy(x) for x in (pc, pr, rc, rr)]
    delta_score = (t[0] - t[2]) - (t[1] - t[3])
    trl = (-torch.nn.functional.logsigmoid(beta * delta_score)).numpy()
    ours, _ = dpo_pair_loss(*map(jnp.asarray, (pc, pr, rc, rr)), jnp.ones(16), beta=beta)
    _close(ours, trl)


def test_chosen_first_follows_strength_sign():
    x = jnp.asarray([[1.0, 2.0], [3.0, 4.0]])
    # strength < 0: response_1 (side 0) is better; > 0: response_2.
    _close(chosen_first(x, jnp.asarray([-2, 3])), [[1.0, 2.0], [4.0, 3.0]])


def _tiny_lm_outputs(tokens):
    """(hidden [2B, T, D], head [D, V]) of a fixed random 'model': hidden = embedding[tokens]."""
    rng = np.random.default_rng(1)
    embed = jnp.asarray(rng.normal(size=(11, 6)), jnp.float32)
    head = jnp.asarray(rng.normal(size=(6, 11)), jnp.float32)
    b, _, t = tokens.shape
    return embed[tokens.reshape(b * 2, t)], head


def test_response_logprobs_equal_full_logits_reference():
    rng = np.random.default_rng(2)
    tokens = jnp.asarray(rng.integers(0, 11, size=(3, 2, 7)), jnp.int32)
    loss_mask = np.zeros((3, 2, 7), np.int32)
    loss_mask[:, 0, 3:6] = 1
    loss_mask[:, 1, 4:7] = 1
    loss_mask[2, 1] = 0  # a side with no target tokens sums to 0
    batch = {"tokens": tokens, "loss_mask": jnp.asarray(loss_mask)}
    hidden, head = _tiny_lm_outputs(tokens)
    summed, counts = response_logprobs((hidden, head), batch, "chunked")

    flat = np.asarray(tokens).reshape(6, 7)
    logp = np.asarray(token_logprobs_reference(hidden[:, :-1] @ head, jnp.asarray(flat[:, 1:])))
    mask = loss_mask.reshape(6, 7)[:, 1:]
    _close(summed, (logp * mask).sum(-1).reshape(3, 2), atol=tolerances.LOGPROBS_F32)
    _close(counts, mask.sum(-1).reshape(3, 2))


def test_dpo_batch_loss_metrics_and_sft_term():
    rng = np.random.default_rng(3)
    tokens = jnp.asarray(rng.integers(0, 11, size=(2, 2, 6)), jnp.int32)
    loss_mask = np.zeros((2, 2, 6), np.int32)
    loss_mask[:, :, 2:] = 1
    outputs = _tiny_lm_outputs(tokens)
    batch = {"tokens": tokens, "loss_mask": jnp.asarray(loss_mask)}
    policy, counts = (np.asarray(x) for x in response_logprobs(outputs, batch, "chunked"))
    reference = policy + np.asarray([[0.5, -0.25], [1.0, 2.0]], np.float32)
    batch |= {"strength": jnp.asarray([-2, 1]), "reference_logprobs": jnp.asarray(reference)}

    loss, weight, metrics = dpo(outputs, batch, beta=1.0, sft_weight=0.5)
    # Pair 0: side 0 chosen; Δ = (-0.5) - (0.25) = -0.75. Pair 1: side 1 chosen; Δ = -2 - -1 = -1.
    delta = np.array([-0.75, -1.0])
    chosen = np.array([policy[0, 0], policy[1, 1]])
    nll = -chosen / np.array([counts[0, 0], counts[1, 1]])
    _close(loss, [-_log_sigmoid(d) for d in delta] + 0.5 * nll, atol=tolerances.LOGPROBS_F32)
    _close(weight, [1.0, 1.0])
    _close(metrics["margin"][0], delta)
    _close(metrics["accuracy"][0], [0.0, 0.0])
    _close(metrics["kl_chosen"][0], [-0.5, -2.0])
    _close(metrics["sft_nll"][0], nll, atol=tolerances.LOGPROBS_F32)
    grads = jax.grad(lambda h: jnp.sum(dpo((h, outputs[1]), batch, beta=1.0)[0]))(outputs[0])
    assert np.all(np.isfinite(np.asarray(grads))) and np.any(np.asarray(grads) != 0)
