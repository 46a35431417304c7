"""nemotron_jax params checkpoint (orbax) -> Hugging Face directory.

    python tools/convert_to_hf.py --ckpt ckpts/70b --out hf/70b --kind causal_lm

Writes config.json, generation_config.json, safetensors shards of about 5 GB with
`model.safetensors.index.json`, and the tokenizer files kept in `CKPT/tokenizer/`. Streams: one
layer slice is read from the checkpoint per HF tensor, so host memory is about one shard.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from nemotron_jax.errors import ConfigError, cli_main  # noqa: E402

# Reward-model kinds are listed so that asking for them says what to do, not "invalid choice".
REWARD_KINDS = ("sequence_classification", "nemotron_reward")


@cli_main
def main() -> int:
    from nemotron_jax.convert.hf_llama import DEFAULT_SHARD_BYTES, KINDS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, help="params checkpoint directory")
    parser.add_argument("--out", required=True, help="HF directory to create")
    parser.add_argument(
        "--kind", default="causal_lm", choices=sorted(set(KINDS) | set(REWARD_KINDS))
    )
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        help="tensor dtype in the files (default: the checkpoint's)",
    )
    parser.add_argument("--max-shard-gb", type=float, default=DEFAULT_SHARD_BYTES / 1e9)
    args = parser.parse_args()
    if args.kind not in KINDS:
        raise ConfigError(
            f"--kind {args.kind} needs a reward-model checkpoint with a reward "
            f"head; this tool currently exports {sorted(KINDS)}"
        )

    from nemotron_jax.checkpoint import load_model_config, read_leaf
    from nemotron_jax.convert import save_hf

    config = load_model_config(args.ckpt)
    tok_dir = os.path.join(args.ckpt, "tokenizer")
    save_hf(
        args.out,
        config,
        lambda path, layer: read_leaf(args.ckpt, path, layer),
        kind=args.kind,
        dtype=args.dtype,
        max_shard_bytes=int(args.max_shard_gb * 1e9),
        tokenizer_dir=tok_dir if os.path.isdir(tok_dir) else None,
        progress=True,
    )
    print(f"wrote {args.out}: {sorted(os.listdir(args.out))}")
    return 0


if __name__ == "__main__":
    main()
