"""Host-side metric writing: `workdir/metrics.jsonl` (one JSON object per record) and
TensorBoard event files in `workdir/tensorboard/` (via tensorboardX, no TensorFlow needed)."""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any


class MetricWriter:
    """Appends records to `workdir/metrics.jsonl`. A run resumed at `resume_step` first drops
    the records of later steps (logged after that checkpoint, and about to be logged again), so
    the file holds each step once."""

    def __init__(
        self,
        workdir: str,
        *,
        tensorboard: bool = True,
        resume_step: int | None = None,
        enabled: bool = True,
    ):
        """enabled=False (a multi-process run's processes but the first) writes nothing."""
        self._enabled = enabled
        self._tb = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        path = os.path.join(workdir, "metrics.jsonl")
        if resume_step is not None and os.path.exists(path):
            _truncate_after(path, resume_step)
        self._jsonl = open(path, "a")  # noqa: SIM115
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, split: str, metrics: dict[str, Any]) -> None:
        if not self._enabled:
            return
        values = {k: float(v) for k, v in metrics.items()}
        record = {"step": int(step), "split": split, "time": time.time(), **values}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for name, value in values.items():
                if math.isfinite(value):
                    self._tb.add_scalar(f"{split}/{name}", value, int(step))
            self._tb.flush()

    def close(self) -> None:
        if not self._enabled:
            return
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def _truncate_after(path: str, step: int) -> None:
    """Keeps the records of steps <= `step` (and any line that does not parse, verbatim)."""
    with open(path) as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            if json.loads(line)["step"] > step:
                continue
        except (ValueError, KeyError, TypeError):
            pass
        kept.append(line if line.endswith("\n") else line + "\n")
    if len(kept) != len(lines):
        with open(path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(path + ".tmp", path)


def read_metrics(workdir: str, split: str | None = None) -> list[dict[str, Any]]:
    """Records of `workdir/metrics.jsonl`, optionally of one split ("train", "eval")."""
    path = os.path.join(workdir, "metrics.jsonl")
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [r for r in records if split is None or r["split"] == split]
