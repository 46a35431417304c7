"""DPO end to end at smoke size through the one training loop: step 1 starts at log 2 (the policy
is its reference), the reference pre-pass is stored and reused on resume, resume is exact, the
co-resident reference gives the same losses, the policy exports to HF, and bad settings fail
at start naming the key."""

import math

import pytest

from experiments.configs import dpo
from nemotron_jax.errors import ConfigError
from nemotron_jax.experiment import run_experiment
from nemotron_jax.metrics import read_metrics
from nemotron_jax.train import objectives, settings
from nemotron_jax.train.objectives.dpo import CACHE_DIR
from tests import tolerances
from tests.conftest import REPO
from tests.test_tools import run_tool
from tests.train.test_loop import _smoke

BASE = dict(num_steps=4, log_every=1, checkpoint_every=2, eval_every=4)
KEYS = ("loss", "accuracy", "chosen_reward", "rejected_reward", "margin", "kl_chosen")


def _train(workdir):
    return {r["step"]: r for r in read_metrics(str(workdir), "train")}


def _same(a, b, keys=KEYS):
    assert sorted(a) == sorted(b)
    for step in a:
        for key in keys:
            tol = tolerances.SHARDED_F32 * max(1.0, abs(a[step][key]))
            assert abs(a[step][key] - b[step][key]) <= tol, (step, key, a[step][key], b[step][key])


@pytest.fixture(scope="module")
def scaled_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("dpo") / "scaled"
    result = run_experiment(_smoke(dpo, "variant=scaled", **BASE), str(workdir))
    return workdir, result


def test_runs_from_log_two_and_stores_the_reference_pass(scaled_run):
    workdir, result = scaled_run
    rows = _train(workdir)
    assert sorted(rows) == [1, 2, 3, 4]
    assert all(key in rows[1] for key in KEYS)
    # Step 1: the policy is the reference, so delta = 0 and the loss is mean(m) * log 2 with
    # m = |strength| in 1..3 (scaled); the margin and implicit rewards are 0.
    assert abs(rows[1]["margin"]) <= tolerances.SHARDED_F32
    assert abs(rows[1]["kl_chosen"]) <= tolerances.SHARDED_F32
    assert rows[1]["loss"] >= math.log(2.0) - tolerances.SHARDED_F32
    # After three updates the policy has left its reference (each step is another batch, so
    # the losses of different steps are not comparable).
    assert abs(rows[4]["kl_chosen"]) > 100 * tolerances.SHARDED_F32
    assert {"loss", "accuracy", "margin"} <= set(result)
    stored = list((workdir / CACHE_DIR).glob("*.npz"))
    assert len(stored) == 1 and stored[0].with_suffix(".json").exists()


def test_regular_starts_at_log_two(tmp_path):
    run_experiment(_smoke(dpo, **{**BASE, "num_steps": 1}), str(tmp_path / "r"))
    first = _train(tmp_path / "r")[1]
    assert abs(first["loss"] - math.log(2.0)) <= tolerances.SHARDED_F32


def test_resume_is_exact_and_reuses_the_reference_pass(scaled_run, tmp_path, capsys):
    workdir, _ = scaled_run
    resumed = tmp_path / "resumed"
    run_experiment(_smoke(dpo, "variant=scaled", **{**BASE, "num_steps": 2}), str(resumed))
    capsys.readouterr()
    run_experiment(_smoke(dpo, "variant=scaled", **BASE), str(resumed))
    assert "reference log-probs: reusing" in capsys.readouterr().out
    assert len(list((resumed / CACHE_DIR).glob("*.npz"))) == 1
    _same(_train(workdir), _train(resumed))


@pytest.mark.slow
def test_kill_then_resume_is_exact(tmp_path):
    from tests.train.test_preemption import kill_then_resume

    config = str(REPO / "experiments" / "configs" / "dpo.py") + ":smoke,variant=scaled"
    resumed, straight, killed_at = kill_then_resume(
        tmp_path,
        config,
        lambda n: _smoke(dpo, "variant=scaled", num_steps=n, log_every=1, checkpoint_every=2,
                         eval_every=100000),
    )  # fmt: skip
    assert killed_at >= 2 and sorted(resumed) == list(range(1, killed_at + 3))
    _same(resumed, straight)


def test_resident_reference_gives_the_same_losses(scaled_run, tmp_path):
    workdir, _ = scaled_run
    resident = tmp_path / "resident"
    config = _smoke(dpo, "variant=scaled", **BASE, **{"dpo.reference": "resident"})
    run_experiment(config, str(resident))
    assert not (resident / CACHE_DIR).exists()
    _same(_train(workdir), _train(resident))


def test_policy_exports_to_hf(scaled_run, tmp_path):
    workdir, _ = scaled_run
    r = run_tool(
        "convert_to_hf.py", "--ckpt", workdir / "params", "--out", tmp_path / "hf",
        "--kind", "causal_lm",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "hf" / "config.json").exists()


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"dpo.beta": 0.0}, r"config.dpo.beta is 0.0; it must be > 0"),
        ({"dpo.beta": -1.0}, r"config.dpo.beta is -1.0; it must be > 0"),
        ({"dpo.variant": "ipo"}, r"config.dpo.variant is 'ipo'; choose from"),
        ({"dpo.label_smoothing": 0.5}, r"config.dpo.label_smoothing is 0.5; it must be < 0.5"),
        ({"dpo.reference": "none"}, r"config.dpo.reference is 'none'"),
    ],
)
def test_bad_settings_fail_at_start(changes, message):
    config = _smoke(dpo, **changes)
    with pytest.raises(ConfigError, match=message):  # what the loop runs before any array
        settings.check(config)
        objectives.build(config)


def test_no_reference_fails_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="config.reference_from is empty and so is config.init"):
        run_experiment(_smoke(dpo, init_from=""), str(tmp_path / "bad"))
    assert not (tmp_path / "bad" / "checkpoints").exists()
