"""One DPO training step on CPU: nemotron_jax (jitted) against TRL's and Tunix's DPO trainers.

TRL's `DPOTrainer` (torch) and Tunix's `DPOTrainer` (jax, flax.nnx); same model, same token
pairs, float32.

Run with `python benchmarks/dpo_step.py` (`--no-append` to only print; `--help` lists flags).

A step is forward + backward + AdamW on B pairs, each a prompt of P tokens and two responses of
R tokens (the last one EOS), with the regular DPO loss (beta 0.1) against reference log-probs
computed before training: TRL with `precompute_ref_log_probs=True`, ours as `dpo.reference =
precomputed` does. One random `LlamaForCausalLM` (the reward-step benchmark's model) is saved
once; TRL trains it through `DPOTrainer.train()` (its data collator and step included, timed by
a callback from step begin to step end); nemotron_jax loads it with `load_hf` and runs
`make_train_step` with `losses.dpo`. TRL runs in a virtualenv of its own (`--trl-venv`, made
with pinned versions when absent: TRL's pins may clash with the project's), in a child process,
then ours runs in this one; best of N steps each, the first step of each not counted.

Tunix (`--peers`, default `trl,tunix`) runs the same way, in a virtualenv of its own
(`--tunix-venv`, made with `TUNIX_PINS` when absent; CPU jax), through
`benchmarks/tunix_dpo_peer.py`: Tunix's `DPOTrainer.train()` on Tunix's `Llama3`, loaded from
the same saved model by Tunix's safetensors loader, with optax AdamW of the same settings. Its
first two steps compile and are not counted. Tunix cannot take precomputed reference log-probs:
its step runs a reference forward (`--tunix-reference in-step`, stock Tunix, said next to its
ratio); `--tunix-reference precomputed` caches them once instead (a small subclass, not stock).
Tunix's Llama3 applies RoPE with theta 1e6 and no Llama-3.1 scaling, so its log-probs differ a
little from ours (not its cost). The TRL virtualenv is made in any case: it saves the model.
Targets (informational, exit 0): jax >= 1.5x TRL, jax >= 1.2x Tunix. Run it on an otherwise
idle machine.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Run with `python -P` (no script folder first on sys.path, where benchmarks/kernels.py would
# shadow the `kernels` package transformers probes for), benchmarks/common.py is still found:
# the folder goes last.
sys.path.append(str(Path(__file__).resolve().parent))

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from common import (  # benchmarks/common.py
    add_model_args,
    add_output_args,
    append_section,
    configure_host,
    machine,
    section_head,
    train_flops,
)

from nemotron_jax.convert import load_hf
from nemotron_jax.errors import ArgumentParser, cli_main
from nemotron_jax.losses.dpo import dpo, response_logprobs
from nemotron_jax.models.llama import Llama
from nemotron_jax.optim import make_optimizer
from nemotron_jax.train.steps import make_train_step

REPO = Path(__file__).resolve().parents[1]
TARGET = 1.5  # jax / TRL speed
TUNIX_TARGET = 1.2  # jax / Tunix speed
TRL_PINS = ["trl==1.16.0", "torch==2.13.0", "transformers==5.24.0"]
# What `pip install google-tunix` brought (CPU jax; no torch).
TUNIX_PINS = ["google-tunix==0.1.7", "jax==0.10.2", "jaxlib==0.10.2", "flax==0.12.8"]
TUNIX_PINS += ["optax==0.2.8"]
PEERS = ("trl", "tunix")
OPTIM = dict(lr=1e-5, b1=0.9, b2=0.98, eps=1e-8, weight_decay=0.1, clip_norm=1.0)
BETA = 0.1


def parse_args() -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", "-B", type=int, default=4)
    p.add_argument("--prompt", "-P", type=int, default=128, help="prompt tokens")
    p.add_argument("--response", "-R", type=int, default=128, help="tokens per response")
    add_model_args(p)
    p.add_argument("--repeats", "-N", type=int, default=6, help="timed steps per framework")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trl-venv", type=Path, default=REPO / ".cache" / "bench-trl")
    p.add_argument("--tunix-venv", type=Path, default=REPO / ".cache" / "bench-tunix")
    p.add_argument(
        "--peers", type=peer_list, default=list(PEERS),
        help="comma-separated peers to time before ours, from trl,tunix (default: both)",
    )  # fmt: skip
    p.add_argument(
        "--tunix-reference", choices=("in-step", "precomputed"), default="in-step",
        help="in-step: stock Tunix, a reference forward in each step; precomputed: once, cached",
    )  # fmt: skip
    add_output_args(p)
    return p.parse_args()


def peer_list(text: str) -> list[str]:
    peers = [name for name in text.split(",") if name]
    unknown = sorted(set(peers) - set(PEERS))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown peer(s) {unknown}; choose from {list(PEERS)}")
    return peers


def venv_python(venv: Path, pins: list[str]) -> Path:
    """A virtualenv's interpreter, creating the virtualenv with `pins` if absent."""
    python = venv / "bin" / "python"
    if not python.exists():
        print(f"creating {venv} with {' '.join(pins)} (once)")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *pins], check=True)
    return python


