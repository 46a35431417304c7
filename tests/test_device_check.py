"""benchmarks/device_check.py: its smoke run passes without a GPU, and device kinds map to the
published bf16 peaks used for MFU."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PARTS = ("GPU-only tests", "Attention", "Token log-probs", "Reward-model train step", "Decode")


@pytest.mark.slow
def test_smoke_run_passes_and_reports_every_part():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "benchmarks/device_check.py", "--smoke", "--no-append", "-N", "2"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    section = done.stdout[done.stdout.index("## Device check (smoke), ") :]
    for title in PARTS:
        assert f"### {title}" in section
    assert "FAILED" not in section
    assert "cudnn skipped" in section  # said, not silently left out
    assert "appended to" not in done.stdout


def test_peaks_by_device_kind(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    from device_check import peak_bf16_tflops

    assert peak_bf16_tflops("NVIDIA H100 80GB HBM3") == 989
    assert peak_bf16_tflops("NVIDIA H100 PCIe") == 756
    assert peak_bf16_tflops("NVIDIA H200") == 989
    assert peak_bf16_tflops("NVIDIA A100-SXM4-80GB") == 312
    assert peak_bf16_tflops("NVIDIA L4") == 121
    assert peak_bf16_tflops("NVIDIA B200") == 2250
    assert peak_bf16_tflops("NVIDIA L40S") is None  # not the L4
    assert peak_bf16_tflops("cpu") is None
