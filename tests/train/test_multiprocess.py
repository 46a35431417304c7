"""Multi-process runs on loopback: JAX's distributed runtime with gloo collectives, each process
a separate `experiments/run.py` with 2 fake CPU devices, as on a multi-host cluster.

- 2 processes x 2 devices log the same losses as 1 process x 4 devices, for a scaled-BT reward
  model and for REINFORCE (the global batch order does not depend on the process count);
- the checkpoint those 2 processes write restores in 1 process on another mesh and continues
  with the uninterrupted run's next loss;
- a killed process, and a bad data row read by one process only, end both processes with a
  non-zero status and a line naming the failing process, well within 60 s.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO
from tests.tolerances import SHARDED_F32

RUN = REPO / "experiments" / "run.py"
CONFIGS = REPO / "experiments" / "configs"
HEARTBEAT_S = 10  # --heartbeat_timeout_s for these runs: a dead process is noticed in 10 s
FAILURE_DEADLINE_S = 60


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(num_processes: int, devices: int, workdir: Path, args, per_process=None):
    """Starts the run's processes; returns their Popen objects (output in workdir.p<i>.log)."""
    port = _free_port()
    procs = []
    for i in range(num_processes):
        env = dict(os.environ)
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
        env["JAX_PLATFORMS"] = "cpu"
        if "JAX_COMPILATION_CACHE_DIR" in env:  # one per process: entries are written in place
            env["JAX_COMPILATION_CACHE_DIR"] += f"-mp{num_processes}-{i}"
        own = per_process[i] if per_process else []  # before `args`: --config comes first
        argv = [sys.executable, str(RUN), "--workdir", str(workdir), *own, *args]
        if num_processes > 1:
            argv += [
                f"--coordinator_address=127.0.0.1:{port}",
                f"--num_processes={num_processes}",
                f"--process_id={i}",
                f"--heartbeat_timeout_s={HEARTBEAT_S}",
            ]
        log = open(f"{workdir}.p{i}.log", "w")  # noqa: SIM115
        procs.append(subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT))
        log.close()
    return procs


def _wait(procs, workdir: Path, timeout: float) -> list[tuple[int, str]]:
    """(exit status, output) of each process; kills all and fails on a hang."""
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            logs = [Path(f"{workdir}.p{i}.log").read_text()[-2000:] for i in range(len(procs))]
            pytest.fail(f"processes still running after {timeout} s:\n" + "\n---\n".join(logs))
    return [(p.returncode, Path(f"{workdir}.p{i}.log").read_text()) for i, p in enumerate(procs)]


def _run(num_processes, devices, workdir, args, timeout=600):
    results = _wait(_start(num_processes, devices, workdir, args), workdir, timeout)
    for i, (rc, out) in enumerate(results):
        assert rc == 0, f"process {i} exited {rc}:\n{out[-3000:]}"
    return results


def _train_records(workdir: Path) -> list[dict]:
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["split"] == "train"]


def _assert_same(a: list[dict], b: list[dict], keys) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for key in keys:
        np.testing.assert_allclose(
            [r[key] for r in a], [r[key] for r in b], rtol=SHARDED_F32, atol=SHARDED_F32,
            err_msg=key,
        )  # fmt: skip


RM = [
    "--config",
    f"{CONFIGS / 'rm_bt.py'}:loss=scaled,smoke",
    "--config.log_every=1",
    "--config.progress=False",
]


def test_reward_model_two_processes_equal_one_and_resume_on_another_mesh(tmp_path):
    two = tmp_path / "two_processes"
    outputs = _run(2, 2, two, [*RM, "--config.num_steps=4", "--config.mesh=(1,4,1)"])
    one = tmp_path / "one_process"
    _run(1, 4, one, [*RM, "--config.num_steps=5", "--config.mesh=(1,4,1)"])

    logged, reference = _train_records(two), _train_records(one)
    assert [r["step"] for r in logged] == [1, 2, 3, 4]  # process 0 alone writes the metrics
    _assert_same(logged, reference[:4], ["loss", "accuracy", "grad_norm"])
    # Only process 0 reports and writes the run's files; orbax saved from both.
    assert "final validation metrics" in outputs[0][1]
    assert "final validation metrics" not in outputs[1][1]
    assert (two / "checkpoints" / "4").is_dir() and (two / "params").is_dir()
    assert len((two / "config_history.jsonl").read_text().splitlines()) == 1

    # Restore the 2-process checkpoint in 1 process on a (data, fsdp, tensor) = (1, 2, 2) mesh.
    resumed = tmp_path / "resumed"
    shutil.copytree(two, resumed)
    out = _run(1, 4, resumed, [*RM, "--config.num_steps=5", "--config.mesh=(1,2,2)"])[0][1]
    assert "resumed from" in out and "step 4" in out
    _assert_same(_train_records(resumed)[4:], reference[4:], ["loss", "accuracy"])


