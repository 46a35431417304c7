"""Shared by the benchmark scripts: what machine ran them, and appending to docs/benchmarks.md."""

from __future__ import annotations

import os
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def machine() -> str:
    """CPU model, core count and RAM, e.g. "Intel(R) Xeon(R) Processor, 2 cores, 24 GiB RAM"."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in info.splitlines() if "model name" in ln),
        "unknown CPU",
    )
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {ram:.0f} GiB RAM"


def append_section(path: Path, section: str) -> None:
    """Appends a markdown section (starting with its "## " heading) to `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        if f.tell() == 0:
            f.write("# Benchmarks\n")
        f.write("\n" + section.lstrip("\n"))
    print(f"appended to {path}")
