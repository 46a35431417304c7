"""PPO end to end at smoke size (random tiny policy and reward model): the critic starts as
the reward model, both models train through the one loop with their own optimizers, the run
resumes exactly after a kill, the policy exports to HF and the critic is written beside it,
and bad settings fail at start naming the key."""

import math

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

from experiments.configs import ppo
from nemotron_jax import artifact
from nemotron_jax.errors import ConfigError
from nemotron_jax.experiment import run_experiment
from nemotron_jax.metrics import read_metrics
from nemotron_jax.models.reward import RewardModel, scalar_reward
from nemotron_jax.train import objectives, settings
from tests import tolerances
from tests.conftest import REPO
from tests.test_tools import run_tool
from tests.train.test_loop import _smoke

BASE = dict(num_steps=2, log_every=1, checkpoint_every=1, eval_every=100)
KEYS = ("loss", "policy_loss", "value_loss", "reward_mean", "kl", "value_mean")


@pytest.fixture(scope="module")
def ppo_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("ppo") / "run"
    result = run_experiment(_smoke(ppo, **BASE), str(workdir))
    return workdir, result


def test_trains_both_models_and_writes_policy_and_critic(ppo_run):
    workdir, result = ppo_run
    rows = {r["step"]: r for r in read_metrics(str(workdir), "train")}
    assert sorted(rows) == [1, 2]
    for row in rows.values():
        for key in KEYS + ("clip_fraction", "value_clip_fraction", "rollout_value_mean"):
            assert math.isfinite(row[key]), (key, row)
    assert {"reward_mean", "win_rate_vs_reference", "kl", "response_length"} <= set(result)
    policy = artifact.load(str(workdir / "params"), restore=False)
    critic = artifact.load(str(workdir / "critic"), restore=False)
    assert (policy.kind, critic.kind) == ("causal_lm", "reward_model")
    r = run_tool(
        "convert_to_hf.py", "--ckpt", workdir / "params", "--out", workdir / "hf",
        "--kind", "causal_lm",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert (workdir / "hf" / "config.json").exists()


def test_critic_starts_as_the_reward_model_and_each_model_has_its_own_optimizer(ppo_run):
    workdir, _ = ppo_run
    config = _smoke(ppo, **BASE)
    rm_path = workdir / "random_models" / "reward_model"
    with config.unlocked():
        config.init_from = str(workdir / "random_models" / "policy")
        config.rm_from = str(rm_path)
    objective = objectives.build(config)
    params = jax.jit(lambda: nn.unbox(objective.init(jax.random.PRNGKey(1))))()
    shardings = jax.tree.map(lambda x: x.sharding, params)
    params = objective.load_init(config.init_from, params, shardings)
    rm = artifact.load(str(rm_path), kind="reward_model")

    tokens = np.array([[5, 9, 11, 3, 7, 0], [4, 4, 8, 0, 0, 0]], np.int32)
    mask = (np.arange(6)[None] < np.array([[5], [3]])).astype(np.int32)
    values = objective.module.apply(
        {"params": params}, tokens, attention_mask=mask, method="values"
    )
    score = scalar_reward(
        RewardModel(rm.config, rm.num_attributes).apply(
            {"params": rm.params}, tokens, attention_mask=mask
        ),
        slot=config.rm_slot,
    )
    # values[:, t] is the head at t - 1: the value after the last real token is the RM's score.
    last = mask.sum(-1)
    got = np.asarray(values)[np.arange(2), last]
    np.testing.assert_allclose(got, np.asarray(score), atol=tolerances.LOGITS_F32, rtol=0)

    # One optimizer per model: the policy's update does not depend on the critic's gradients
    # (not even through a shared clipping norm), and the critic's does.
    tx = objective.make_optimizer(10)
    policy_grads = jax.tree.map(lambda x: np.full(x.shape, 0.01, x.dtype), params["policy"])

    def second_update(critic_value):
        grads = {
            "policy": policy_grads,
            "critic": jax.tree.map(lambda x: np.full(x.shape, critic_value, x.dtype),
                                   params["critic"]),
        }  # fmt: skip
        _, state = tx.update(grads, tx.init(params), params)  # step 0 of the warm-up: rate 0
        return tx.update(grads, state, params)[0]

    small, large = second_update(0.0), second_update(50.0)
    for a, b in zip(
        jax.tree.leaves(small["policy"]), jax.tree.leaves(large["policy"]), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert float(optax.tree.norm(jax.tree.map(lambda a, b: a - b, small["critic"],
                                              large["critic"]))) > 0  # fmt: skip


@pytest.mark.slow
def test_kill_then_resume_is_exact(tmp_path):
    from tests.train.test_preemption import kill_then_resume

    config = str(REPO / "experiments" / "configs" / "ppo.py") + ":smoke"
    resumed, straight, killed_at = kill_then_resume(
        tmp_path,
        config,
        lambda n: _smoke(ppo, num_steps=n, log_every=1, checkpoint_every=2, eval_every=100000),
    )
    assert killed_at >= 2 and sorted(resumed) == list(range(1, killed_at + 3))
    for step in resumed:
        for key in KEYS:
            tol = tolerances.SHARDED_F32 * max(1.0, abs(straight[step][key]))
            assert abs(resumed[step][key] - straight[step][key]) <= tol, (step, key)


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"rm_from": ""}, r"config.rm_from is empty: PPO needs a reward model"),
        ({"rl.beta": -0.1}, r"config.rl.beta is -0.1; it must be >= 0"),
        ({"rl.clip_eps": 1.5}, r"config.rl.clip_eps is 1.5; it must be < 1"),
        ({"rl.lam": 1.5}, r"config.rl.lam is 1.5; it must be <= 1"),
        ({"rl.advantage": "rloo"}, r"config.rl.advantage is 'rloo' with config.objective 'ppo'"),
        ({"critic_optim.lr": 0.0}, r"config.critic_optim.lr is 0.0; it must be > 0"),
        ({"rl.epochs": 0}, r"config.rl.epochs is 0; it must be >= 1"),
    ],
)
def test_bad_settings_fail_at_start(changes, message):
    with pytest.raises(ConfigError, match=message):
        settings.check(_smoke(ppo, **changes))
