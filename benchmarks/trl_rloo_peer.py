"""The TRL side of `benchmarks/reinforce_step.py`: TRL's own `RLOOTrainer` running RLOO steps
(generation included) on saved HF models, in the TRL virtualenv that `reinforce_step.py` makes
(TRL's pins may clash with the project's). Prints one JSON line: per-step seconds and phases,
completion lengths, a probe of the loaded models, versions.

    <venv>/bin/python -P benchmarks/trl_rloo_peer.py --policy DIR --rm DIR --spec spec.json

One step here is what one step of our loop does: one generation batch of P prompts x K samples,
scored, with old and reference log-probs, then P*K / minibatch optimizer steps over it. TRL
counts each optimizer step as a trainer step (`steps_per_generation` of them per generation),
so a callback sums the trainer steps of each generation batch into one step.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

PHASES = ("generate", "score", "policy_logprobs", "reference_logprobs")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--policy", required=True, help="a saved LlamaForCausalLM directory")
    p.add_argument("--rm", required=True, help="a saved LlamaForSequenceClassification directory")
    p.add_argument("--spec", required=True, help="JSON: sizes, optimizer, token ids, probe")
    p.add_argument("--threads", type=int, default=0)
    a = p.parse_args()
    with open(a.spec) as f:
        spec = json.load(f)

    import numpy as np
    import torch
    import transformers
    import trl
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers

    if a.threads:
        torch.set_num_threads(a.threads)
    f32 = dict(dtype=torch.float32, attn_implementation="sdpa")
    policy = transformers.AutoModelForCausalLM.from_pretrained(a.policy, **f32)
    rm = transformers.AutoModelForSequenceClassification.from_pretrained(a.rm, num_labels=1, **f32)
    vocab = policy.config.vocab_size
    # A word-level tokenizer whose word "t<i>" is token i: TRL's text round trips (prompts in,
    # completions decoded, prompt + completion re-tokenized for the reward model) keep exactly
    # the token ids, so every prompt is `prompt_len` tokens and every scored row P + N.
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t1"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=f"t{spec['stop_tokens'][0]}",
        pad_token=f"t{spec['pad_id']}",
        unk_token="t1",
        padding_side="left",
    )
    # Our sampler stops a row at any of these; TRL ends a completion at the model's eos ids.
    policy.generation_config.eos_token_id = list(spec["stop_tokens"])

    def text(ids):
        # The trailing space keeps "prompt + completion" (TRL joins the strings) two words apart.
        return "".join(f"t{int(i)} " for i in ids)

    # The same sanity numbers the parent computes with our models: mean log-prob of the probe
    # row under the policy and the reward model's score of it (before any update).
    probe = torch.tensor([spec["probe"]])
    with torch.no_grad():
        logits = policy(probe).logits.float()
        logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, probe[:, 1:, None])
        probe_out = {
            "policy_mean_logprob": float(logp.mean()),
            "reward": float(rm(probe).logits[0, 0]),
        }

    n_prompts, k, steps = spec["prompts"], spec["k"], spec["steps"]
    updates = n_prompts * k // spec["minibatch"]  # optimizer steps per generation batch
    rng = np.random.default_rng(spec["seed"])
    low = max(spec["stop_tokens"] + [spec["pad_id"], 1]) + 1  # prompts hold no special token
    ids = rng.integers(low, vocab, size=(n_prompts * steps, spec["prompt_len"]))
    dataset = Dataset.from_dict({"prompt": [text(row) for row in ids]})

    cycles: list[dict] = []
    lengths: list[float] = []

    class Timer(transformers.TrainerCallback):
        """Sums the trainer steps of each generation batch (one of our steps) and its phases."""

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step % updates == 0:
                cycles.append({"total": 0.0, **dict.fromkeys(PHASES, 0.0)})
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            cycles[-1]["total"] += time.perf_counter() - self.t0

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "completions/mean_length" in logs:
                lengths.append(float(logs["completions/mean_length"]))

    o = spec["optim"]
    with tempfile.TemporaryDirectory() as out:
        config = trl.RLOOConfig(
            output_dir=out,
            num_generations=k,
            max_completion_length=spec["max_new"],
            per_device_train_batch_size=spec["minibatch"],  # sequences per optimizer step
            gradient_accumulation_steps=1,
            steps_per_generation=updates,  # one generation batch = P * K sequences
            num_iterations=1,  # one pass over each generation batch, as ours (rl.epochs 1)
            max_steps=steps * updates,
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            beta=spec["beta"],
            learning_rate=o["lr"],
            lr_scheduler_type="constant",
            warmup_steps=0,
            adam_beta1=o["b1"],
            adam_beta2=o["b2"],
            adam_epsilon=o["eps"],
            weight_decay=o["weight_decay"],
            max_grad_norm=o["clip_norm"],
            gradient_checkpointing=False,  # ours: model.remat none
            bf16=False,  # TRL's default is bf16 autocast; both sides run float32
            fp16=False,
            use_cpu=True,
            use_vllm=False,
            shuffle_dataset=False,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            disable_tqdm=True,
            dataloader_num_workers=0,
            seed=spec["seed"],
            data_seed=spec["seed"],
        )
        trainer = trl.RLOOTrainer(
            model=policy,
            reward_funcs=rm,
            args=config,
            train_dataset=dataset,
            processing_class=tokenizer,
            reward_processing_classes=tokenizer,
            callbacks=[Timer()],
        )
        _time_phases(trainer, cycles, torch)
        trainer.train()
    print(
        json.dumps(
            {
                "steps": cycles,
                "completion_lengths": lengths,
                "probe": probe_out,
                "versions": {
                    "trl": trl.__version__,
                    "torch": torch.__version__,
                    "transformers": transformers.__version__,
                },
                "threads": torch.get_num_threads(),
            }
        )
    )


def _time_phases(trainer, cycles: list[dict], torch) -> None:
    """Wraps the trainer's generation, reward and no-grad log-prob calls (instance attributes
    shadow the methods) to add their wall time to the current step's phases; what remains of a
    step is its updates plus TRL's bookkeeping."""

    def timed(fn, phase_of):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            phase = phase_of(*args)
            if phase and cycles:
                cycles[-1][phase] += time.perf_counter() - t0
            return out

        return wrapper

    def logprob_phase(model, *_):
        if torch.is_grad_enabled():  # the loss's forward: part of the update
            return None
        return "reference_logprobs" if model is trainer.ref_model else "policy_logprobs"

    trainer._generate_single_turn = timed(trainer._generate_single_turn, lambda *_: "generate")
    trainer._calculate_rewards = timed(trainer._calculate_rewards, lambda *_: "score")
    trainer._get_per_token_logps_and_entropies = timed(
        trainer._get_per_token_logps_and_entropies, logprob_phase
    )


if __name__ == "__main__":
    main()
