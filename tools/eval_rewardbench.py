"""Scores a reward model on RewardBench-format rows and prints RewardBench's section scores.

    python tools/eval_rewardbench.py --ckpt runs/rm_bt/params --data filtered.jsonl \
        --out results.json --save-scores scores.jsonl
    python tools/eval_rewardbench.py --scores scores.jsonl     # aggregation only, no model

`--data` holds rows `{prompt, chosen, rejected, subset[, id]}` (e.g. allenai/reward-bench's
`filtered` split, or ../shared/data/llmbar/rewardbench_format.jsonl). `--scores` holds rows
`{subset, score_chosen, score_rejected[, id]}`, a null score meaning "not scored". A row is
correct iff reward(chosen) > reward(rejected); ties and rows too long to encode count as wrong.
Sections with missing or incomplete subsets are printed as PARTIAL; subsets that are not
RewardBench's are reported under "other".
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import numpy as np  # noqa: E402

from nemotron_jax import runtime  # noqa: E402
from nemotron_jax.errors import ArgumentParser, ConfigError, cli_main  # noqa: E402


def _weights(text: str | None) -> list[float] | None:
    if not text:
        return None
    try:
        return [float(w) for w in text.split(",")]
    except ValueError as e:
        raise ConfigError(f"--weights {text!r}: expected comma-separated numbers") from e


@cli_main
def main() -> int:
    runtime.configure_cpu()  # before the first computation: see nemotron_jax/runtime.py
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", help="reward-model params checkpoint (a run's <workdir>/params)")
    parser.add_argument("--data", help="RewardBench-format .jsonl/.jsonl.gz/.parquet")
    parser.add_argument("--scores", help="per-row scores .jsonl: aggregate only (no model)")
    parser.add_argument("--template", choices=["llama3", "nemo"], help="default: the ckpt's")
    parser.add_argument("--max-len", type=int, help="token budget per side; default: the ckpt's")
    parser.add_argument(
        "--truncation",
        choices=["truncate", "skip", "right"],
        default="truncate",
        help="over-long rows: truncate (default: cut the prompt from the left, keeping the "
        "response whole), skip (leave unscored, counted wrong), or right (reward-bench's own: "
        "keep the first --max-len tokens, default 2048, for numbers comparable with its "
        "leaderboard)",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per forward pass")
    parser.add_argument("--slot", type=int, default=4, help="head output read (4 = helpfulness)")
    parser.add_argument("--weights", help="comma-separated merge weights over all head outputs")
    parser.add_argument("--out", help="write the report (and run settings) as JSON here")
    parser.add_argument("--save-scores", help="write per-row scores here (--scores format)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args()

    from nemotron_jax.eval import rewardbench as rb

    info: dict = {}
    if args.scores:
        if args.ckpt or args.data or args.save_scores:
            raise ConfigError(
                "--scores aggregates existing scores; drop --ckpt, --data and --save-scores"
            )
        subsets, chosen, rejected, _ = rb.read_scores(args.scores)
        info["scores"] = args.scores
    else:
        if not (args.ckpt and args.data):
            raise ConfigError("pass --ckpt and --data (or --scores FILE to aggregate only)")
        if args.batch_size < 1:
            raise ConfigError(f"--batch-size must be positive, got {args.batch_size}")
        from nemotron_jax.data.helpsteer2 import read_rewardbench

        rows, read_report = read_rewardbench(args.data)
        if not rows:
            raise ConfigError(f"{args.data}: no rows")
        model = rb.load_reward_model(args.ckpt)
        if args.truncation == "right" and args.max_len is None:
            args.max_len = 2048  # reward-bench's max_length
        chosen, rejected, fmt = rb.score_pairs(
            model,
            rows,
            batch_size=args.batch_size,
            slot=args.slot,
            weights=_weights(args.weights),
            max_len=args.max_len,
            template=args.template,
            truncation=args.truncation,
            progress=not args.no_progress,
        )
        subsets = [r.subset for r in rows]
        print(f"{args.data}: {len(rows)} rows; encoding {fmt.summary()}")
        unscored = [i for i in range(len(rows)) if not np.isfinite(chosen[i] + rejected[i])]
        if unscored:
            need = rb.tokens_needed(model, [rows[i] for i in unscored], template=args.template)
            print(
                f"{len(unscored)} rows unscored (counted wrong): too long for --max-len "
                f"{args.max_len or model.max_len}; --max-len {need} scores them"
            )
        if args.save_scores:
            rb.write_scores(args.save_scores, rows, chosen, rejected)
        info.update(
            ckpt=model.path,
            data=args.data,
            template=args.template or model.template,
            max_len=args.max_len or model.max_len,
            truncation=args.truncation,
            slot=args.slot,
            weights=_weights(args.weights),
            encoding=dataclasses.asdict(fmt),
            read=dataclasses.asdict(read_report),
        )
    report = rb.rewardbench_report(subsets, chosen, rejected)
    print(rb.format_report(report))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({**info, "report": report}, f, indent=2)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    main()