def test_reinforce_two_processes_equal_one(tmp_path):
    args = [
        "--config",
        f"{CONFIGS / 'reinforce.py'}:smoke",
        "--config.num_steps=2",
        "--config.log_every=1",
        "--config.progress=False",
        "--config.validation=False",
        "--config.mesh=(1,4,1)",
        # The random policy never ends a response within 8 tokens: with NeMo's defaults
        # (baseline over ended samples, truncated ones zeroed) every loss would be 0. TRL's
        # choices give every sample a gradient.
        "--config.rl.truncated=keep",
        "--config.rl.baseline=rloo_all",
    ]
    two, one = tmp_path / "two_processes", tmp_path / "one_process"
    _run(2, 2, two, args)
    _run(1, 4, one, args)
    logged, reference = _train_records(two), _train_records(one)
    assert [r["step"] for r in logged] == [1, 2]
    assert all(abs(r["loss"]) > 0 for r in logged)
    _assert_same(
        logged,
        reference,
        ["loss", "grad_norm", "reward_mean", "kl", "advantage_abs_mean", "response_length"],
    )


def _start_training(workdir: Path, args):
    """Starts 2 processes on an endless run; returns them once step 1 is logged."""
    procs = _start(2, 2, workdir, args)
    metrics = workdir / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and metrics.read_text().strip()):  # training has started
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            _wait(procs, workdir, 1)
            pytest.fail("the run did not start:\n" + Path(f"{workdir}.p0.log").read_text())
        time.sleep(0.5)
    return procs


def test_sigterm_to_one_process_stops_both_at_one_step_and_resumes(tmp_path):
    """A scheduler's SIGTERM reaching one host: both agree on a step, checkpoint it, exit 0."""
    workdir = tmp_path / "run"
    endless = [*RM, "--config.num_steps=100000", "--config.mesh=(1,4,1)"]
    procs = _start_training(workdir, [*endless, "--config.checkpoint_every=100000"])
    procs[1].send_signal(signal.SIGTERM)
    (rc0, out0), (rc1, out1) = _wait(procs, workdir, FAILURE_DEADLINE_S)
    assert rc0 == 0 and rc1 == 0, out0[-3000:] + "\n---\n" + out1[-3000:]
    stopped = [int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(stopped) == 1, stopped  # the one step both processes stopped after
    step = stopped[0]
    for out in (out0, out1):
        assert f"SIGTERM: stopped after step {step} of 100000" in out, out[-3000:]
    assert [r["step"] for r in _train_records(workdir)] == list(range(1, step + 1))

    out = _run(1, 4, workdir, [*RM, f"--config.num_steps={step + 1}", "--config.mesh=(1,4,1)"])
    assert f"step {step}" in out[0][1] and "resumed from" in out[0][1]
    assert [r["step"] for r in _train_records(workdir)] == list(range(1, step + 2))


def test_killed_process_ends_the_other(tmp_path):
    workdir = tmp_path / "run"
    procs = _start_training(workdir, [*RM, "--config.num_steps=100000", "--config.mesh=(1,4,1)"])
    procs[1].send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    (rc, out), _ = _wait(procs, workdir, FAILURE_DEADLINE_S)
    assert time.monotonic() - killed_at < FAILURE_DEADLINE_S
    assert rc != 0, out[-3000:]
    # The dead process is named: by our line when a collective broke first, else by the
    # coordination service's message, which ends the process at the same moment.
    ours = "error: process 1 of 2 stopped responding (killed or crashed); ending process 0"
    xla = "tasks are unhealthy (stopped sending heartbeats):\n1"
    assert ours in out or xla in out, out[-3000:]
    assert "error: process 0" not in out, out[-3000:]  # the survivor does not blame itself


@pytest.mark.parametrize("bad", [1, 0])  # 0 hosts the coordination service
def test_bad_row_read_by_one_process_ends_both(tmp_path, bad):
    """Hosts that each read their own copy of the data, one copy with a malformed row."""
    import gzip

    import ml_collections

    from nemotron_jax.data.splits import data_dir

    clean = data_dir(
        ml_collections.ConfigDict(
            {"source": "synthetic", "synthetic_prompts": 200, "synthetic_seed": 0}
        )
    )
    bad_copy = tmp_path / "bad_copy"
    shutil.copytree(clean, bad_copy)
    pref = bad_copy / "preference" / "preference.jsonl.gz"
    with gzip.open(pref, "rb") as f:
        lines = f.read().splitlines(keepends=True)
    with gzip.open(pref, "wb") as f:
        f.writelines(lines[:5] + [b'{"prompt": "x",\n'] + lines[5:])

    workdir = tmp_path / "run"
    config = f"{CONFIGS / 'rm_bt.py'}:loss=scaled,smoke,data="
    copies = [clean, clean]
    copies[bad] = bad_copy
    per_process = [["--config", config + str(copy)] for copy in copies]
    args = ["--config.progress=False", "--config.mesh=(1,4,1)"]
    started = time.monotonic()
    results = _wait(_start(2, 2, workdir, args, per_process), workdir, FAILURE_DEADLINE_S + 60)
    good = 1 - bad
    (rc_bad, out_bad), (rc_good, out_good) = results[bad], results[good]
    assert rc_bad == 2, out_bad[-3000:]
    errors = [line for line in out_bad.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, out_bad[-3000:]
    assert errors[0].startswith(f"error: process {bad} of 2: {pref}, line 6: malformed JSON")
    assert rc_good == 1, out_good[-3000:]
    errors = [line for line in out_good.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, out_good[-3000:]
    assert errors[0].startswith(f"error: process {bad}: {pref}, line 6"), out_good[-3000:]
    assert errors[0].endswith(f"(this is process {good} of 2, stopping)")
    assert "Traceback" not in out_bad + out_good
    assert time.monotonic() - started < FAILURE_DEADLINE_S + 60  # startup included
