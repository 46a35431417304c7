"""Shared by the benchmark scripts: what machine ran them, and appending to docs/benchmarks.md."""

from __future__ import annotations

import argparse
import datetime
import multiprocessing
import os
import time
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
_HOST: dict[str, str] = {}  # what nemotron_jax.runtime.configure_cpu did, for section headers


def configure_host() -> None:
    """Applies `nemotron_jax.runtime.configure_cpu()` as the project's entry points do; call it
    first in main(). Its settings are process-wide, so torch is timed under them too (they do
    not slow it). NEMOTRON_JAX_CPU_TUNING=0 times both frameworks without them."""
    from nemotron_jax import runtime

    _HOST.update(runtime.configure_cpu())
    print(f"host settings: {host_settings()}")


class TorchProcess:
    """The torch side of a benchmark, in a spawned child process.

    Why a process of its own: torch's eager code enters an OpenMP parallel region per op, and its
    timings depend on what else shares its runtime and thread pools in the process (a shared
    libgomp once cost it 10-25% on the 2-core machine). In its own process torch keeps its own
    runtime; the parent should run no torch code at all.

    The child applies `configure_host()` and `threads`, builds `handle = make_handler(*args)`,
    then answers every `call(*message)` with `handle(*message)`. A handler that times itself
    returns `(seconds, result)`, which `timed_alternating` reads as the call's time.
    """

    def __init__(self, make_handler, *args, threads: int | None = None):
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(
            target=_serve, args=(child, make_handler, args, threads), daemon=True
        )
        self._proc.start()

    def call(self, *message):
        self._conn.send(message)
        return self._conn.recv()

    def close(self) -> None:
        self._conn.send(None)
        self._proc.join()


def _serve(conn, make_handler, args, threads) -> None:
    configure_host()
    if threads:
        import torch

        torch.set_num_threads(threads)
    handle = make_handler(*args)
    while (message := conn.recv()) is not None:
        conn.send(handle(*message))


def timed_alternating(runs: dict, repeats: int, warmup: int = 0) -> dict:
    """{name: (seconds per call, last result)} for `runs` ({name: fn}): each fn is called once
    per round, in turn, so a busy spell on the machine slows all alike; the first `warmup` rounds
    are not recorded. A fn that times itself returns (seconds, result) (`TorchProcess`)."""
    times = {name: [] for name in runs}
    outs = {}
    for i in range(warmup + repeats):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            out = fn()
            elapsed = time.perf_counter() - t0
            if isinstance(out, tuple):  # timed remotely
                elapsed, out = out
            outs[name] = out
            if i >= warmup:
                times[name].append(elapsed)
    return {name: (t, outs[name]) for name, t in times.items()}


def host_settings() -> str:
    from nemotron_jax import runtime

    return runtime.describe(_HOST) if _HOST else "not configured"


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


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The model-size flags shared by the benchmarks (default: hidden 512, 4 layers, 8 heads /
    2 KV heads of 64, MLP 1536, vocabulary 32,000)."""
    for name, default in [("hidden", 512), ("layers", 4), ("heads", 8), ("kv-heads", 2)]:
        p.add_argument(f"--{name}", type=int, default=default)
    for name, default in [("head-dim", 64), ("intermediate", 1536), ("vocab", 32000)]:
        p.add_argument(f"--{name}", type=int, default=default)


def add_output_args(p: argparse.ArgumentParser) -> None:
    """`--append FILE` (default docs/benchmarks.md) or `--no-append` (print only)."""
    out = p.add_mutually_exclusive_group()
    out.add_argument("--append", type=Path, default=DOC, help="markdown file to append to")
    out.add_argument("--no-append", dest="append", action="store_const", const=None)


def add_attention_args(p: argparse.ArgumentParser) -> None:
    """`--attention-impls xla,cpu`: one JAX row per `LlamaConfig.attention_impl`."""
    p.add_argument(
        "--attention-impls", default="xla,cpu", type=lambda s: s.split(","),
        help="LlamaConfig.attention_impl values, one jax row each ('cpu', the fused CPU kernel, "
        "is skipped if it cannot be built here)",
    )  # fmt: skip


def available_attention_impls(impls: list[str]) -> list[str]:
    """`impls` without "cpu" when the fused CPU attention cannot be built here (says so)."""
    from nemotron_jax.kernels.attention import prepare, resolve_implementation

    prepare("auto", "float32")
    if "cpu" in impls and resolve_implementation("auto", "float32") != "cpu":
        print("fused CPU attention unavailable (no C++ compiler?): xla attention rows only")
        return [i for i in impls if i != "cpu"]
    return impls


def section_head(title: str, load: str) -> str:
    """The opening of an appended section: "## title, <date -u>", the machine (with the load
    average at start) and the jax / torch / transformers versions."""
    import jax
    import torch
    import transformers

    stamp = datetime.datetime.now(datetime.UTC).strftime("%a %b %e %H:%M:%S UTC %Y")
    versions = (
        f"jax {jax.__version__}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}; torch threads {torch.get_num_threads()}"
    )
    heading = f"{title}, {stamp}" if title else stamp
    return (
        f"\n## {heading}\n\n- Machine: {machine()}; {load} at start\n- Versions: {versions}\n"
        f"- Host settings (nemotron_jax.runtime.configure_cpu): {host_settings()}\n"
    )


def train_flops(
    *,
    layers: int,
    hidden: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    intermediate: int,
    seqs: int,
    seq_len: int,
) -> float:
    """Model FLOPs of one training step of a Llama decoder on `seqs` sequences of `seq_len`
    tokens: 6 x matmul params (the embedding is a gather; a one-token head is negligible) x
    tokens, plus attention 3 x 4 T^2 N H per layer and sequence, halved for the causal mask."""
    d, n, k, h = hidden, heads, kv_heads, head_dim
    per_layer = d * (n + 2 * k) * h + n * h * d + 3 * d * intermediate
    attention = 3 * 4 * seq_len * seq_len * n * h / 2
    return layers * seqs * (6 * per_layer * seq_len + attention)


def model_fields(a: argparse.Namespace) -> dict:
    """LlamaConfig fields from the `add_model_args` flags."""
    return dict(
        vocab_size=a.vocab,
        hidden_size=a.hidden,
        intermediate_size=a.intermediate,
        num_layers=a.layers,
        num_heads=a.heads,
        num_kv_heads=a.kv_heads,
        head_dim=a.head_dim,
    )
