"""A diverging run stops with one line naming the step and the last good checkpoint, which it
keeps, and never checkpoints a non-finite state."""

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO


def _run(workdir, *overrides):
    cmd = [
        sys.executable, str(REPO / "experiments" / "run.py"), "--workdir", str(workdir),
        "--config", str(REPO / "experiments" / "configs" / "rm_regression.py") + ":smoke",
        "--config.optim.lr=1e30", "--config.num_steps=12", "--config.checkpoint_every=2",
        "--config.eval_every=100", "--config.progress=False", *overrides,
    ]  # fmt: skip
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.parametrize("log_every", [1, 100])
def test_non_finite_state_is_never_checkpointed(tmp_path, log_every):
    """lr 1e30 blows the parameters up after step 2, and step 3's loss is not finite. The
    on-device flag names step 3 whether it is read at the next log step (every step) or at the
    next save (logging rarely)."""
    workdir = tmp_path / "run"
    r = _run(workdir, f"--config.log_every={log_every}")
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, r.stderr
    assert "step 3: the loss or the gradient norm is not finite" in errors[0], r.stderr
    assert f"last good checkpoint: {workdir}/checkpoints step 2 (kept" in errors[0]
    saved = sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == ["2"], saved
    assert not (workdir / "params").exists()  # nothing non-finite is exported either


def test_nan_policy_skip_counts_then_stops(tmp_path):
    """nan_policy=skip applies no update on a non-finite step and goes on; past nan_max_skips
    skips the run stops, and every checkpoint it wrote is finite (restored below)."""
    workdir = tmp_path / "run"
    r = _run(
        workdir, "--config.log_every=1", "--config.nan_policy=skip", "--config.nan_max_skips=3"
    )
    assert r.returncode == 2, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "more than config.nan_max_skips=3" in errors[0], r.stderr
    import json

    import numpy as np

    records = [json.loads(x) for x in open(workdir / "metrics.jsonl")]
    skipped = [r["skipped_steps"] for r in records if r["split"] == "train"]
    assert skipped[:2] == [0, 0] and skipped == sorted(skipped) and 0 < skipped[-1] <= 3
    import orbax.checkpoint as ocp

    for step in (p for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()):
        tree = ocp.StandardCheckpointer().restore(step / "state")
        assert all(np.all(np.isfinite(x)) for x in __import__("jax").tree.leaves(tree["params"]))


def test_train_step_skips_a_non_finite_update():
    import jax
    import jax.numpy as jnp
    import optax

    from nemotron_jax.train.steps import make_train_step

    def apply_fn(params, batch):
        return params["w"] * batch["x"]

    def loss_fn(outputs, batch):
        return outputs, jnp.ones_like(outputs), {}

    tx = optax.sgd(0.1)
    params = {"w": jnp.ones(())}
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}
    step = jax.jit(make_train_step(apply_fn, loss_fn, tx))
    good, m = step(state, {"x": jnp.array([1.0, 2.0])})
    assert float(m["nonfinite"][0]) == 0
    assert float(good["params"]["w"]) == pytest.approx(1 - 0.1 * 1.5)
    bad, m = step(good, {"x": jnp.array([1.0, jnp.nan])})
    assert float(m["nonfinite"][0]) == 1
    assert float(bad["params"]["w"]) == float(good["params"]["w"]) and int(bad["step"]) == 2
