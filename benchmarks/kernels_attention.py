"""Attention kernels: time and compiled temp memory of `nemotron_jax.kernels.attention`.

Run with `python benchmarks/kernels_attention.py` (print only) or add `--append` to append a
section to docs/benchmarks.md (`--doc` picks another file). Not a test; exits 0.

For each shape (B, T, N, K, H; causal, bfloat16 by default) and implementation it reports:
  * fwd and fwd+bwd (VJP with a fixed cotangent) wall time under `jax.jit`, best and median of
    `--repeats` runs after one warm-up call;
  * XLA's compiled temp memory, `jax.jit(f).lower(...).compile().memory_analysis()
    .temp_size_in_bytes`.
On CPU, "pallas_interpret" runs the kernels in the Pallas interpreter: its timings and memory are
the interpreter's (it copies whole blocks), NOT GPU performance. GPU figures ("pallas", "cudnn")
are not measured yet; on a GPU backend pass `--implementations xla,cudnn,pallas`.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from common import append_section, machine  # benchmarks/common.py

from nemotron_jax.errors import ArgumentParser, cli_main
from nemotron_jax.kernels.attention import attention

DEFAULT_DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
DEFAULT_SHAPES = "2x128x8x2x64,1x256x8x2x64,1x512x8x8x64"


def parse_args() -> argparse.Namespace:
    out = ArgumentParser(description=__doc__.split("\n")[0])
    out.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma list of BxTxNxKxH")
    out.add_argument("--implementations", default="xla,pallas_interpret")
    out.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    out.add_argument("--non-causal", dest="causal", action="store_false")
    out.add_argument("-N", "--repeats", type=int, default=5)
    out.add_argument("--append", action="store_true", help="append a section to --doc")
    out.add_argument("--doc", type=Path, default=DEFAULT_DOC)
    return out.parse_args()


def measure(fn, args, repeats: int) -> tuple[float, float, int]:
    """(best s, median s, temp bytes) of jit(fn)(*args)."""
    compiled = jax.jit(fn).lower(*args).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    jax.block_until_ready(compiled(*args))  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    return min(times), statistics.median(times), temp


def bench_shape(shape, implementation, dtype, causal, repeats):
    b, t, n, k, h = shape
    rngs = jax.random.split(jax.random.PRNGKey(0), 4)
    q = jax.random.normal(rngs[0], (b, t, n, h), dtype)
    kk = jax.random.normal(rngs[1], (b, t, k, h), dtype)
    v = jax.random.normal(rngs[2], (b, t, k, h), dtype)
    cot = jax.random.normal(rngs[3], (b, t, n, h), dtype)

    def fwd_fn(q, k, v):
        return attention(q, k, v, causal=causal, implementation=implementation)

    def fwd_bwd_fn(q, k, v, cot):
        _, vjp = jax.vjp(fwd_fn, q, k, v)
        return vjp(cot)

    return measure(fwd_fn, (q, kk, v), repeats), measure(fwd_bwd_fn, (q, kk, v, cot), repeats)


def main() -> None:
    args = parse_args()
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    implementations = args.implementations.split(",")
    dtype = jnp.dtype(args.dtype)
    header = (
        "| B, T, N, K, H | implementation | fwd best / median ms | fwd temp MiB "
        "| fwd+bwd best / median ms | fwd+bwd temp MiB |"
    )
    lines = [header, "|---|---|---|---|---|---|"]
    for shape in shapes:
        for impl in implementations:
            (fb, fm, ft), (bb, bm, bt) = bench_shape(shape, impl, dtype, args.causal, args.repeats)
            lines.append(
                f"| {', '.join(map(str, shape))} | {impl} | {fb * 1e3:.2f} / {fm * 1e3:.2f} "
                f"| {ft / 2**20:.2f} | {bb * 1e3:.2f} / {bm * 1e3:.2f} | {bt / 2**20:.2f} |"
            )
            print(lines[-1], flush=True)
    backend = jax.default_backend()
    note = (
        "Backend: CPU. pallas_interpret runs the Pallas interpreter: its time and memory are NOT "
        "GPU performance. GPU figures (pallas, cudnn) are not measured yet."
        if backend == "cpu"
        else f"Backend: {backend}."
    )
    section = "\n".join(
        [
            f"## kernels_attention.py, {datetime.date.today().isoformat()}",
            "",
            f"{machine()}, jax {jax.__version__}, {jax.devices()[0].device_kind}; "
            f"dtype {args.dtype}, "
            f"causal={args.causal}, best/median of {args.repeats} runs.",
            "",
            note,
            "",
            *lines,
            "",
        ]
    )
    print()
    print(section)
    if args.append:
        append_section(args.doc, section)


if __name__ == "__main__":
    cli_main(main)()
