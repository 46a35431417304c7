"""Fused token log-probs: compiled temp memory and time of every implementation vs reference.

Run with `python benchmarks/kernels.py` (`--help` lists the flags). For each shape (N tokens,
hidden D, vocabulary V; default N in {2048, 8192}, D in {256, 1024}, V = 128,256, float32) and
each implementation of `nemotron_jax.kernels.token_logprobs`, it compiles the forward and the
forward+backward (grad of sum(logp) in hidden and lm_head) under `jax.jit`, reads XLA's temp
buffer size from `compiled.memory_analysis()` (the O(N * V) logits live there; arguments and
outputs are not counted) and times the best of `--repeats` runs after one warm-up.

`pallas_interpret` runs only at the smallest shape: Pallas' interpreter executes the kernels
op by op and is orders of magnitude slower than compiled code, and its memory is the
interpreter's, not a GPU's. The `pallas` (Triton) rows need a GPU and are skipped elsewhere.

Targets (on the CPU): chunked needs >= 20x less temp memory than the reference at V = 128,256
and <= 1.3x its forward+backward time; each chunked row says PASS or MISS. `--chunks` times
several chunk sizes to tune the default. A benchmark, not a test: the exit code is 0. A dated
section (machine, versions, table) is appended to docs/benchmarks.md unless `--no-append`.
"""

from __future__ import annotations

import datetime
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from common import append_section, machine  # benchmarks/common.py

from nemotron_jax.errors import ArgumentParser, cli_main
from nemotron_jax.kernels import token_logprobs
from nemotron_jax.kernels.logprobs import chunked

DEFAULT_DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
MIB = 2**20
MEM_TARGET, TIME_TARGET = 20.0, 1.3


def _fns(impl: str, block):
    def fwd(h, w, y):
        return token_logprobs(h, w, y, implementation=impl, block_sizes=block)

    def fwd_bwd(h, w, y):
        return jax.grad(lambda h, w: jnp.sum(fwd(h, w, y)), argnums=(0, 1))(h, w)

    return {"fwd": fwd, "fwd+bwd": fwd_bwd}


def _measure(fn, args, repeats: int, timed: bool) -> tuple[float, float | None]:
    compiled = jax.jit(fn).lower(*args).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes / MIB
    if not timed:
        return temp, None
    jax.block_until_ready(compiled(*args))  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        best = min(best, time.perf_counter() - t0)
    return temp, best * 1e3


def main() -> None:
    ap = ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[2048, 8192], help="token counts")
    ap.add_argument("--d", type=int, nargs="+", default=[256, 1024], help="hidden sizes")
    ap.add_argument("--v", type=int, default=128_256, help="vocabulary size")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--chunks", type=int, nargs="+", default=[chunked.DEFAULT_CHUNK],
                    help="chunked vocabulary chunk sizes to compare")  # fmt: skip
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--time-max-n", type=int, default=1 << 30,
                    help="only report memory (no timing) for larger N (the reference needs "
                    "~3 * N * V * 4 bytes of RAM to run)")  # fmt: skip
    ap.add_argument("--no-interpret", action="store_true", help="skip pallas_interpret")
    out = ap.add_argument_group("output")
    out.add_argument("--append", type=Path, default=DEFAULT_DOC, help="markdown file to append to")
    out.add_argument("--no-append", dest="append", action="store_const", const=None)
    args = ap.parse_args()

    dtype = jnp.dtype(args.dtype)
    on_gpu = jax.default_backend() == "gpu"
    shapes = [(n, d) for n in args.n for d in args.d]
    smallest = min(shapes, key=lambda s: s[0] * s[1])
    header = (
        "| N | D | impl | fwd temp MiB | fwd ms | fwd+bwd temp MiB | fwd+bwd ms "
        "| mem ratio (ref/impl) | time ratio (impl/ref) | target |"
    )
    lines = [header, "|" + "---|" * 10]
    print(header)
    for n, d in shapes:
        key = jax.random.split(jax.random.key(0), 3)
        h = jax.random.normal(key[0], (n, d), jnp.float32).astype(dtype)
        w = (jax.random.normal(key[1], (d, args.v), jnp.float32) * d**-0.5).astype(dtype)
        y = jax.random.randint(key[2], (n,), 0, args.v)
        timed = n <= args.time_max_n
        cases = [("reference", None)] + [(f"chunked({c})", c) for c in args.chunks]
        if on_gpu:
            cases.append(("pallas", None))
        elif (n, d) == smallest and not args.no_interpret:
            cases.append(("pallas_interpret", None))
        ref = None
        for name, block in cases:
            impl = name.split("(")[0]
            res = {}
            for phase, fn in _fns(impl, block).items():
                res[phase] = _measure(fn, (h, w, y), 1 if "interpret" in impl else args.repeats,
                                      timed)  # fmt: skip
            if ref is None:
                ref = res
            mem_ratio = ref["fwd+bwd"][0] / max(res["fwd+bwd"][0], 1e-9)
            t_ref, t_impl = ref["fwd+bwd"][1], res["fwd+bwd"][1]
            time_ratio = t_impl / t_ref if timed else None
            verdict = ""
            if impl == "chunked":
                mem_ok = mem_ratio >= MEM_TARGET
                time_ok = time_ratio is not None and time_ratio <= TIME_TARGET
                verdict = "PASS" if mem_ok and time_ok else "MISS"
                if not timed:
                    verdict = "memory " + ("PASS" if mem_ok else "MISS") + ", time not run"

            def fmt(x, spec=".1f"):
                return "-" if x is None else format(x, spec)

            row = (
                f"| {n} | {d} | {name} | {fmt(res['fwd'][0])} | {fmt(res['fwd'][1], '.0f')} "
                f"| {fmt(res['fwd+bwd'][0])} | {fmt(res['fwd+bwd'][1], '.0f')} "
                f"| {fmt(mem_ratio)}x | {fmt(time_ratio, '.2f')}{'x' if timed else ''} "
                f"| {verdict} |"
            )
            print(row, flush=True)
            lines.append(row)

    if args.append is not None:
        date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
        section = (
            f"\n## Fused token log-probs ({date})\n\n"
            f"- Machine: {machine()}, backend {jax.default_backend()}\n"
            f"- Versions: jax {jax.__version__}, jaxlib {jax.lib.__version__}, "
            f"python {platform.python_version()}\n"
            f"- Config: V={args.v}, {args.dtype}, best of {args.repeats} after a warm-up; temp is "
            "`compiled.memory_analysis().temp_size_in_bytes`; fwd+bwd = grad of sum(logp) in "
            f"hidden and lm_head; targets: chunked >= {MEM_TARGET:.0f}x less fwd+bwd temp "
            f"memory and <= {TIME_TARGET}x fwd+bwd time\n\n" + "\n".join(lines) + "\n"
        )
        append_section(args.append, section)


if __name__ == "__main__":
    cli_main(main)()
