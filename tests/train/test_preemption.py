"""SIGTERM during training: the run finishes its step, checkpoints it with the data position,
exits 0 with one line; rerunning resumes it, and the losses equal an uninterrupted run's."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO

RUN = REPO / "experiments" / "run.py"
CONFIG = str(REPO / "experiments" / "configs" / "rm_regression.py") + ":smoke"


def _command(workdir, num_steps):
    return [
        sys.executable, str(RUN), "--workdir", str(workdir), "--config", CONFIG,
        f"--config.num_steps={num_steps}", "--config.log_every=1", "--config.eval_every=100000",
        "--config.checkpoint_every=100000", "--config.progress=False",
    ]  # fmt: skip


def _losses(workdir) -> dict[int, float]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


@pytest.mark.slow
def test_sigterm_checkpoints_the_step_and_resume_matches_an_uninterrupted_run(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    stopped = tmp_path / "stopped"
    proc = subprocess.Popen(
        _command(stopped, 100000), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    metrics = stopped / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 5:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "Traceback" not in err, err
    line = [x for x in err.splitlines() if "stopped after step" in x]
    assert len(line) == 1, err
    saved = sorted(int(p.name) for p in (stopped / "checkpoints").iterdir() if p.name.isdigit())
    assert saved, err
    step = saved[-1]
    assert f"stopped after step {step} of 100000" in line[0]

    # Resume to step + 4 and compare with a run that was never stopped.
    target = step + 4
    resumed = subprocess.run(_command(stopped, target), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {stopped}/checkpoints step {step}" in resumed.stdout
    straight = tmp_path / "straight"
    whole = subprocess.run(_command(straight, target), env=env, capture_output=True, text=True)
    assert whole.returncode == 0, whole.stderr
    got, want = _losses(stopped), _losses(straight)
    for s in range(step + 1, target + 1):
        assert got[s] == want[s], (s, got[s], want[s])


def kill_then_resume(tmp_path, config_arg: str, resumed_config) -> tuple[dict, dict, int]:
    """SIGKILLs a run of `config_arg` (a `<config>.py:<args>` of run.py) once its second
    checkpoint is written, then resumes it in this process with `resumed_config(num_steps)` and
    also runs that config from scratch. Returns (resumed, straight) train rows by step and the
    step the kill left."""
    from nemotron_jax.experiment import run_experiment
    from nemotron_jax.metrics import read_metrics

    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    killed = tmp_path / "killed"
    command = [
        sys.executable, str(RUN), "--workdir", str(killed), "--config", config_arg,
        "--config.num_steps=100000", "--config.log_every=1", "--config.checkpoint_every=2",
        "--config.eval_every=100000", "--config.progress=False",
    ]  # fmt: skip
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    checkpoints, deadline = killed / "checkpoints", time.time() + 300
    saved: list[int] = []
    while time.time() < deadline and proc.poll() is None and len(saved) < 2:
        if checkpoints.exists():
            saved = [int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()]
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    proc.kill()  # SIGKILL: no handler runs, an async save may be half written
    proc.communicate(timeout=60)
    step = max(saved)
    target = step + 2

    def rows(workdir):
        return {r["step"]: r for r in read_metrics(str(workdir), "train")}

    run_experiment(resumed_config(target), str(killed))
    run_experiment(resumed_config(target), str(tmp_path / "straight"))
    return rows(killed), rows(tmp_path / "straight"), step
