"""The Tunix side of `benchmarks/dpo_step.py`: Tunix's own `DPOTrainer` (flax.nnx, jax) training
a saved HF Llama on given token pairs, run in the Tunix virtualenv that `dpo_step.py` makes
(Tunix's jax / flax pins may clash with the project's). Prints one JSON line: per-step seconds,
the first step's loss, whether the reference forward is in the step, versions.

    <venv>/bin/python -P benchmarks/tunix_dpo_peer.py --model DIR --data pairs.npz --repeats 6

The model is Tunix's `Llama3` built by Tunix's own safetensors loader
(`tunix.models.llama3.params.create_model_from_safe_tensors`) from the benchmark's saved
`LlamaForCausalLM`, so the weights are the same, in float32. One difference stays: Tunix's
Llama3 attention applies RoPE with a fixed theta of 1e6 and no Llama-3.1 frequency scaling
(it does not pass `ModelConfig.rope_theta`), so its log-probs differ a little from HF's and
ours; the cost of a step does not (the same ops). The first-step loss is log 2 all the same,
as the policy equals the reference.

Tunix's `DPOTrainer` has no way to take precomputed reference log-probs: it computes them with a
forward pass of `ref_model` in `_prepare_inputs`, once per batch, inside its training loop
(`ref_model=None` drops the reference term from the loss instead). So by default
(`--reference in-step`) each timed step includes that reference forward (JSON
`"reference_in_step": true`), unlike ours and TRL's (`precompute_ref_log_probs=True`).
`--reference precomputed` is a like-for-like variant that is not stock Tunix: a subclass runs
Tunix's reference pass once before training and hands the cached log-probs to every step
(every step trains the same batch).

The step is Tunix's `PeftTrainer.train()` loop (full fine-tuning: no LoRA, so `nnx.Param`
is trained) with Tunix's jitted train step, `max_inflight_computations` as default. Each step is
timed from one batch fetch to the next, the fetch first blocking until the previous step's
parameters are ready, so a step's time covers input preparation (the reference forward
included, when in the step), the train step and Tunix's per-step bookkeeping. The first two
steps compile (JSON `"warmup": 2`): Tunix's optimizer state starts uncommitted to a device, so
its train step compiles again once the first update has committed it. The optimizer is optax
AdamW (`--optim`, the benchmark's settings) after global-norm clipping, with norm scales not
decayed, as nemotron_jax's `make_optimizer`. jax runs with its defaults here (the project's
`configure_cpu` is not applied).
"""

from __future__ import annotations

import argparse
import json
import os
import time