def trl_python(venv: Path) -> Path:
    """The TRL virtualenv's interpreter, creating the virtualenv with `TRL_PINS` if absent."""
    return venv_python(venv, TRL_PINS)


def make_model(args, out_dir: str, python: Path) -> None:
    """A random LlamaForCausalLM of the benchmark's shape, saved to `out_dir` (built by the TRL
    virtualenv's transformers, so this process runs no torch)."""
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0}
    rope |= {"high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    fields = dict(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim, num_hidden_layers=args.layers, max_position_embeddings=131072,
        rope_theta=500000.0, rope_scaling=rope, pad_token_id=0, eos_token_id=2,
        bos_token_id=1, attn_implementation="sdpa",
    )  # fmt: skip
    code = (
        "import json, sys, torch, transformers; torch.manual_seed(int(sys.argv[2])); "
        "c = transformers.LlamaConfig(**json.loads(sys.argv[1])); "
        "transformers.LlamaForCausalLM(c).save_pretrained(sys.argv[3])"
    )
    # -P: no script or current directory on sys.path (benchmarks/kernels.py would shadow the
    # `kernels` package transformers probes for).
    subprocess.run(
        [str(python), "-P", "-c", code, json.dumps(fields), str(args.seed), out_dir], check=True
    )


def pair_batch(args, eos: int):
    """(prompt [B, P], chosen [B, R], rejected [B, R]) token ids, each response ending in EOS."""
    rng = np.random.default_rng(args.seed + 1)
    b, p, r = args.pairs, args.prompt, args.response
    prompt = rng.integers(3, args.vocab, size=(b, p))
    chosen = rng.integers(3, args.vocab, size=(b, r))
    rejected = rng.integers(3, args.vocab, size=(b, r))
    chosen[:, -1] = rejected[:, -1] = eos
    return prompt, chosen, rejected


