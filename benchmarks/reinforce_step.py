"""One REINFORCE step on CPU, broken down: generate / score / policy and reference log-probs /
updates; then side by side with TRL's `RLOOTrainer` (torch) on the same models and sizes.

Run with `python -P benchmarks/reinforce_step.py` (`--no-append` to only print; `--no-trl` for
the breakdown alone; `--help` lists flags).

Ours. The step is the real one: `experiments/configs/reinforce.py` run by the training loop on
the generated synthetic prompts, with a random policy (also the reference) and a random reward
model of the same size written as params checkpoints first. Each step samples prompts x K
responses with the KV-cache sampler (temperature 1, `--max-new` tokens; it stops early only once
every row has emitted a stop token, which a random model practically never does), scores them
with the reward model, takes the per-token log-probs of policy (the sampler's own, float32) and
reference, then makes prompts x K / minibatch AdamW updates. The loop times each phase after
blocking on its result; the step is the sum of the phases (advantages and the minibatch split,
both tiny, are outside them); the first step (compilation) is left out.

TRL. The same two models, exported with `nemotron_jax.convert.save_hf` (a `LlamaForCausalLM`,
and the reward model as a `LlamaForSequenceClassification` with num_labels 1 whose score row is
our head's slot `rm_slot`; the head's bias, a constant shift that leaves RLOO's advantages
unchanged, is dropped), are trained by `RLOOTrainer.train()` in a child process of TRL's own
virtualenv (`--trl-venv`, made with `dpo_step.py`'s pinned versions when absent), through
`benchmarks/trl_rloo_peer.py`. The same on both sides: float32 on the CPU, K =
`num_generations`, P prompts per generation batch (`generation_batch_size` = P x K), minibatch
= `per_device_train_batch_size` and P x K / minibatch optimizer steps per generation batch
(`steps_per_generation`, one pass: `num_iterations` 1), `max_completion_length` = `--max-new`,
temperature 1 with no top-k / top-p, generation with a KV cache (transformers' `generate`,
sdpa attention) that stops early only when every row has ended, the same stop token ids, beta,
AdamW settings (lr, betas, eps, weight decay, clipping at 1), no remat / gradient checkpointing,
no vLLM. TRL's step is the sum of the trainer steps of one generation batch, timed by a
callback from step begin to step end, with its generation, reward and no-grad log-prob calls
timed inside it.

What cannot be matched: the prompts. Ours are the synthetic set's, of different lengths,
right-padded to `--max-prompt` tokens, and every pass (prefill, KV cache, log-probs, updates)
runs on that padded width, P + N; TRL's are random token ids of exactly `--max-prompt` tokens
(`--trl-prompt-tokens` to change), so both run the same shapes, TRL with no padding. TRL
re-tokenises prompts and decoded completions as text (a local word-level tokenizer, one word per
id, so ids round-trip) and always recomputes the policy's log-probs with a forward pass (ours
take the sampler's); TRL's loss is its clipped sequence-level ratio with per-token entropy,
KL k1 summed over tokens and the baseline over all siblings, ours NeMo's plain REINFORCE loss,
|k1| averaged over tokens and the baseline over EOS-terminated siblings (on a random model no
response ends, so our advantages and loss are 0, but the backward pass runs in full all the
same). TRL runs under torch's defaults (no `configure_host` there, as in `dpo_step.py`).

Reported: per-phase medians of both, the best and median step, and the speed ratio TRL step /
jax step on the best step (target, informational, exit 0: jax >= 2x TRL); a probe row's mean
policy log-prob and reward on both sides checks that they loaded the same models. Appends a
section to docs/benchmarks.md unless `--no-append`. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from nemotron_jax.errors import ArgumentParser, cli_main

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # experiments/
# benchmarks/common.py and dpo_step.py; appended, since under -P this directory must not shadow
# installed packages (benchmarks/kernels.py against the `kernels` package transformers probes).
sys.path.append(str(ROOT / "benchmarks"))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from common import (  # noqa: E402  (benchmarks/common.py)
    add_model_args,
    add_output_args,
    append_section,
    configure_host,
    host_settings,
    machine,
    model_fields,
)
from dpo_step import trl_python  # noqa: E402  (the TRL virtualenv and its pins)

from experiments.configs import reinforce  # noqa: E402
from nemotron_jax import artifact  # noqa: E402
from nemotron_jax.convert import save_hf  # noqa: E402
from nemotron_jax.data import splits  # noqa: E402
from nemotron_jax.data.tokenizer import generation_stop_ids  # noqa: E402
from nemotron_jax.experiment import run_experiment  # noqa: E402
from nemotron_jax.metrics import read_metrics  # noqa: E402
from nemotron_jax.models.llama import Llama, LlamaConfig, init_params  # noqa: E402
from nemotron_jax.models.reward import RewardModel, init_reward_params, scalar_reward  # noqa: E402
from nemotron_jax.train.objective import model_config  # noqa: E402
from nemotron_jax.train.rollouts import sequence_logprobs  # noqa: E402

PHASES = (
    "time_generate",
    "time_score",
    "time_policy_logprobs",
    "time_reference_logprobs",
    "time_update",
)
TARGET = 2.0  # jax / TRL speed
NUM_ATTRIBUTES = 9


def parse_args() -> argparse.Namespace:
    defaults = reinforce.get_config("")
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=16, help="prompts per step (P)")
    p.add_argument("--k", type=int, default=4, help="samples per prompt (K)")
    p.add_argument("--minibatch", type=int, default=16, help="sequences per update")
    p.add_argument("--max-new", type=int, default=64, help="generated tokens per response")
    p.add_argument(
        "--max-prompt", type=int, default=defaults.rl.max_prompt_len,
        help="prompt width: ours pad (or cut) the prompts to it; TRL's prompts are this long",
    )  # fmt: skip
    p.add_argument("--steps", type=int, default=6, help="steps per framework; the first warms up")
    add_model_args(p)
    p.add_argument("--tiny", action="store_true", help="the `tiny` preset instead of the sizes")
    p.add_argument("--no-trl", action="store_true", help="only our breakdown, no TRL run")
    p.add_argument(
        "--trl-prompt-tokens", type=int, default=0,
        help="TRL's prompt length (default: --max-prompt, the width ours run at)",
    )  # fmt: skip
    p.add_argument("--trl-venv", type=Path, default=ROOT / ".cache" / "bench-trl")
    p.add_argument("--trl-threads", type=int, default=0, help="torch threads (0: torch's)")
    add_output_args(p)
    return p.parse_args()


def overrides(a: argparse.Namespace) -> dict:
    if a.tiny:
        return {}
    return model_fields(a)


def write_models(config, root: Path) -> tuple[str, str, dict, dict]:
    """Random policy and reward-model artifacts that read with the run's tokenizer; returns
    their paths and parameters."""
    mcfg: LlamaConfig = model_config(config)
    tokenizer = splits.configured_tokenizer(config.data)
    text = dict(tokenizer=tokenizer, template=config.data.template, max_len=config.data.max_len)
    policy, rm = root / "policy", root / "rm"
    policy_params = init_params(mcfg, jax.random.PRNGKey(0))
    rm_params = init_reward_params(mcfg, jax.random.PRNGKey(1), NUM_ATTRIBUTES)
    artifact.save(policy, policy_params, config=mcfg, kind="causal_lm", **text)
    artifact.save(
        rm, rm_params, config=mcfg, kind="reward_model", num_attributes=NUM_ATTRIBUTES, **text
    )
    return str(policy), str(rm), policy_params, rm_params


def export_hf(config, root: Path, policy_params, rm_params) -> tuple[str, str]:
    """The same two models as HF directories for TRL (no torch in this process)."""
    mcfg = model_config(config)
    pad = splits.configured_tokenizer(config.data).pad_id
    policy, rm = root / "hf_policy", root / "hf_rm"
    host = jax.device_get
    save_hf(policy, mcfg, host(policy_params), kind="causal_lm")
    save_hf(
        rm, mcfg, host(rm_params), kind="sequence_classification", reward_slot=config.rm_slot,
        pad_token_id=pad,
    )  # fmt: skip
    return str(policy), str(rm)


def probe_row(config, length: int) -> np.ndarray:
    """One fixed row of token ids with no special token: the models' sanity probe."""
    mcfg = model_config(config)
    tokenizer = splits.configured_tokenizer(config.data)
    specials = set(generation_stop_ids(tokenizer, config.data.template)) | {tokenizer.pad_id}
    low = max(specials | {1}) + 1
    return np.random.default_rng(7).integers(low, mcfg.vocab_size, size=length).astype(np.int32)


