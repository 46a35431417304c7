"""The TRL side of `benchmarks/dpo_step.py`: TRL's own `DPOTrainer` training a saved HF model on
given token pairs, run in the TRL virtualenv that `dpo_step.py` makes (TRL's pins may clash with
the project's). Prints one JSON line: per-step seconds, the first step's loss, versions.

    <venv>/bin/python benchmarks/trl_dpo_peer.py --model DIR --data pairs.npz --steps 8
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a saved LlamaForCausalLM directory")
    p.add_argument("--data", required=True, help="npz: prompt [B, P], chosen / rejected [B, R]")
    p.add_argument("--steps", type=int, default=8, help="optimizer steps (the first is warm-up)")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=0)
    a = p.parse_args()

    import numpy as np
    import torch
    import transformers
    import trl
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers

    if a.threads:
        torch.set_num_threads(a.threads)
    data = np.load(a.data)
    model = transformers.AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    vocab = model.config.vocab_size
    eos = int(data["eos"])
    # A word-level tokenizer whose word "t<i>" is token i: TRL tokenizes the text back into
    # exactly the benchmark's ids (no BOS; TRL appends the EOS token to each response).
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t1"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=f"t{eos}", pad_token="t0", unk_token="t1"
    )

    def text(ids):
        return "".join(f" t{int(i)}" for i in ids)

    b = len(data["prompt"])
    rows = {
        "prompt": [text(data["prompt"][i]) for i in range(b)],
        "chosen": [text(data["chosen"][i]) for i in range(b)],
        "rejected": [text(data["rejected"][i]) for i in range(b)],
    }
    dataset = Dataset.from_dict({k: v * a.steps for k, v in rows.items()})  # one batch per step
    times: list[float] = []
    losses: list[float] = []

    class Timer(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter() - self.t0)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    with tempfile.TemporaryDirectory() as out:
        config = trl.DPOConfig(
            output_dir=out,
            per_device_train_batch_size=b,
            max_steps=a.steps,
            learning_rate=1e-5,
            lr_scheduler_type="constant",
            warmup_steps=0,
            adam_beta1=0.9,
            adam_beta2=0.98,
            adam_epsilon=1e-8,
            weight_decay=0.1,
            max_grad_norm=1.0,
            beta=a.beta,
            loss_type=["sigmoid"],
            precompute_ref_log_probs=True,  # as ours: no reference forward inside the step
            max_length=None,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            dataloader_num_workers=0,
            seed=0,
            data_seed=0,
        )
        trainer = trl.DPOTrainer(
            model=model,
            args=config,
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=[Timer()],
        )
        trainer.train()
    print(
        json.dumps(
            {
                "times": times,
                "first_loss": losses[0] if losses else None,
                "versions": {
                    "trl": trl.__version__,
                    "torch": torch.__version__,
                    "transformers": transformers.__version__,
                },
                "threads": torch.get_num_threads(),
            }
        )
    )


if __name__ == "__main__":
    main()