def run_trl(python: Path, model_dir: str, data: str, steps: int) -> dict:
    out = subprocess.run(
        [str(python), "-P", str(REPO / "benchmarks" / "trl_dpo_peer.py"), "--model", model_dir,
         "--data", data, "--steps", str(steps)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if out.returncode:
        raise SystemExit(f"error: the TRL side failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_tunix(python: Path, model_dir: str, data: str, repeats: int, reference: str) -> dict:
    out = subprocess.run(
        [str(python), "-P", str(REPO / "benchmarks" / "tunix_dpo_peer.py"), "--model", model_dir,
         "--data", data, "--repeats", str(repeats), "--beta", str(BETA), "--optim",
         json.dumps(OPTIM), "--reference", reference],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if out.returncode:
        raise SystemExit(f"error: the Tunix side failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def jax_side(model_dir: str, prompt, chosen, rejected, repeats: int):
    """(step seconds, first-step loss, compile seconds) of our DPO step on the same pairs."""
    config, params = load_hf(model_dir)
    config = config.replace(dtype="float32", param_dtype="float32", scan_unroll=config.num_layers)
    module = Llama(config)
    b, p = prompt.shape
    sides = [np.concatenate([prompt, resp], axis=1) for resp in (chosen, rejected)]
    tokens = np.stack(sides, axis=1).astype(np.int32)  # [B, 2, T], side 0 chosen
    loss_mask = np.zeros_like(tokens)
    loss_mask[:, :, p:] = 1
    batch = {
        "tokens": tokens,
        "attention_mask": np.ones_like(tokens),
        "loss_mask": loss_mask,
        "strength": np.full(b, -1, np.int32),  # < 0: side 0 (response_1) is chosen
        "example_weight": np.ones(b, np.float32),
    }

    def apply(params, batch):
        bb, _, t = batch["tokens"].shape
        flat = {k: batch[k].reshape(bb * 2, t) for k in ("tokens", "attention_mask")}
        return module.apply(
            {"params": params}, flat["tokens"], attention_mask=flat["attention_mask"],
            method="hidden_and_head",
        )  # fmt: skip

    # The reference pass (the initial weights), once, as dpo.reference=precomputed does.
    reference = jax.jit(lambda prm, bt: response_logprobs(apply(prm, bt), bt, "chunked")[0])
    batch["reference_logprobs"] = np.asarray(reference(params, batch))
    batch = jax.tree.map(jnp.asarray, batch)
    optim = {**OPTIM, "warmup_steps": 0, "schedule": "constant", "min_lr": 0.0}
    tx = make_optimizer(ml_collections.ConfigDict(optim), total_steps=1000)
    loss_fn = functools.partial(dpo, beta=BETA, implementation="chunked")
    step = jax.jit(make_train_step(apply, loss_fn, tx), donate_argnums=0)
    params = jax.tree.map(jnp.array, params)
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}
    t0 = time.perf_counter()
    state, metrics = jax.block_until_ready(step(state, batch))
    compile_s = time.perf_counter() - t0
    first = float(metrics["loss"][0]) / float(metrics["loss"][1])
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        state, metrics = jax.block_until_ready(step(state, batch))
        times.append(time.perf_counter() - t0)
    return times, first, compile_s


def main() -> None:
    args = parse_args()
    configure_host()
    python = trl_python(args.trl_venv)  # always: its transformers saves the model
    tunix_python = venv_python(args.tunix_venv, TUNIX_PINS) if "tunix" in args.peers else None
    load = "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    print(f"{machine()}; {load}")
    tmp = tempfile.TemporaryDirectory()
    model_dir = os.path.join(tmp.name, "model")
    make_model(args, model_dir, python)
    prompt, chosen, rejected = pair_batch(args, eos=2)
    data = os.path.join(tmp.name, "pairs.npz")
    np.savez(data, prompt=prompt, chosen=chosen[:, :-1], rejected=rejected[:, :-1], eos=2)

    trl = tunix = None
    if "trl" in args.peers:
        trl = run_trl(python, model_dir, data, args.repeats + 1)
        trl_times = trl["times"][1:]  # the first step warms up
    if tunix_python is not None:
        tunix = run_tunix(tunix_python, model_dir, data, args.repeats, args.tunix_reference)
        tunix_times = tunix["times"][tunix["warmup"] :]  # the steps that compile
    jax_times, jax_first, compile_s = jax_side(model_dir, prompt, chosen, rejected, args.repeats)
    tmp.cleanup()

    t = args.prompt + args.response
    ntok = 2 * args.pairs * t
    flops = train_flops(
        layers=args.layers, hidden=args.hidden, heads=args.heads, kv_heads=args.kv_heads,
        head_dim=args.head_dim, intermediate=args.intermediate, seqs=2 * args.pairs, seq_len=t,
    )  # fmt: skip
    rows = []  # (name, times, speed-up column, target column)
    losses = []
    if trl is not None:
        ratio = min(trl_times) / min(jax_times)
        verdict = f"{'PASS' if ratio >= TARGET else 'MISS'} (>= {TARGET}x)"
        name = f"TRL {trl['versions']['trl']} DPOTrainer (torch)"
        rows.append((name, trl_times, f"{ratio:.2f}x", verdict))
        losses.append(f"TRL {trl['first_loss']:.6f}")
    if tunix is not None:
        ratio = min(tunix_times) / min(jax_times)
        verdict = f"{'PASS' if ratio >= TUNIX_TARGET else 'MISS'} (>= {TUNIX_TARGET}x)"
        ref = "reference forward in step" if tunix["reference_in_step"] else "reference cached"
        name = f"Tunix {tunix['versions']['tunix']} DPOTrainer (jax; {ref})"
        rows.append((name, tunix_times, f"{ratio:.2f}x", verdict))
        losses.append(f"Tunix {tunix['first_loss']:.6f}")
    rows.append(("nemotron_jax (jax)", jax_times, "", ""))
    losses.append(f"jax {jax_first:.6f}")
    lines = [
        "| framework | median s | best s | tok/s (best) | GFLOP/s (best) | jax speed-up | target |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for name, times, speedup, target in rows:
        best = min(times)
        lines.append(
            f"| {name} | {statistics.median(times):.3f} | {best:.3f} | {ntok / best:,.0f} "
            f"| {flops / best / 1e9:.1f} | {speedup} | {target} |"
        )
    table = "\n".join(lines)
    sanity = (
        f"First-step loss (same weights and pairs, policy = reference, so log 2 = 0.693147): "
        f"{', '.join(losses)}; jax compile {compile_s:.1f} s"
    )
    if trl is not None:
        sanity += f"; TRL threads {trl['threads']}, versions {trl['versions']}"
    if tunix is not None:
        sanity += (
            f"; Tunix versions {tunix['versions']}, reference forward in its step: "
            f"{'yes (stock DPOTrainer)' if tunix['reference_in_step'] else 'no (cached once)'}"
        )
    reference = "reference log-probs precomputed in " + (
        "TRL and jax, computed in each Tunix step"
        if tunix is not None and tunix["reference_in_step"]
        else "all"
    )
    order = " then ".join([{"trl": "TRL", "tunix": "Tunix"}[p] for p in args.peers] + ["jax"])
    warmup = "one warm-up step" + (" (Tunix: two, both compile)" if tunix is not None else "")
    shape = (
        f"hidden {args.hidden}, {args.layers} layers, {args.heads} heads / {args.kv_heads} kv "
        f"heads, head_dim {args.head_dim}, intermediate {args.intermediate}, vocab {args.vocab}; "
        f"{args.pairs} pairs x 2 x ({args.prompt} prompt + {args.response} response) = {ntok} "
        f"tokens/step, float32, beta {BETA}, {reference}; "
        f"N={args.repeats} after {warmup}, {order}"
    )
    print(f"\n{shape}\n\n{table}\n\n{sanity}")
    if args.append is not None:
        section = section_head("DPO train step (`benchmarks/dpo_step.py`)", load)
        section += f"- Config: {shape}\n\n{table}\n\n{sanity}\n"
        append_section(args.append, section)


if __name__ == "__main__":
    cli_main(main)()
