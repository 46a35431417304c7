"""A diverging run stops with one line naming the step and the last good checkpoint, which it
keeps, and never checkpoints a non-finite state."""

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.parametrize(
    "log_every,caught_by", [(1, "the loss is"), (100, "the parameters are not finite")]
)
def test_non_finite_state_is_never_checkpointed(tmp_path, log_every, caught_by):
    """lr 1e30 blows the parameters up after step 2. Logging every step, the loss check stops
    the run; logging rarely, the check before each save does."""
    workdir = tmp_path / "run"
    cmd = [
        sys.executable, str(REPO / "experiments" / "run.py"), "--workdir", str(workdir),
        "--config", str(REPO / "experiments" / "configs" / "rm_regression.py") + ":smoke",
        "--config.optim.lr=1e30", "--config.num_steps=12", "--config.checkpoint_every=2",
        f"--config.log_every={log_every}", "--config.eval_every=100", "--config.progress=False",
    ]  # fmt: skip
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and caught_by in errors[0], r.stderr
    assert f"last good checkpoint: {workdir}/checkpoints step 2 (kept" in errors[0]
    saved = sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == ["2"], saved
    assert not (workdir / "params").exists()  # nothing non-finite is exported either
