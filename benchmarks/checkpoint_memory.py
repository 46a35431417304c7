"""Peak host memory of streaming checkpoint I/O against the size of what is written.

Run with `python benchmarks/checkpoint_memory.py` (`--help` lists the flags). A params tree of
float32 stacked leaves (default ~2 GiB, 64 MiB per layer slice) is written with
`save_params_streaming`, its data generated slice by slice, then read back slice by slice with
`iter_leaf_slices` (the HF export path) and spot-checked. Each phase reports the process's peak
resident memory (VmHWM, reset through /proc/self/clear_refs) above the baseline measured after
a warm-up save and read, next to the total checkpoint size and the largest slice. Linux only.
A benchmark, not a test: the exit code is 0 unless a read-back slice differs from the source.
"""

from __future__ import annotations

import shutil
import tempfile
import time
import zlib
from pathlib import Path

import jax
import numpy as np

from nemotron_jax import checkpoint
from nemotron_jax.errors import ArgumentParser, cli_main

MIB = 2**20


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def main() -> None:
    ap = ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--mlp", type=int, default=8192)
    ap.add_argument("--dir", default=None, help="where to write (default: a temporary dir)")
    args = ap.parse_args()
    L, D, F = args.layers, args.hidden, args.mlp
    shapes = {  # leaf path -> shape; the "layers" leaves are stacked on axis 0
        ("embed", "embedding"): (4 * D, D),
        ("layers", "mlp", "up", "kernel"): (L, D, F),
        ("layers", "mlp", "down", "kernel"): (L, F, D),
        ("layers", "norm", "scale"): (L, D),
    }
    abstract: dict = {}
    for path, shape in shapes.items():
        node = abstract
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = jax.ShapeDtypeStruct(shape, np.float32)
    total = sum(np.prod(s) * 4 for s in shapes.values())
    largest = max(np.prod(s[1:] if p[0] == "layers" else s) * 4 for p, s in shapes.items())

    # Random (incompressible, like real weights) but cheap: one block, offset per (leaf, layer).
    block = np.random.default_rng(0).standard_normal(largest // 4).astype(np.float32)

    def fill(leaf_path, index):
        shape = shapes[leaf_path][1:] if index is not None else shapes[leaf_path]
        offset = zlib.crc32(repr((leaf_path, index)).encode()) % 1000
        return block[: np.prod(shape)].reshape(shape) + np.float32(offset)

    stacked = [p for p in shapes if p[0] == "layers"]

    def save():
        checkpoint.save_params_streaming(root / "ckpt", abstract, fill, progress=False)

    def read():
        for leaf in stacked:
            for _ in checkpoint.iter_leaf_slices(root / "ckpt", leaf):
                pass  # an exporter writes each slice out here; the previous one is then freed

    root = Path(args.dir or tempfile.mkdtemp(prefix="ckpt_mem_"))
    results = []
    try:
        # Warm up both paths (thread pools, tensorstore contexts) so they are in the baseline.
        warm = {"layers": {"w": jax.ShapeDtypeStruct((2, 4), np.float32)}}
        zeros = lambda p, i: np.zeros((4,), np.float32)
        checkpoint.save_params_streaming(root / "warmup", warm, zeros, progress=False)
        checkpoint.read_leaf(root / "warmup", "layers/w", 1)
        base = _status("VmRSS")
        for name, phase in (("streaming save", save), ("slice reads", read)):
            start = _status("VmRSS")
            _reset_peak()
            t0 = time.perf_counter()
            phase()
            results.append((name, start, _status("VmHWM"), time.perf_counter() - t0))
        ok = all(
            np.array_equal(checkpoint.read_leaf(root / "ckpt", leaf, i), fill(leaf, i))
            for leaf in stacked
            for i in (0, shapes[leaf][0] - 1)
        )
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)

    print(
        f"checkpoint {total / MIB:.0f} MiB in {len(shapes)} leaves, "
        f"largest slice {largest / MIB:.0f} MiB"
    )
    print(f"baseline RSS (after imports and a warm-up save and read): {base / MIB:.0f} MiB")
    for name, start, peak, secs in results:
        extra = peak - base
        print(
            f"{name:14s} RSS at start {start / MIB:4.0f} MiB, peak {peak / MIB:4.0f} MiB = "
            f"baseline + {extra / MIB:4.0f} MiB ({extra / largest:.1f} slices, "
            f"{extra / total:.1%} of the checkpoint), {secs:.1f} s"
        )
    print("read-back", "OK" if ok else "MISMATCH")
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    cli_main(main)()
