"""A workdir belongs to one run: a corrupt newest checkpoint falls back to the newest intact
one (with the losses of an uninterrupted run after it), a changed run-defining field refuses to
resume, allowed changes are recorded, metrics.jsonl holds each step once, and `smoke` with
data=DIR trains on a slice of DIR."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

RUN = REPO / "experiments" / "run.py"


def _run(workdir: Path, config: str = "rm_bt.py:smoke", *overrides: str):
    cmd = [
        sys.executable, str(RUN), "--workdir", str(workdir),
        "--config", str(REPO / "experiments" / "configs" / config),
        "--config.log_every=1", "--config.checkpoint_every=2", "--config.eval_every=100",
        "--config.progress=False", *overrides,
    ]  # fmt: skip
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def _records(workdir: Path) -> list[dict]:
    return [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]


def _losses(workdir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _records(workdir) if r["split"] == "train"}


def _corrupt(step_dir: Path) -> None:
    """Truncates every array data file of a checkpoint step (a partial copy, a full disk)."""
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    assert files
    for p in files:
        with open(p, "r+b") as f:
            f.truncate(10)


@pytest.mark.slow
def test_corrupt_checkpoints_changed_configs_and_metrics(tmp_path):
    reference, run = tmp_path / "reference", tmp_path / "run"
    r = _run(reference, "rm_bt.py:smoke", "--config.num_steps=6")
    assert r.returncode == 0, r.stderr
    want = _losses(reference)

    r = _run(run, "rm_bt.py:smoke", "--config.num_steps=6")
    assert r.returncode == 0, r.stderr
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["4", "6"]

    # A changed loss refuses to resume, listing the key with its old and new value.
    r = _run(run, "rm_bt.py:smoke,loss=margin", "--config.num_steps=6")
    assert r.returncode == 2, r.stderr
    errors = [x for x in r.stderr.splitlines() if x.startswith("error: ")]
    assert len(errors) == 1 and "objective: 'scaled_bt' -> 'margin_bt'" in errors[0], r.stderr
    assert "Traceback" not in r.stderr

    # The newest checkpoint is truncated: it is moved aside (not deleted) with one warning, the
    # run resumes from step 4, and steps 5 and 6 match the uninterrupted run, each logged once.
    _corrupt(ckpts / "6")
    r = _run(run, "rm_bt.py:smoke", "--config.num_steps=6")
    assert r.returncode == 0, r.stderr
    warnings = [x for x in r.stderr.splitlines() if "unreadable" in x]
    assert len(warnings) == 1 and "checkpoint step 6" in warnings[0], r.stderr
    assert "resuming from step 4" in warnings[0]
    assert "Traceback" not in r.stderr, r.stderr
    assert [p.name.split("-")[0] for p in (run / "checkpoints.corrupt").iterdir()] == ["6"]
    assert "resumed from" in r.stdout and "step 4" in r.stdout
    assert _losses(run) == want  # steps 1-4 from the first run, 5-6 recomputed, equal
    train_steps = [rec["step"] for rec in _records(run) if rec["split"] == "train"]
    assert train_steps == sorted(set(train_steps))  # each step once

    # More steps may be asked for, and the change is recorded; config.json keeps the original.
    r = _run(run, "rm_bt.py:smoke", "--config.num_steps=8")
    assert r.returncode == 0, r.stderr
    history = [json.loads(x) for x in (run / "config_history.jsonl").read_text().splitlines()]
    assert [h["start_step"] for h in history] == [0, 4, 6]
    assert history[-1]["changed"] == {"num_steps": {"old": 6, "new": 8}}
    assert json.loads((run / "config.json").read_text())["num_steps"] == 6
    assert max(_losses(run)) == 8

    # Every step unreadable: one line naming the directory; nothing is moved.
    for step in (p for p in ckpts.iterdir() if p.name.isdigit()):
        _corrupt(step)
    before = sorted(p.name for p in ckpts.iterdir())
    r = _run(run, "rm_bt.py:smoke", "--config.num_steps=8")
    assert r.returncode == 2, r.stderr
    errors = [x for x in r.stderr.splitlines() if x.startswith("error: ")]
    assert len(errors) == 1 and f"{ckpts}: no checkpoint restores" in errors[0], r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    assert sorted(p.name for p in ckpts.iterdir()) == before


def test_smoke_with_a_data_dir_trains_on_a_slice_of_it(tmp_path):
    import ml_collections

    from nemotron_jax.data.splits import data_dir

    source = data_dir(
        ml_collections.ConfigDict(
            {"source": "synthetic", "synthetic_prompts": 200, "synthetic_seed": 0}
        )
    )
    workdir = tmp_path / "run"
    r = _run(workdir, f"rm_regression.py:smoke,data={source}")
    assert r.returncode == 0, r.stderr
    config = json.loads((workdir / "config.json").read_text())
    assert (config["data"]["source"], config["data"]["dir"]) == ("dir", str(source))
    assert config["data"]["max_rows"] == 200 and config["data"]["tokenizer"] == "synthetic"
    report = json.loads((workdir / "data_report.json").read_text())
    assert report["data_dir"] == str(source) and report["max_rows"] == 200
    # The one-line data summary is on the console.
    assert any(x.startswith("data: ") and "rows read" in x for x in r.stdout.splitlines())
