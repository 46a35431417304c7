"""nemotron_jax params checkpoint (orbax) -> Hugging Face directory.

    python tools/convert_to_hf.py --ckpt ckpts/70b --out hf/70b --kind causal_lm
    python tools/convert_to_hf.py --ckpt runs/rm/params --out hf/rm --kind sequence_classification
    python tools/convert_to_hf.py --ckpt runs/rm/params --out hf/rm --kind nemotron_reward

Writes config.json, generation_config.json, safetensors shards of about 5 GB with
`model.safetensors.index.json`, and the tokenizer files kept in `CKPT/tokenizer/`. Streams: one
layer slice is read from the checkpoint per HF tensor, so host memory is about one shard.

`causal_lm` takes an LM checkpoint. The reward kinds take a reward-model checkpoint (metadata
kind "reward_model", a `reward_head`) and export one scalar reward: head output `--reward-slot`
(default 4, helpfulness) or the merge `--reward-weights`. `sequence_classification` writes a
`LlamaForSequenceClassification` (`score.weight`, read by HF at the last non-pad token);
`nemotron_reward` writes a `LlamaForCausalLM` whose lm_head row 0 is the reward, as NVIDIA's
Llama-3.1-Nemotron-70B-Reward-HF (reward = logit of token 0 at the last token). HF heads have no
bias: the head bias is dropped, so HF rewards are ours minus that constant (printed, and kept
in `OUT/reward_head.json`); rankings are unchanged.

A checkpoint trained with LoRA (`lora.rank > 0`) exports one of three ways:

    python tools/convert_to_hf.py --ckpt runs/sft_lora/params --out hf/merged --merge-lora
    python tools/convert_to_hf.py --ckpt runs/sft_lora/params --out hf/base --base-only
    python tools/convert_to_hf.py --ckpt runs/sft_lora/params --out hf/adapter --kind peft

`--merge-lora` writes the plain model with W + (alpha / R) A @ B; `--base-only` the frozen base
the adapters train on (the HF base of the PEFT adapter); `--kind peft` the adapters in PEFT's
format (`adapter_config.json`, `adapter_model.safetensors`; a reward model's head in
`modules_to_save` as `score`), loaded with `peft.PeftModel.from_pretrained(base, OUT)` on that
base (a `LlamaForSequenceClassification` for a reward model).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from nemotron_jax.errors import ArgumentParser, ConfigError, cli_main  # noqa: E402


def _weights(text: str) -> list[float]:
    try:
        return [float(w) for w in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not comma-separated numbers: {text!r}") from None


@cli_main
def main() -> int:
    from nemotron_jax.convert.hf_llama import DEFAULT_SHARD_BYTES, KINDS, REWARD_KINDS

    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, help="params checkpoint directory")
    parser.add_argument("--out", required=True, help="HF directory to create")
    parser.add_argument(
        "--kind",
        help=f"one of {sorted(KINDS)}, or peft (a LoRA checkpoint's adapters); default "
        "causal_lm, or sequence_classification for a reward model's adapters",
    )
    parser.add_argument(
        "--merge-lora", action="store_true", help="LoRA checkpoints: merge the adapters in"
    )
    parser.add_argument(
        "--base-only",
        action="store_true",
        help="LoRA checkpoints: the frozen base without its adapters (the PEFT adapter's base)",
    )
    parser.add_argument(
        "--base-model",
        help="--kind peft: base_model_name_or_path recorded in adapter_config.json",
    )
    parser.add_argument(
        "--reward-slot", type=int, help="reward kinds: the head output to export (default 4)"
    )
    parser.add_argument(
        "--reward-weights",
        type=_weights,
        help="reward kinds: comma-separated merge weights, one per head output (not with "
        "--reward-slot)",
    )
    parser.add_argument(
        "--pad-token-id",
        type=int,
        help="reward kinds: pad id for config.json (default: the model config's, else 128004 "
        "for the Llama-3 vocabulary); it must not end a real sequence",
    )
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        help="tensor dtype in the files (default: the checkpoint's)",
    )
    parser.add_argument("--max-shard-gb", type=float, default=DEFAULT_SHARD_BYTES / 1e9)
    args = parser.parse_args()

    from nemotron_jax import artifact
    from nemotron_jax.checkpoint import read_leaf
    from nemotron_jax.convert import save_hf
    from nemotron_jax.convert.hf_llama import read_reward_head_info
    from nemotron_jax.models.reward import HELPFULNESS_SLOT

    model = artifact.load(args.ckpt, restore=False)
    config, ckpt_kind = model.config, model.kind
    peft = args.kind == "peft"
    if args.kind is None:
        args.kind = "causal_lm"
    elif not peft and args.kind not in KINDS:
        raise ConfigError(f"--kind {args.kind!r}; choose from {sorted(KINDS) + ['peft']}")
    if config.lora_rank:
        ways = [f for f, on in (("--merge-lora", args.merge_lora), ("--base-only", args.base_only),
                                ("--kind peft", peft)) if on]  # fmt: skip
        if len(ways) != 1:
            raise ConfigError(
                f"{args.ckpt} has LoRA adapters (rank {config.lora_rank}, "
                f"{', '.join(config.lora_targets)}): give one of --merge-lora (the plain merged "
                f"model), --base-only (the frozen base) or --kind peft (the adapters)"
                + (f", not {' and '.join(ways)}" if ways else "")
            )
    elif args.merge_lora or args.base_only or peft:
        flag = "--kind peft" if peft else ("--merge-lora" if args.merge_lora else "--base-only")
        raise ConfigError(f"{flag}: {args.ckpt} has no LoRA adapters (lora_rank 0)")
    if peft:
        return _export_peft(args, model)
    reward_export = args.kind in REWARD_KINDS
    if reward_export and ckpt_kind != "reward_model":
        raise ConfigError(
            f"--kind {args.kind} needs a reward-model checkpoint (metadata kind 'reward_model', "
            f"with a reward_head); {args.ckpt} is a {ckpt_kind} checkpoint: use --kind causal_lm"
        )
    if not reward_export and ckpt_kind == "reward_model":
        raise ConfigError(
            f"--kind {args.kind} needs a causal-LM checkpoint with an lm_head; {args.ckpt} is a "
            f"reward model (metadata kind 'reward_model'): use --kind sequence_classification "
            f"or --kind nemotron_reward"
        )
    given = [
        f for f in ("reward_slot", "reward_weights", "pad_token_id") if getattr(args, f) is not None
    ]
    if not reward_export and given:
        flags = ", ".join("--" + f.replace("_", "-") for f in given)
        raise ConfigError(f"{flags} only apply to the reward kinds {list(REWARD_KINDS)}")
    if args.reward_slot is not None and args.reward_weights is not None:
        raise ConfigError("give --reward-slot or --reward-weights, not both")
    reward_args = {}
    if reward_export:
        slot = HELPFULNESS_SLOT if args.reward_slot is None else args.reward_slot
        reward_args = dict(
            reward_slot=slot, reward_weights=args.reward_weights, pad_token_id=args.pad_token_id
        )

    tok_dir = os.path.join(model.path, "tokenizer")
    read = read_leaf
    if config.lora_rank:
        from nemotron_jax.models import lora

        read = artifact.read_merged_leaf if args.merge_lora else read_leaf
        config = lora.base_config(config)
    save_hf(
        args.out,
        config,
        lambda path, layer: read(model.path, path, layer),
        kind=args.kind,
        dtype=args.dtype,
        max_shard_bytes=int(args.max_shard_gb * 1e9),
        # Converted HF checkpoints keep tokenizer files in CKPT/tokenizer/; training runs keep
        # their SentencePiece model as CKPT/tokenizer.model.
        tokenizer_dir=tok_dir if os.path.isdir(tok_dir) else model.path,
        progress=True,
        **reward_args,
    )
    print(f"wrote {args.out}: {sorted(os.listdir(args.out))}")
    info = read_reward_head_info(args.out)
    if info is not None:
        what = (
            f"head output {info['reward_slot']}"
            if info["reward_weights"] is None
            else f"merge weights {info['reward_weights']}"
        )
        print(
            f"reward: {what}; dropped head bias {info['dropped_bias']:.9g}: HF rewards are "
            f"nemotron_jax rewards minus it (add it back for absolute rewards; rankings are "
            f"unchanged); pad_token_id {info['pad_token_id']}"
        )
    return 0


def _export_peft(args, model) -> int:
    from nemotron_jax.checkpoint import read_leaf
    from nemotron_jax.convert.peft_lora import save_adapter
    from nemotron_jax.models.reward import HELPFULNESS_SLOT

    if args.pad_token_id is not None:
        raise ConfigError("--pad-token-id applies to full HF exports, not --kind peft")
    if not model.is_reward and (args.reward_slot is not None or args.reward_weights is not None):
        raise ConfigError("--reward-slot and --reward-weights apply to reward models")
    if args.reward_slot is not None and args.reward_weights is not None:
        raise ConfigError("give --reward-slot or --reward-weights, not both")
    save_adapter(
        args.out,
        model.config,
        lambda path, layer: read_leaf(model.path, path, layer),
        reward=model.is_reward,
        reward_slot=HELPFULNESS_SLOT if args.reward_slot is None else args.reward_slot,
        reward_weights=args.reward_weights,
        dtype=args.dtype or "float32",
        base_model=args.base_model,
    )
    base = "a LlamaForSequenceClassification" if model.is_reward else "a LlamaForCausalLM"
    print(
        f"wrote {args.out}: {sorted(os.listdir(args.out))}; load it on {base} of this "
        f"checkpoint's base (tools/convert_to_hf.py --base-only)"
    )
    return 0


if __name__ == "__main__":
    main()
