"""One reward-model training step on CPU: nemotron_jax (jitted) against transformers, f32 and bf16.

Run with `python benchmarks/reward_step.py` (`--no-append` to only print; `--help` lists flags).

A step is forward + backward + AdamW on a batch of pairs [B, 2, T] with the Scaled BT loss. One
random `LlamaForCausalLM` is built locally, saved with `save_pretrained` and loaded with
`load_hf`; its backbone feeds both `RewardModel` and `LlamaForSequenceClassification
(num_labels=1)`, whose score row becomes the head's helpfulness column (slot 4, bias 0), so both
compute the same reward. JAX: `make_train_step` + `make_optimizer`, jitted once, state donated.
torch: the same loss, `clip_grad_norm_(1.0)` and `torch.optim.AdamW` (same betas, eps and
decay; norms undecayed, as `decay_mask`). bf16 is mixed precision in both: float32 params,
bf16 compute (`dtype="bfloat16"` / `torch.autocast`). The two frameworks alternate step by step;
torch runs in a child process of its own (`common.TorchProcess` says why).
Targets (informational, exit 0): jax >= 1.0x torch in f32, >= 1.2x in bf16, CPU-MFU >= 55%
(model FLOPs: 6 N tokens + causal attention, performance.md §6.2). Appends a section to
docs/benchmarks.md unless `--no-append`. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import torch
import transformers
from common import (  # benchmarks/common.py
    TorchProcess,
    add_attention_args,
    add_model_args,
    add_output_args,
    append_section,
    available_attention_impls,
    configure_host,
    machine,
    section_head,
    timed_alternating,
    train_flops,
)

from nemotron_jax.convert import load_hf
from nemotron_jax.errors import ArgumentParser, cli_main
from nemotron_jax.losses.reward import scaled_bt
from nemotron_jax.models.reward import HELPFULNESS_SLOT, RewardModel, reward_params_from_backbone
from nemotron_jax.optim import make_optimizer
from nemotron_jax.train.steps import make_train_step

TARGETS = {"float32": 1.0, "bfloat16": 1.2}  # jax / torch speed
MFU_TARGET = 0.55  # of the dtype's CPU peak
OPTIM = dict(lr=1e-5, b1=0.9, b2=0.98, eps=1e-8, weight_decay=0.1, clip_norm=1.0)


def parse_args() -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", "-B", type=int, default=4, help="pairs per batch (2B sequences)")
    p.add_argument("--seq", "-T", type=int, default=256)
    add_model_args(p)
    p.add_argument("--repeats", "-N", type=int, default=5, help="timed steps per case")
    p.add_argument("--dtypes", default="float32,bfloat16")
    add_attention_args(p)
    p.add_argument("--peak-f32", type=float, default=190.0, help="GFLOP/s for CPU-MFU")
    p.add_argument("--peak-bf16", type=float, default=350.0, help="GFLOP/s for CPU-MFU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--torch-threads", type=int, help="torch intra-op threads (default: torch's)")
    add_output_args(p)
    return p.parse_args()


def hf_config(a: argparse.Namespace) -> transformers.LlamaConfig:
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0}
    rope |= {"high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    sizes = dict(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate)
    heads = dict(num_attention_heads=a.heads, num_key_value_heads=a.kv_heads, head_dim=a.head_dim)
    return transformers.LlamaConfig(
        **sizes,
        **heads,
        num_hidden_layers=a.layers,
        max_position_embeddings=max(131072, a.seq),
        rope_theta=500000.0,
        rope_scaling=rope,
        pad_token_id=0,  # tokens are drawn from 1..V-1, so every row is read at T - 1
        num_labels=1,
        attn_implementation="sdpa",
    )


def model_flops(c: transformers.LlamaConfig, seqs: int, t: int) -> float:
    """Training FLOPs per step (`common.train_flops`)."""
    return train_flops(
        layers=c.num_hidden_layers, hidden=c.hidden_size, heads=c.num_attention_heads,
        kv_heads=c.num_key_value_heads, head_dim=c.head_dim, intermediate=c.intermediate_size,
        seqs=seqs, seq_len=t,
    )  # fmt: skip


def torch_step_fn(model, pairs: int, autocast: bool):
    named = list(model.named_parameters())
    no_decay = {"params": [p for n, p in named if "norm" in n], "weight_decay": 0.0}
    groups = [{"params": [p for n, p in named if "norm" not in n]}, no_decay]
    betas, wd = (OPTIM["b1"], OPTIM["b2"]), OPTIM["weight_decay"]
    opt = torch.optim.AdamW(groups, lr=OPTIM["lr"], betas=betas, eps=OPTIM["eps"], weight_decay=wd)

    def step(tokens, mask, strength):
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = model(input_ids=tokens, attention_mask=mask, use_cache=False).logits
        r = logits.float().view(pairs, 2)
        row1, scored = strength >= 0, strength != 0  # as nemotron_jax.losses.reward._pairs
        delta = torch.where(row1, r[:, 1] - r[:, 0], r[:, 0] - r[:, 1])
        per_pair = strength.abs() * -torch.nn.functional.logsigmoid(delta)
        loss = torch.where(scored, per_pair, 0.0).sum() / scored.sum().clamp(min=1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), OPTIM["clip_norm"])
        opt.step()
        return float(loss.detach())

    return step


def torch_handler(cfg, seed, out_dir, tokens, strength):
    """The torch side, in its own process (`common.TorchProcess`). ("build",) makes the random
    models, saves the causal LM to `out_dir` and returns the score row; ("setup", dtype) resets
    the weights and optimizer and returns the first step's loss; ("run",) -> (seconds, None)."""
    pairs = tokens.shape[0]
    batch = [
        torch.from_numpy(x.reshape(2 * pairs, -1)).long() for x in (tokens, np.ones_like(tokens))
    ]
    batch.append(torch.from_numpy(strength))
    state = {}

    def handle(cmd, dtype=None):
        if cmd == "build":
            torch.manual_seed(seed)
            causal = transformers.LlamaForCausalLM(cfg)
            causal.save_pretrained(out_dir)
            model = transformers.LlamaForSequenceClassification(cfg)
            model.model.load_state_dict(causal.model.state_dict())
            state["model"] = model
            state["init"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
            return model.score.weight.detach().numpy()[0]
        if cmd == "setup":  # every dtype starts from the same weights
            state["model"].load_state_dict(state["init"])
            state["model"].train()
            state["step"] = torch_step_fn(state["model"], pairs, autocast=dtype == "bfloat16")
            return state["step"](*batch)
        t0 = time.perf_counter()
        state["step"](*batch)
        return time.perf_counter() - t0, None

    return handle


def jax_step_fn(config, params, dtype: str, attention_impl: str):
    # Layers fully unrolled (in a training config: model.overrides.scan_unroll): at 4 small
    # layers on CPU this is ~10% faster than the rolled scan (unroll 2 gains nothing).
    config = config.replace(
        dtype=dtype, param_dtype="float32", scan_unroll=config.num_layers,
        attention_impl=attention_impl,
    )  # fmt: skip
    model = RewardModel(config)
    apply = lambda p, b: model.apply({"params": p}, b["tokens"], attention_mask=b["attention_mask"])
    optim = {**OPTIM, "warmup_steps": 0, "schedule": "constant", "min_lr": 0.0}
    tx = make_optimizer(ml_collections.ConfigDict(optim), total_steps=1000)
    loss_fn = functools.partial(scaled_bt, slot=HELPFULNESS_SLOT)
    step = jax.jit(make_train_step(apply, loss_fn, tx), donate_argnums=0)
    params = jax.tree.map(jnp.array, params)  # fresh copies: the state is donated
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}
    return step, state


