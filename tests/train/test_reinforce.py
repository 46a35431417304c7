"""REINFORCE end to end at smoke size: an SFT policy and a reward model trained here, then
rollouts, KL-shaped RLOO advantages and minibatch updates through the one training loop; exact
resume; learning a rule-based reward; bad input failing at start."""

import shutil

import numpy as np
import pytest

from experiments.configs import reinforce, rm_bt, sft
from nemotron_jax import checkpoint
from nemotron_jax.errors import ConfigError
from nemotron_jax.experiment import run_experiment
from nemotron_jax.metrics import read_metrics
from tests import tolerances
from tests.train.test_loop import _smoke


def vowel_fraction(prompts, responses):
    """A rule-based reward for tests: the share of vowels among a response's letters."""
    del prompts
    out = []
    for text in responses:
        letters = [c for c in text.lower() if c.isalpha()]
        out.append(sum(c in "aeiou" for c in letters) / max(1, len(letters)))
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(SFT policy params, reward model params), both tiny and trained for a few steps."""
    root = tmp_path_factory.mktemp("rl_models")
    run_experiment(_smoke(sft, num_steps=4), str(root / "sft"))
    run_experiment(_smoke(rm_bt, "loss=scaled", num_steps=4), str(root / "rm"))
    return str(root / "sft" / "params"), str(root / "rm" / "params")


def _rl(models, **changes):
    policy, rm = models
    return _smoke(reinforce, f"policy={policy},rm={rm}", **changes)


def _train(workdir):
    return {r["step"]: r for r in read_metrics(str(workdir), "train")}


def test_reinforce_runs_with_reward_model(models, tmp_path):
    # The barely trained policy seldom ends within 8 tokens: every sibling in the baseline and
    # truncated responses kept in the loss (TRL's choices), so that the policy moves.
    config = _rl(models, log_every=1, **{"rl.baseline": "rloo_all", "rl.truncated": "keep"})
    result = run_experiment(config, str(tmp_path / "rl"))
    rows = _train(tmp_path / "rl")
    assert sorted(rows) == [1, 2, 3, 4]
    for row in rows.values():
        for key in (
            "loss",
            "reward_mean",
            "reward_std",
            "kl",
            "response_length",
            "eos_rate",
            "advantage_mean",
            "advantage_std",
            "time_generate",
            "time_score",
            "time_policy_logprobs",
            "time_reference_logprobs",
            "time_update",
        ):
            assert np.isfinite(row[key]), key
        assert 0 <= row["eos_rate"] <= 1
        assert 1 <= row["response_length"] <= 8  # smoke max_new_tokens
    # Step 1 samples from the initial policy, which is the reference: the KL is 0 up to the
    # difference between the sampler's cached log-probs and a full forward; after updates not.
    assert rows[1]["kl"] <= tolerances.KV_CACHE_F32
    assert rows[4]["kl"] > 100 * tolerances.KV_CACHE_F32
    for key in ("reward_mean", "reference_reward_mean", "win_rate_vs_reference", "kl"):
        assert key in result
    assert 0 <= result["win_rate_vs_reference"] <= 1
    meta = checkpoint.read_metadata(tmp_path / "rl" / "params")
    assert meta["kind"] == "causal_lm" and meta["objective"] == "reinforce"


def test_sampler_logprobs_equal_recomputed(models, tmp_path):
    """The KL from the sampler's log-probs equals the KL from a second forward pass."""
    base = dict(num_steps=2, log_every=1, eval_every=100)
    run_experiment(_rl(models, **base), str(tmp_path / "a"))
    run_experiment(_rl(models, **base, **{"rl.policy_logprobs": "recompute"}), str(tmp_path / "b"))
    a, b = _train(tmp_path / "a"), _train(tmp_path / "b")
    for step in (1, 2):
        assert abs(a[step]["kl"] - b[step]["kl"]) <= tolerances.KV_CACHE_F32, step
        assert abs(a[step]["loss"] - b[step]["loss"]) <= tolerances.KV_CACHE_F32, step


def test_resume_is_exact(models, tmp_path):
    base = dict(num_steps=4, log_every=1, checkpoint_every=2, eval_every=100)
    run_experiment(_rl(models, **base), str(tmp_path / "a"))
    run_experiment(_rl(models, **{**base, "num_steps": 2}), str(tmp_path / "b"))
    run_experiment(_rl(models, **base), str(tmp_path / "b"))
    a, b = _train(tmp_path / "a"), _train(tmp_path / "b")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        for key in ("loss", "reward_mean", "kl", "response_length"):
            tol = tolerances.SHARDED_F32 * max(1.0, abs(a[step][key]))
            assert abs(a[step][key] - b[step][key]) <= tol, (step, key)


def test_learns_a_rule_based_reward(models, tmp_path):
    policy, _ = models
    c = _smoke(
        reinforce,
        f"policy={policy},reward_fn=tests.train.test_reinforce:vowel_fraction,beta=0.0",
        num_steps=16,
        log_every=1,
        eval_every=100,
        checkpoint_every=100,
    )
    c.optim.lr = 3e-3
    c.rl.prompts_per_step = 8
    # The barely trained policy seldom ends within 8 tokens; with only EOS-terminated siblings
    # in the baseline most advantages would be 0, and NeMo's zero_loss would zero most losses.
    c.rl.baseline = "rloo_all"
    c.rl.truncated = "keep"
    run_experiment(c, str(tmp_path / "rl"))
    rows = _train(tmp_path / "rl")
    first = np.mean([rows[s]["reward_mean"] for s in (1, 2, 3, 4)])
    last = np.mean([rows[s]["reward_mean"] for s in (13, 14, 15, 16)])
    print(f"vowel fraction {first:.3f} -> {last:.3f}")
    assert last > first + 0.05, (first, last)


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"rl.num_rollouts_per_prompt": 1}, "num_rollouts_per_prompt is 1; it must be >= 2"),
        ({"rl.beta": -0.1}, "config.rl.beta is -0.1; it must be >= 0"),
        ({"rl.max_new_tokens": 4000}, "exceeds the model's context of 2048"),
        ({"rl.kl_estimator": "k2"}, "kl_estimator"),
        ({"rl.baseline": "mean"}, "baseline"),
        ({"rl.policy_logprobs": "cached"}, "policy_logprobs"),
        ({"rl.prompts_per_step": 3}, "not a multiple of config.batch_size"),
    ],
)
def test_bad_config_fails_at_start(models, tmp_path, changes, message):
    with pytest.raises(ConfigError, match=message):
        run_experiment(_rl(models, **changes), str(tmp_path / "rl"))


def test_reward_model_with_other_template_is_rejected(models, tmp_path):
    policy, rm = models
    other = tmp_path / "rm_llama3"
    shutil.copytree(rm, other)
    meta = checkpoint.read_metadata(other)
    params = checkpoint.restore_params(other)
    shutil.rmtree(other)
    checkpoint.save_params(other, params, metadata={**meta, "template": "llama3"})
    shutil.copy(f"{rm}/tokenizer.model", other / "tokenizer.model")
    with pytest.raises(ConfigError, match="tokenizer/template"):
        run_experiment(_rl((policy, str(other))), str(tmp_path / "rl"))


def test_needs_exactly_one_reward_source(models, tmp_path):
    policy, _ = models
    with pytest.raises(ConfigError, match="exactly one of config.rm_from"):
        run_experiment(_smoke(reinforce, f"policy={policy}"), str(tmp_path / "rl"))
