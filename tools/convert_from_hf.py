"""Hugging Face Llama directory -> nemotron_jax params checkpoint (orbax).

    python tools/convert_from_hf.py --hf-dir /path/to/Llama-3.1-70B-Instruct --out ckpts/70b
    python tools/convert_from_hf.py --hf-dir /path/to/Nemotron-70B-Reward-HF --out ckpts/rm \
        --as-reward-model

Streams: each HF tensor is read (memory-mapped) only when its slice of the stacked parameter is
written, so host memory stays near a few layer slices, far below one 5 GB shard. The checkpoint
holds the params (`CKPT/params`), the model config (`CKPT/metadata`, key `model_config`) and the
tokenizer files found in the HF dir (`CKPT/tokenizer/`); `--tokenizer` and `--template` record
how the model reads text (default: the Llama-3.1 tokenizer and chat template), which the
training and evaluation tools check. Read it back with
`nemotron_jax.artifact.load(CKPT)`.

Reward models: a `LlamaForSequenceClassification` directory, or with `--as-reward-model` a
`LlamaForCausalLM` whose lm_head row 0 is the reward (NVIDIA's Nemotron-Reward-HF layout),
becomes reward-model params with metadata kind "reward_model" and num_attributes 9: the HF
reward row in head slot 4, the other slots zero, a zero bias.

LoRA adapters in PEFT's format come in with the HF base they apply to:

    python tools/convert_from_hf.py --hf-dir hf/base --peft-adapter hf/adapter --out ckpts/lora

The checkpoint then has the base's weights plus the adapters (`lora_rank`, `lora_alpha`,
`lora_targets`, `lora_dropout` from `adapter_config.json`); a reward model's head comes from our
own `nemotron_head.safetensors` when the adapter has one (bit-exact), else from PEFT's `score`.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from nemotron_jax.errors import ArgumentParser, ConfigError, cli_main  # noqa: E402


@cli_main
def main() -> int:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hf-dir", required=True, help="HF model directory (safetensors)")
    parser.add_argument("--out", required=True, help="checkpoint directory to create")
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        help="store params in this dtype (default: the dtype of the HF files)",
    )
    parser.add_argument(
        "--as-reward-model",
        action="store_true",
        help="read a LlamaForCausalLM as a Nemotron reward model (reward = lm_head row 0)",
    )
    parser.add_argument(
        "--tokenizer",
        choices=["llama3", "none"],
        default="llama3",
        help="the tokenizer the model reads, recorded in the metadata (llama3: Meta's Llama-3.1 "
        "tokenizer from the llama-models package)",
    )
    parser.add_argument(
        "--template",
        choices=["llama3", "nemo"],
        default="llama3",
        help="the chat template the model was trained with, recorded in the metadata "
        "(Llama-3.1-Instruct and Nemotron-Reward-HF: llama3)",
    )
    parser.add_argument(
        "--peft-adapter",
        help="a PEFT LoRA adapter directory for the --hf-dir base, stored with the base",
    )
    parser.add_argument(
        "--allow-unused",
        action="store_true",
        help="convert even when the HF files hold tensors no parameter reads (they are left out)",
    )
    args = parser.parse_args()

    from nemotron_jax import artifact
    from nemotron_jax.convert.hf_llama import (
        abstract_params_for,
        copy_tokenizer_files,
        make_reader,
        open_hf,
    )
    from nemotron_jax.models.reward import HELPFULNESS_SLOT

    overrides = {"param_dtype": args.dtype, "dtype": args.dtype} if args.dtype else {}
    config, ckpt = open_hf(
        args.hf_dir,
        as_reward_model=args.as_reward_model,
        allow_unused=args.allow_unused,
        **overrides,
    )
    kind = ckpt.kind
    print(
        f"{args.hf_dir}: {config.num_layers} layers, hidden {config.hidden_size}, "
        f"{len(ckpt.names)} tensors, storing {config.param_dtype}"
    )
    if kind.is_reward:
        print(
            f"reading it as a reward model ({kind.kind}): the HF reward row goes to head slot "
            f"{HELPFULNESS_SLOT} of {kind.num_attributes}, other slots and the bias are zero"
        )
    fill_fn = make_reader(config, ckpt)
    if args.peft_adapter:
        from nemotron_jax.convert.peft_lora import adapter_reader, read_adapter_config
        from nemotron_jax.models import lora

        fields, task = read_adapter_config(args.peft_adapter)
        if (task == "SEQ_CLS") != kind.is_reward:
            raise ConfigError(
                f"--peft-adapter {args.peft_adapter} has task_type {task!r} but --hf-dir "
                f"{args.hf_dir} is read as a {kind.kind}: a reward adapter (SEQ_CLS) needs a "
                f"LlamaForSequenceClassification base, an LM adapter a LlamaForCausalLM"
            )
        config = config.replace(**fields)
        read_base, read_adapter = fill_fn, adapter_reader(config, args.peft_adapter)
        head_file = os.path.join(args.peft_adapter, "nemotron_head.safetensors")

        def fill_fn(path, layer):  # the head: PEFT's modules_to_save replace the base's
            if lora.is_adapter(path) or (kind.is_reward and path[0] == "reward_head"):
                return read_adapter(path, layer)
            return read_base(path, layer)

        print(
            f"{args.peft_adapter}: LoRA rank {config.lora_rank}, alpha {config.lora_alpha:g}, "
            f"on {', '.join(config.lora_targets)}"
        )
    num_attributes = kind.num_attributes
    if args.peft_adapter and kind.is_reward and os.path.exists(head_file):
        from safetensors import safe_open

        with safe_open(head_file, framework="numpy") as f:
            num_attributes = int(f.get_slice("bias").get_shape()[0])
    metadata = {**kind.metadata(), **({"num_attributes": num_attributes} if kind.is_reward else {})}
    artifact.save(
        args.out,
        abstract_params_for(config, kind.kind, num_attributes),
        fill_fn=fill_fn,
        config=config,
        **metadata,
        tokenizer=None if args.tokenizer == "none" else args.tokenizer,
        template=args.template,
        extra={"source": str(args.hf_dir)}
        | ({"peft_adapter": str(args.peft_adapter)} if args.peft_adapter else {}),
    )
    tok_dir = os.path.join(args.out, "tokenizer")
    os.makedirs(tok_dir, exist_ok=True)
    copied = copy_tokenizer_files(args.hf_dir, tok_dir)
    print(f"wrote {args.out}" + (f" (tokenizer files: {', '.join(copied)})" if copied else ""))
    return 0


if __name__ == "__main__":
    main()