def bench(torch_process, config, params, batch, dtype, args):
    """Step times per framework ("torch", "jax/<attention_impl>"), jax compile
    seconds and the first-step losses."""
    runs, losses, compile_s = {"torch": functools.partial(torch_process.call, "run")}, {}, {}
    losses["torch"] = torch_process.call("setup", dtype)
    for attention in args.attention_impls:
        name = f"jax/{attention}"
        jstep, state = jax_step_fn(config, params, dtype, attention)
        t0 = time.perf_counter()
        state, metrics = jstep(state, batch)
        losses[name] = float(metrics["loss"][0]) / float(metrics["loss"][1])
        compile_s[name] = time.perf_counter() - t0

        box = {"state": state}  # the step donates its state: keep the newest

        def run_jax(jstep=jstep, box=box):
            box["state"], m = jstep(box["state"], batch)
            jax.block_until_ready((box["state"], m))  # dispatch is asynchronous

        runs[name] = run_jax
    # The first round warms up allocators and kernel selection.
    timed = timed_alternating(runs, args.repeats, warmup=1)
    times = {name: t for name, (t, _) in timed.items()}
    return times, compile_s, losses


def main() -> None:
    args = parse_args()
    configure_host()
    args.attention_impls = available_attention_impls(args.attention_impls)
    if args.torch_threads:  # for the report; the child process sets its own
        torch.set_num_threads(args.torch_threads)
    cfg = hf_config(args)
    rng = np.random.default_rng(args.seed + 1)
    b, t = args.pairs, args.seq
    tokens = rng.integers(1, args.vocab, size=(b, 2, t), dtype=np.int32)
    strength = rng.choice([-3, -2, -1, 1, 2, 3], size=b).astype(np.int32)  # no ties
    # torch steps in a child process (common.TorchProcess), which also builds the models.
    tmp = tempfile.TemporaryDirectory()
    torch_process = TorchProcess(
        torch_handler, cfg, args.seed, tmp.name, tokens, strength, threads=args.torch_threads
    )
    score_row = torch_process.call("build")
    config, backbone = load_hf(tmp.name)
    kernel = np.random.default_rng(args.seed).normal(0, 0.02, (args.hidden, 9)).astype(np.float32)
    kernel[:, HELPFULNESS_SLOT] = score_row
    params = reward_params_from_backbone(backbone, {"kernel": kernel, "bias": np.zeros(9, "f4")})
    batch = {"tokens": tokens, "attention_mask": np.ones_like(tokens), "strength": strength}
    batch["example_weight"] = np.ones(b, np.float32)  # as the training loop adds
    batch = jax.tree.map(jnp.asarray, batch)

    ntok, flops = 2 * b * t, model_flops(cfg, 2 * b, t)
    load = "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    print(f"{machine()}; {load}\ntorch threads {torch.get_num_threads()}")
    lines = [
        "| dtype | framework (jax: attention) | median s | best s | tok/s (best) "
        "| CPU-MFU (best) | jax/torch | target |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    first_loss = {}
    for dtype in args.dtypes.split(","):
        times, compile_s, first_loss[dtype] = bench(
            torch_process, config, params, batch, dtype, args
        )
        peak = args.peak_f32 if dtype == "float32" else args.peak_bf16
        for fw in times:
            best, med = min(times[fw]), statistics.median(times[fw])
            ratio = min(times["torch"]) / best  # best of N: the least disturbed
            mfu = flops / best / (peak * 1e9)
            ok = ratio >= TARGETS[dtype] and mfu >= MFU_TARGET
            verdict = f"{'PASS' if ok else 'MISS'} (>= {TARGETS[dtype]}x, MFU >= {MFU_TARGET:.0%})"
            extra = " | " if fw == "torch" else f"{ratio:.2f}x | {verdict}"
            lines.append(
                f"| {dtype} | {fw} | {med:.3f} | {best:.3f} | {ntok / best:,.0f} | {mfu:.1%} "
                f"| {extra} |"
            )
        print(f"{dtype}: jax compile s {compile_s}; load now {os.getloadavg()[0]:.2f}")
    torch_process.close()
    tmp.cleanup()
    table = "\n".join(lines)
    sanity = "First-step Scaled BT loss (same weights and batch): " + "; ".join(
        f"{d} " + ", ".join(f"{fw} {loss:.6f}" for fw, loss in first_loss[d].items())
        for d in args.dtypes.split(",")
    )
    shape = (
        f"hidden {args.hidden}, {args.layers} layers, {args.heads} heads / {args.kv_heads} kv "
        f"heads, head_dim {args.head_dim}, intermediate {args.intermediate}, vocab {args.vocab}, "
        f"llama3 rope; {b} pairs x 2 x {t} tokens = {ntok} tokens/step, no padding; "
        f"{flops / 1e9:.1f} GFLOP/step; CPU-MFU vs {args.peak_f32:g} (f32) / "
        f"{args.peak_bf16:g} (bf16) GFLOP/s; N={args.repeats}, frameworks alternated (torch in "
        f"its own process)"
    )
    print(f"\n{shape}\n\n{table}\n\n{sanity}")
    if args.append is not None:
        section = section_head("Reward-model train step (`benchmarks/reward_step.py`)", load)
        section += f"- Config: {shape}\n\n{table}\n\n{sanity}\n"
        append_section(args.append, section)


if __name__ == "__main__":
    cli_main(main)()
