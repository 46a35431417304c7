"""Batched generation on CPU: `nemotron_jax.sampling` (one jitted prefill + while_loop) against
transformers' `generate` (torch, KV cache), greedy, same weights, same prompts.

Run with `python benchmarks/generate.py` (`--no-append` to only print; `--help` lists flags).

Per config, random weights are made with `init_params` (x5, so logits are not flat), exported
with `save_hf` and loaded into `transformers.LlamaForCausalLM` (sdpa attention, float32). Both
sides then generate exactly N tokens for the same left-padded prompts (B rows of random lengths
between P/2 and P): greedy, no stop tokens (`stop_tokens=()`; HF `eos_token_id=None`), so no row
ends early. Each framework is warmed up (JAX compiles), then N-token and 1-token runs are timed
`--repeats` times, the frameworks alternating, and the median taken:

- "with prefill": B * N / median(t_N), the whole call;
- "decode only": B * (N - 1) / (median(t_N) - median(t_1)), the prefill and the first token
  (which t_1 measures) taken out.

The greedy tokens of both are compared as a sanity check (they must be identical). Target
(informational, exit 0): our decode-only tokens/s >= 3x transformers'. Appends a section to
docs/benchmarks.md unless `--no-append`. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import torch
import transformers
from common import (  # benchmarks/common.py
    add_model_args,
    add_output_args,
    append_section,
    configure_host,
    machine,
    model_fields,
    section_head,
)

from nemotron_jax.convert.hf_llama import save_hf
from nemotron_jax.errors import ArgumentParser, cli_main
from nemotron_jax.models.llama import Llama, LlamaConfig, init_params
from nemotron_jax.sampling import SamplingConfig, make_generate_fn

TARGET = 3.0  # ours / transformers, decode-only tokens/s


def parse_args() -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--configs",
        default="custom,tiny",
        help="comma-separated: 'custom' (the size flags below) and/or LlamaConfig presets",
    )
    p.add_argument("--batch", "-B", type=int, default=8)
    p.add_argument("--prompt", "-P", type=int, default=64, help="prompt width (longest row)")
    p.add_argument("--new", "-N", type=int, default=128, help="tokens generated per row")
    add_model_args(p)
    p.add_argument("--repeats", "-R", type=int, default=5, help="timed runs per case")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--torch-threads", type=int, help="torch intra-op threads (default: torch's)")
    add_output_args(p)
    return p.parse_args()


def make_config(name: str, a: argparse.Namespace) -> LlamaConfig:
    if name != "custom":
        return LlamaConfig.preset(name)
    return LlamaConfig(
        **model_fields(a),
        max_position_embeddings=131072,
        bos_token_id=1,
        eos_token_id=(2,),
        pad_token_id=0,
    )


def describe(name: str, c: LlamaConfig) -> str:
    return (
        f"`{name}`: hidden {c.hidden_size}, {c.num_layers} layers, {c.num_heads} heads / "
        f"{c.num_kv_heads} kv heads, head_dim {c.head_dim}, intermediate "
        f"{c.intermediate_size}, vocab {c.vocab_size}, {c.rope_type} rope"
    )


def prompts(c: LlamaConfig, a: argparse.Namespace) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(a.seed)
    lengths = rng.integers(max(1, a.prompt // 2), a.prompt + 1, size=a.batch)
    mask = (np.arange(a.prompt)[None] >= (a.prompt - lengths)[:, None]).astype(np.int32)
    tokens = rng.integers(3, c.vocab_size, size=(a.batch, a.prompt))
    return np.where(mask, tokens, 0).astype(np.int32), mask


def bench(name: str, a: argparse.Namespace) -> dict:
    config = make_config(name, a)
    params = init_params(config, jax.random.PRNGKey(a.seed))
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: x if "norm" in jax.tree_util.keystr(path) else x * 5.0, params
    )
    with tempfile.TemporaryDirectory() as tmp:
        save_hf(Path(tmp) / "hf", config, params)
        hf = transformers.LlamaForCausalLM.from_pretrained(
            Path(tmp) / "hf", attn_implementation="sdpa"
        ).eval()
    hf.generation_config.eos_token_id = None  # never stop early
    tokens, mask = prompts(config, a)
    t_tokens, t_mask = torch.from_numpy(tokens).long(), torch.from_numpy(mask).long()
    model = Llama(config)

    def torch_run(n):
        def run():
            with torch.inference_mode():
                return hf.generate(
                    t_tokens,
                    attention_mask=t_mask,
                    do_sample=False,
                    max_new_tokens=n,
                    pad_token_id=0,
                )[:, a.prompt :].numpy()

        return run

    def jax_run(n):
        fn = make_generate_fn(model, SamplingConfig(n, temperature=0.0, stop_tokens=()))

        def run():
            return np.asarray(jax.block_until_ready(fn(params, tokens, mask, None)).tokens)

        return run

    runs = {
        ("torch", a.new): torch_run(a.new),
        ("torch", 1): torch_run(1),
        ("jax", a.new): jax_run(a.new),
        ("jax", 1): jax_run(1),
    }
    t0 = time.perf_counter()
    jax_tokens = runs["jax", a.new]()  # compiles
    compile_s = time.perf_counter() - t0
    runs["jax", 1]()
    torch_tokens = runs["torch", a.new]()
    runs["torch", 1]()
    times = {key: [] for key in runs}
    for _ in range(a.repeats):  # alternated, so a busy spell slows both alike
        for key, run in runs.items():
            t0 = time.perf_counter()
            run()
            times[key].append(time.perf_counter() - t0)
    med = {key: statistics.median(v) for key, v in times.items()}
    b, n = a.batch, a.new
    result = {"config": config, "compile_s": compile_s, "same_tokens": None}
    result["same_tokens"] = bool(np.array_equal(jax_tokens, torch_tokens))
    result["mismatch_rows"] = int((jax_tokens != torch_tokens).any(-1).sum())
    for fw in ("torch", "jax"):
        result[fw] = {
            "t_n": med[fw, n],
            "t_1": med[fw, 1],
            "with_prefill": b * n / med[fw, n],
            "decode": b * (n - 1) / max(med[fw, n] - med[fw, 1], 1e-9),
            "ms_per_step": 1e3 * (med[fw, n] - med[fw, 1]) / (n - 1),
        }
    return result


def main() -> None:
    args = parse_args()
    configure_host()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    load = "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    print(f"{machine()}; {load}\ntorch threads {torch.get_num_threads()}")
    busy = os.getloadavg()[0] > 0.5 * (os.cpu_count() or 1)
    if busy:  # torch's OpenMP pool stalls far more than XLA when a core is taken
        print("WARNING: the machine is busy; the ratio will flatter jax (see benchmarks/README.md)")
    lines = [
        "| config | framework | t(N) s | t(1) s | tok/s with prefill | decode tok/s "
        "| ms / decode step | ours/torch (decode) | target |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    notes = []
    for name in args.configs.split(","):
        r = bench(name, args)
        ratio = r["jax"]["decode"] / r["torch"]["decode"]
        ratio_all = r["jax"]["with_prefill"] / r["torch"]["with_prefill"]
        for fw in ("torch", "jax"):
            x = r[fw]
            label = "transformers generate" if fw == "torch" else "nemotron_jax.sampling"
            extra = " | "
            if fw == "jax":
                verdict = "PASS" if ratio >= TARGET else "MISS"
                extra = f"{ratio:.2f}x ({ratio_all:.2f}x with prefill) | {verdict} (>= {TARGET}x)"
            lines.append(
                f"| {name} | {label} | {x['t_n']:.3f} | {x['t_1']:.3f} | "
                f"{x['with_prefill']:,.0f} | {x['decode']:,.0f} | {x['ms_per_step']:.2f} "
                f"| {extra} |"
            )
        same = "identical" if r["same_tokens"] else f"DIFFER in {r['mismatch_rows']} rows"
        notes.append(
            f"{describe(name, r['config'])}; jax compile {r['compile_s']:.1f} s; greedy tokens "
            f"{same}"
        )
        print(f"{name}: done; load now {os.getloadavg()[0]:.2f}")
    table = "\n".join(lines)
    if busy:
        notes.append("**machine busy at start** (load above half the cores): not a clean run")
    shape = (
        f"B={args.batch}, prompts left-padded to P={args.prompt} (row lengths {args.prompt // 2}"
        f"-{args.prompt}), N={args.new} new tokens, greedy, no early stop, float32; median of "
        f"{args.repeats} runs after a warm-up, frameworks alternated; decode tok/s = "
        f"B (N - 1) / (t(N) - t(1))"
    )
    configs = "\n".join(f"- {n}" for n in notes)
    print(f"\n{shape}\n{configs}\n\n{table}")
    if args.append is not None:
        section = section_head("Generation with a KV cache (`benchmarks/generate.py`)", load)
        section += f"- Run: {shape}\n{configs}\n\n{table}\n"
        append_section(args.append, section)


if __name__ == "__main__":
    cli_main(main)()