def jax_probe(config, policy_params, rm_params, row: np.ndarray) -> dict:
    """Mean log-prob of `row` under our policy and our reward of it (HF's score plus the
    dropped head bias)."""
    mcfg = model_config(config)
    tokens = row[None]
    mask = np.ones_like(tokens)
    logp = sequence_logprobs(
        Llama(mcfg), policy_params, tokens, mask, config.loss.logprobs_impl
    )  # [1, T], 0 at t = 0
    outputs = RewardModel(mcfg, NUM_ATTRIBUTES).apply(
        {"params": rm_params}, tokens, attention_mask=mask
    )
    reward = scalar_reward(outputs, slot=config.rm_slot)
    bias = float(np.asarray(rm_params["reward_head"]["bias"])[config.rm_slot])
    return {
        "policy_mean_logprob": float(np.asarray(logp)[0, 1:].mean()),
        "reward": float(np.asarray(reward)[0]) - bias,
    }


def run_trl(python: Path, a, config, hf_policy: str, hf_rm: str, probe, tmp: Path) -> dict:
    """TRL's steps in its own virtualenv and process (`trl_rloo_peer.py`)."""
    tokenizer = splits.configured_tokenizer(config.data)
    spec = {
        "prompts": a.prompts,
        "k": a.k,
        "minibatch": a.minibatch,
        "max_new": a.max_new,
        "prompt_len": a.trl_prompt_tokens or a.max_prompt,
        "steps": a.steps,
        "beta": config.rl.beta,
        "optim": {
            k: config.optim[k] for k in ("lr", "b1", "b2", "eps", "weight_decay", "clip_norm")
        },
        "stop_tokens": list(generation_stop_ids(tokenizer, config.data.template)),
        "pad_id": tokenizer.pad_id,
        "seed": config.seed,
        "probe": [int(t) for t in probe],
    }
    spec_path = tmp / "trl_spec.json"
    spec_path.write_text(json.dumps(spec))
    cmd = [str(python), "-P", str(ROOT / "benchmarks" / "trl_rloo_peer.py"), "--policy",
           hf_policy, "--rm", hf_rm, "--spec", str(spec_path)]  # fmt: skip
    if a.trl_threads:
        cmd += ["--threads", str(a.trl_threads)]
    # -P: no script directory on sys.path (benchmarks/kernels.py would shadow `kernels`).
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"error: the TRL side failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    a = parse_args()
    # Checked before anything runs (TRL goes first and would fail, or time, something else).
    if a.steps < 2 or a.k < 2 or (a.prompts * a.k) % a.minibatch:
        raise SystemExit(
            "error: need --steps >= 2 (the first warms up), --k >= 2 (a leave-one-out baseline) "
            f"and --minibatch dividing prompts x k = {a.prompts * a.k}"
        )
    configure_host()
    jax.config.update("jax_compilation_cache_dir", str(ROOT / ".cache" / "jax"))
    python = None if a.no_trl else trl_python(a.trl_venv)
    load = "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    print(f"{machine()}; {load}")
    trl = None
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        config = reinforce.get_config("")
        with config.unlocked():
            config.model.overrides = overrides(a)
        config.progress, config.tensorboard = False, False
        config.rl.prompts_per_step, config.rl.num_rollouts_per_prompt = a.prompts, a.k
        config.rl.max_new_tokens = a.max_new
        config.rl.max_prompt_len = a.max_prompt
        config.batch_size = a.minibatch
        config.num_steps, config.log_every = a.steps, 1
        config.eval_every = config.checkpoint_every = 10**6
        policy, rm, policy_params, rm_params = write_models(config, root)
        config.init_from, config.rm_from = policy, rm
        config.reward_fn = ""
        probe = probe_row(config, a.max_prompt + a.max_new)
        if python is not None:  # TRL first, then ours, as dpo_step.py
            hf_policy, hf_rm = export_hf(config, root, policy_params, rm_params)
            trl = run_trl(python, a, config, hf_policy, hf_rm, probe, root)
        run_experiment(config, str(root / "run"))
        rows = read_metrics(str(root / "run"), "train")[1:]
    mcfg = model_config(config)
    med = {k: statistics.median(r[k] for r in rows) for k in PHASES}
    total = sum(med.values())
    n_seq = a.prompts * a.k
    gen_tokens = statistics.median(r["response_length"] for r in rows) * n_seq
    lines = [
        f"{k.removeprefix('time_'):<20} {1000 * v:9.1f} ms  {100 * v / total:5.1f}%"
        for k, v in med.items()
    ]
    summary = (
        f"step {1000 * total:.1f} ms; generation {gen_tokens / med['time_generate']:.0f} tokens/s "
        f"({n_seq} sequences x {gen_tokens / n_seq:.0f} tokens)"
    )
    print("\n".join(lines) + "\n" + summary)
    comparison = ""
    if trl is not None:
        comparison = compare(
            a, config, rows, trl, jax_probe(config, policy_params, rm_params, probe)
        )
        print("\n" + comparison)
    if a.append is None:
        return
    model = (
        "tiny preset"
        if a.tiny
        else f"hidden {mcfg.hidden_size}, {mcfg.num_layers} layers, {mcfg.num_heads} heads / "
        f"{mcfg.num_kv_heads} KV heads, vocab {mcfg.vocab_size}"
    )
    table = ["| phase | median ms | share |", "|---|---|---|"] + [
        f"| {k.removeprefix('time_')} | {1000 * v:.1f} | {100 * v / total:.1f}% |"
        for k, v in med.items()
    ]
    section = f"""## REINFORCE step breakdown ({datetime.date.today().isoformat()})

Machine: {machine()}; jax {jax.__version__}, float32, {os.cpu_count()} threads; {load} at start.
Host settings: {host_settings()}.
Model: {model}. P = {a.prompts} prompts x K = {a.k} samples, {a.max_new} new tokens, prompts of
up to {config.rl.max_prompt_len} tokens, {n_seq // a.minibatch} updates of {a.minibatch}
sequences per step; median of {len(rows)} steps after the first.

{chr(10).join(table)}

{summary}.
"""
    if comparison:
        section += (
            f"\nAgainst TRL's RLOOTrainer (`benchmarks/reinforce_step.py`):\n\n{comparison}\n"
        )
    append_section(a.append, section)