# Steps that compile: Tunix's jitted train step compiles twice, as its optimizer state starts
# uncommitted to a device and is committed after the first update.
WARMUP = 2
OPTIM = dict(lr=1e-5, b1=0.9, b2=0.98, eps=1e-8, weight_decay=0.1, clip_norm=1.0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a saved LlamaForCausalLM directory")
    p.add_argument("--data", required=True, help="npz: prompt [B, P], chosen / rejected [B, R-1]")
    p.add_argument("--repeats", type=int, default=6, help=f"timed steps, after {WARMUP} warm-up")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--optim", type=json.loads, default=OPTIM, help="JSON, keys as OPTIM")
    p.add_argument(
        "--reference", choices=("in-step", "precomputed"), default="in-step",
        help="in-step: stock Tunix (a reference forward per step); precomputed: once, cached",
    )  # fmt: skip
    a = p.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    steps = WARMUP + a.repeats

    import flax
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    import tunix
    from flax import nnx
    from tunix.models.llama3 import model as llama3
    from tunix.models.llama3 import params as llama3_params
    from tunix.sft.dpo import dpo_trainer

    with open(os.path.join(a.model, "config.json")) as f:
        hf = json.load(f)
    config = llama3.ModelConfig(
        num_layers=hf["num_hidden_layers"],
        vocab_size=hf["vocab_size"],
        embed_dim=hf["hidden_size"],
        hidden_dim=hf["intermediate_size"],
        num_heads=hf["num_attention_heads"],
        head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        num_kv_heads=hf["num_key_value_heads"],
        # transformers 5 saves it under rope_parameters (unused by Tunix's attention, see above)
        rope_theta=int(hf.get("rope_theta") or hf["rope_parameters"]["rope_theta"]),
        norm_eps=hf["rms_norm_eps"],
        weight_tying=bool(hf.get("tie_word_embeddings", False)),
    )

    def load():
        return llama3_params.create_model_from_safe_tensors(a.model, config, dtype=jnp.float32)

    policy, reference = load(), load()  # the reference: a frozen copy of the initial weights

    data = np.load(a.data)
    eos = int(data["eos"])
    prompt = data["prompt"].astype(np.int32)

    def with_eos(x):  # the benchmark saves responses without their final EOS (TRL adds it)
        return np.concatenate([x, np.full((len(x), 1), eos)], axis=1).astype(np.int32)

    chosen, rejected = with_eos(data["chosen"]), with_eos(data["rejected"])
    batch = dpo_trainer.TrainingInput(  # no padding: every mask is all ones
        prompt_ids=prompt,
        prompt_mask=np.ones_like(prompt),
        chosen_ids=chosen,
        chosen_mask=np.ones_like(chosen),
        rejected_ids=rejected,
        rejected_mask=np.ones_like(rejected),
    )

    def decay_mask(params):  # as nemotron_jax.optim.decay_mask: norm scales are not decayed
        def keep(path, _):
            return not any("norm" in str(getattr(k, "key", k)) for k in path)

        return jax.tree_util.tree_map_with_path(keep, params)

    o = a.optim
    tx = optax.chain(
        optax.clip_by_global_norm(o["clip_norm"]),
        optax.adamw(
            o["lr"], b1=o["b1"], b2=o["b2"], eps=o["eps"], weight_decay=o["weight_decay"],
            mask=decay_mask,
        ),
    )  # fmt: skip
    training = dpo_trainer.DPOTrainingConfig(
        algorithm="dpo",
        beta=a.beta,
        label_smoothing=0.0,  # the regular (sigmoid) DPO loss
        eval_every_n_steps=steps + 1,
        max_steps=steps,
        pbar_description=None,
    )

    class PrecomputedReference(dpo_trainer.DPOTrainer):
        """Tunix's trainer with the reference log-probs of the (one) batch computed once."""

        cached = None

        def _prepare_inputs(self, training_input):
            if self.cached is None:
                self.cached = super()._prepare_inputs(training_input)
                return self.cached
            self._ref_model_exists = False  # builds the inputs without the reference forward
            example = super()._prepare_inputs(training_input)
            return example.replace(
                ref_chosen_logps=self.cached.ref_chosen_logps,
                ref_rejected_logps=self.cached.ref_rejected_logps,
            )

    trainer_class = dpo_trainer.DPOTrainer
    if a.reference == "precomputed":
        trainer_class = PrecomputedReference
    trainer = trainer_class(
        model=policy, ref_model=reference, optimizer=tx, training_config=training
    )
    if a.reference == "precomputed":
        jax.block_until_ready(trainer._prepare_inputs(batch))  # before training, untimed

    stamps: list[float] = []
    initial = np.asarray(policy.embedder.input_embedding[...]).copy()

    def batches():
        """The same batch every step; each fetch first waits for the previous step's update."""
        for _ in range(steps):
            jax.block_until_ready(nnx.state(trainer.model, nnx.Param))
            stamps.append(time.perf_counter())
            yield batch
        jax.block_until_ready(nnx.state(trainer.model, nnx.Param))
        stamps.append(time.perf_counter())

    trainer.train(batches())
    times = [t1 - t0 for t0, t1 in zip(stamps[:-1], stamps[1:], strict=True)]
    losses = trainer.metrics_logger.get_metric_history("", "loss", "train")
    moved = float(np.abs(np.asarray(policy.embedder.input_embedding[...]) - initial).max())
    print(
        json.dumps(
            {
                "times": times,
                "first_loss": float(losses[0]),
                "losses": [float(x) for x in losses],
                "reference_in_step": a.reference == "in-step",
                "warmup": WARMUP,
                "trained": moved > 0,  # the policy's weights changed
                "versions": {
                    "tunix": getattr(tunix, "__version__", None) or _version("google-tunix"),
                    "jax": jax.__version__,
                    "flax": flax.__version__,
                    "optax": optax.__version__,
                },
                "devices": str(jax.devices()),
            }
        )
    )


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


if __name__ == "__main__":
    main()
