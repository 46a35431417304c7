"""One REINFORCE step on CPU, broken down: generate / score / policy and reference log-probs /
updates.

Run with `python benchmarks/reinforce_step.py` (`--no-append` to only print; `--help` lists flags).

The step is the real one: `experiments/configs/reinforce.py` run by the training loop on the
generated synthetic prompts, with a random policy (also the reference) and a random reward model
of the same size written as params checkpoints first. Each step samples prompts x K responses
with the KV-cache sampler (temperature 1, `--max-new` tokens, no early stop: the stop tokens of a
random model rarely come), scores them with the reward model, computes the per-token log-probs
of policy and reference, then makes prompts x K / minibatch AdamW updates. The loop times each
phase after blocking on its result; the first step (compilation) is left out and the median of
the others is reported. Appends a section to docs/benchmarks.md unless `--no-append`.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
from pathlib import Path

from nemotron_jax.errors import ArgumentParser, cli_main

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.append(str(ROOT / "benchmarks"))

import jax  # noqa: E402
from common import (  # noqa: E402  (benchmarks/common.py)
    add_model_args,
    add_output_args,
    append_section,
    configure_host,
    host_settings,
    machine,
    model_fields,
)

from experiments.configs import reinforce  # noqa: E402
from nemotron_jax import artifact  # noqa: E402
from nemotron_jax.data import splits  # noqa: E402
from nemotron_jax.experiment import run_experiment  # noqa: E402
from nemotron_jax.metrics import read_metrics  # noqa: E402
from nemotron_jax.models.llama import LlamaConfig, init_params  # noqa: E402
from nemotron_jax.models.reward import init_reward_params  # noqa: E402
from nemotron_jax.train.objective import model_config  # noqa: E402

PHASES = (
    "time_generate",
    "time_score",
    "time_policy_logprobs",
    "time_reference_logprobs",
    "time_update",
)


def parse_args() -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=16, help="prompts per step (P)")
    p.add_argument("--k", type=int, default=4, help="samples per prompt (K)")
    p.add_argument("--minibatch", type=int, default=16, help="sequences per update")
    p.add_argument("--max-new", type=int, default=64, help="generated tokens per response")
    p.add_argument("--steps", type=int, default=6, help="steps; the first is compilation")
    add_model_args(p)
    p.add_argument("--tiny", action="store_true", help="the `tiny` preset instead of the sizes")
    add_output_args(p)
    return p.parse_args()


def overrides(a: argparse.Namespace) -> dict:
    if a.tiny:
        return {}
    return model_fields(a)


def write_models(config, root: Path) -> tuple[str, str]:
    """Random policy and reward-model artifacts that read with the run's tokenizer."""
    mcfg: LlamaConfig = model_config(config)
    tokenizer = splits.configured_tokenizer(config.data)
    text = dict(tokenizer=tokenizer, template=config.data.template, max_len=config.data.max_len)
    policy, rm = root / "policy", root / "rm"
    artifact.save(
        policy, init_params(mcfg, jax.random.PRNGKey(0)), config=mcfg, kind="causal_lm", **text
    )
    artifact.save(
        rm, init_reward_params(mcfg, jax.random.PRNGKey(1)), config=mcfg, kind="reward_model",
        num_attributes=9, **text,
    )  # fmt: skip
    return str(policy), str(rm)


def main() -> None:
    a = parse_args()
    configure_host()
    jax.config.update("jax_compilation_cache_dir", str(ROOT / ".cache" / "jax"))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        config = reinforce.get_config("")
        with config.unlocked():
            config.model.overrides = overrides(a)
        config.progress, config.tensorboard = False, False
        config.rl.prompts_per_step, config.rl.num_rollouts_per_prompt = a.prompts, a.k
        config.rl.max_new_tokens = a.max_new
        config.batch_size = a.minibatch
        config.num_steps, config.log_every = a.steps, 1
        config.eval_every = config.checkpoint_every = 10**6
        policy, rm = write_models(config, root)
        config.init_from, config.rm_from = policy, rm
        config.reward_fn = ""
        # Random models almost never emit a stop token: every response runs to max_new.
        run_experiment(config, str(root / "run"))
        rows = read_metrics(str(root / "run"), "train")[1:]
    print(rows[0])
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

Machine: {machine()}; jax {jax.__version__}, float32, {os.cpu_count()} threads.
Host settings: {host_settings()}.
Model: {model}. P = {a.prompts} prompts x K = {a.k} samples, {a.max_new} new tokens, prompts of
up to {config.rl.max_prompt_len} tokens, {n_seq // a.minibatch} updates of {a.minibatch}
sequences per step; median of {len(rows)} steps after the first.

{chr(10).join(table)}

{summary}.
"""
    append_section(a.append, section)


if __name__ == "__main__":
    cli_main(main)()