def compare(a, config, rows: list[dict], trl: dict, ours_probe: dict) -> str:
    """The side-by-side tables and sanity lines, markdown."""
    jax_steps = [sum(r[k] for k in PHASES) for r in rows]
    trl_rows = trl["steps"][1:]  # the first step warms up
    if not trl_rows:
        raise SystemExit("error: TRL ran no step after its warm-up one; use --steps >= 2")
    trl_steps = [r["total"] for r in trl_rows]
    phase_lines = [
        "| phase | nemotron_jax median ms | TRL median ms |",
        "|---|---:|---:|",
    ]
    for key in PHASES[:-1]:
        name = key.removeprefix("time_")
        ours = statistics.median(r[key] for r in rows)
        theirs = statistics.median(r[name] for r in trl_rows)
        phase_lines.append(f"| {name} | {1000 * ours:.1f} | {1000 * theirs:.1f} |")
    trl_rest = statistics.median(
        r["total"] - sum(r[k.removeprefix("time_")] for k in PHASES[:-1]) for r in trl_rows
    )
    phase_lines.append(
        f"| update (TRL: the rest of its step) | "
        f"{1000 * statistics.median(r['time_update'] for r in rows):.1f} | {1000 * trl_rest:.1f} |"
    )
    phase_lines.append(
        f"| step | {1000 * statistics.median(jax_steps):.1f} | "
        f"{1000 * statistics.median(trl_steps):.1f} |"
    )
    ratio = min(trl_steps) / min(jax_steps)
    ratio_median = statistics.median(trl_steps) / statistics.median(jax_steps)
    verdict = f"{'PASS' if ratio >= TARGET else 'MISS'} (>= {TARGET}x)"
    n_seq = a.prompts * a.k
    ratio_lines = [
        "| framework | median s | best s | sequences/s (best) | jax/TRL (best) | target |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for name, times, extra in (
        (f"TRL {trl['versions']['trl']} RLOOTrainer (torch)", trl_steps, " | "),
        ("nemotron_jax (jax)", jax_steps, f"{ratio:.2f}x | {verdict}"),
    ):
        best = min(times)
        ratio_lines.append(
            f"| {name} | {statistics.median(times):.3f} | {best:.3f} | {n_seq / best:.1f} "
            f"| {extra} |"
        )
    trl_len = trl["completion_lengths"]
    ours_len = statistics.mean(r["response_length"] for r in rows)
    theirs_probe = trl["probe"]
    sanity = (
        f"jax/TRL on the median step {ratio_median:.2f}x. Mean response length: jax "
        f"{ours_len:.1f}, TRL {statistics.mean(trl_len) if trl_len else float('nan'):.1f} "
        f"(of {a.max_new}). Same models (a probe row of {a.max_prompt + a.max_new} tokens): "
        f"policy mean log-prob jax {ours_probe['policy_mean_logprob']:.6f}, TRL "
        f"{theirs_probe['policy_mean_logprob']:.6f}; reward jax {ours_probe['reward']:.6f}, TRL "
        f"{theirs_probe['reward']:.6f}. TRL threads {trl['threads']}, versions {trl['versions']}"
    )
    shape = (
        f"P = {a.prompts} prompts x K = {a.k}, {a.max_new} new tokens, prompts: ours padded to "
        f"{a.max_prompt} tokens, TRL's {a.trl_prompt_tokens or a.max_prompt} tokens; "
        f"{n_seq // a.minibatch} updates of {a.minibatch} sequences per step, float32, beta "
        f"{config.rl.beta}; {len(jax_steps)} jax and {len(trl_steps)} TRL steps after one "
        f"warm-up step each, TRL then jax"
    )
    return "\n".join([f"- Config: {shape}", "", *ratio_lines, "", *phase_lines, "", sanity])


if __name__ == "__main__":
    cli_main(main)()
