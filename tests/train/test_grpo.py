"""GRPO, a configuration of the REINFORCE parts, end to end at smoke size (random tiny policy and
reward model): group-normalised advantages, the clipped surrogate against the rollout policy
and the k3 KL loss term through the one loop; bad settings failing at start."""

import math

import pytest

from experiments.configs import grpo
from nemotron_jax.errors import ConfigError
from nemotron_jax.experiment import run_experiment
from nemotron_jax.metrics import read_metrics
from nemotron_jax.train import settings
from tests import tolerances
from tests.train.test_loop import _smoke

BASE = dict(num_steps=2, log_every=1, checkpoint_every=1, eval_every=100)


def _train(workdir):
    return {r["step"]: r for r in read_metrics(str(workdir), "train")}


def test_grpo_runs_end_to_end(tmp_path):
    run_experiment(_smoke(grpo, **BASE), str(tmp_path / "a"))
    a = _train(tmp_path / "a")
    assert sorted(a) == [1, 2]
    for row in a.values():
        for key in ("loss", "reward_mean", "kl", "advantage_mean", "clip_fraction", "kl_k3"):
            assert math.isfinite(row[key]), (key, row)
        # Group-normalised advantages have mean 0 over every group, so over the batch.
        assert abs(row["advantage_mean"]) <= tolerances.SHARDED_F32
        assert 0.0 <= row["clip_fraction"] <= 1.0
    # Exact resume of the rollout source is tested once for all its configurations, after a
    # kill, in tests/train/test_ppo.py.


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"rl.clip_eps": 0.0}, r"config.rl.clip_eps is 0.0; it must be > 0"),
        ({"rl.clip_eps": 1.0}, r"config.rl.clip_eps is 1.0; it must be < 1"),
        ({"rl.num_rollouts_per_prompt": 1}, r"num_rollouts_per_prompt is 1; it must be >= 2"),
        ({"rl.advantage": "vtrace"}, r"config.rl.advantage is 'vtrace'; choose from"),
        ({"rl.advantage": "gae"}, r"config.rl.advantage is 'gae' with config.objective"),
        ({"rl.kl_in": "both"}, r"config.rl.kl_in is 'both'; choose from"),
        ({"rl.policy_loss": "ppo"}, r"config.rl.policy_loss is 'ppo'; choose from"),
    ],
)
def test_bad_settings_fail_at_start(changes, message):
    with pytest.raises(ConfigError, match=message):
        settings.check(_smoke(grpo, **changes))  # what the loop runs before anything else
