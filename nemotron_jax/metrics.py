"""Host-side metric writing: `workdir/metrics.jsonl` (one JSON object per record) and
TensorBoard event files in `workdir/tensorboard/` (via tensorboardX, no TensorFlow needed)."""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any


class MetricWriter:
    def __init__(self, workdir: str, *, tensorboard: bool = True):
        os.makedirs(workdir, exist_ok=True)
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")  # noqa: SIM115
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, split: str, metrics: dict[str, Any]) -> None:
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
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(workdir: str, split: str | None = None) -> list[dict[str, Any]]:
    """Records of `workdir/metrics.jsonl`, optionally of one split ("train", "eval")."""
    path = os.path.join(workdir, "metrics.jsonl")
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [r for r in records if split is None or r["split"] == split]
