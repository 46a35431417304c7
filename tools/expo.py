"""ExPO: extrapolate a fine-tuned reward model away from its starting point.

    python tools/expo.py --base runs/reg/params --tuned runs/sbt/params --alpha 0.3 \
        --out runs/expo/params
    python tools/expo.py --base runs/reg/params --tuned runs/sbt/params \
        --alphas 0,0.1,0.2,0.5,1 --val rewardbench/filtered.jsonl --out runs/expo/params

The new params are tuned + alpha * (tuned - base), written leaf by leaf (memory ~ one layer
slice); `--no-head` keeps the tuned reward head. Sweep mode scores each alpha on validation
pairs (`--val`: RewardBench-format rows; or `--val-preference`: a HelpSteer2-Preference file, of
which the validation split's non-tie pairs are used), prints the table and writes the best alpha
(highest accuracy, then larger mean reward gap) to --out. alpha 0 is the tuned model itself.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from nemotron_jax import runtime  # noqa: E402
from nemotron_jax.errors import ArgumentParser, ConfigError, cli_main  # noqa: E402


def _alphas(text: str) -> list[float]:
    try:
        return [float(a) for a in text.split(",") if a.strip()]
    except ValueError as e:
        raise ConfigError(f"--alphas {text!r}: expected comma-separated numbers") from e


def _val_rows(args):
    from nemotron_jax.data import helpsteer2
    from nemotron_jax.data.pipeline import preference_splits

    if args.val:
        rows, _ = helpsteer2.read_rewardbench(args.val)
        return rows, args.val
    rows, _ = helpsteer2.read_preferences(args.val_preference)
    val = preference_splits(rows)["validation"]
    if any(r.preference_strength is None for r in val):
        # Extracts with raw annotations only: label them as the release does.
        from nemotron_jax.data.aggregation import aggregate_preferences

        labelled = [r for r in val if r.preference_strength is not None]
        val = labelled + aggregate_preferences([r for r in val if r.preference_strength is None])[0]
    kept = [r for r in val if r.preference_strength]
    print(
        f"{args.val_preference}: {len(val)} validation pairs, "
        f"{len(val) - len(kept)} ties or unlabelled dropped"
    )
    return kept, args.val_preference


@cli_main
def main() -> int:
    runtime.configure_cpu()  # before the first computation: see nemotron_jax/runtime.py
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="params checkpoint extrapolated away from")
    parser.add_argument("--tuned", required=True, help="params checkpoint trained from --base")
    parser.add_argument("--out", required=True, help="checkpoint directory to create")
    parser.add_argument("--alpha", type=float, help="extrapolation strength (single mode)")
    parser.add_argument("--alphas", help="comma-separated alphas to sweep (sweep mode)")
    parser.add_argument("--val", help="sweep: RewardBench-format validation rows")
    parser.add_argument("--val-preference", help="sweep: HelpSteer2-Preference file")
    parser.add_argument("--no-head", action="store_true", help="copy the tuned head unchanged")
    parser.add_argument("--batch-size", type=int, default=8, help="sweep: pairs per forward")
    parser.add_argument("--max-len", type=int, help="sweep: token budget; default: the ckpt's")
    parser.add_argument("--table", help="sweep: also write the table as JSON here")
    args = parser.parse_args()

    from nemotron_jax import expo

    include_head = not args.no_head
    if os.path.exists(args.out):
        raise ConfigError(f"--out {args.out} already exists; refusing to overwrite it")
    if (args.alpha is None) == (args.alphas is None):
        raise ConfigError("pass exactly one of --alpha (single) and --alphas (sweep)")
    if args.alpha is not None:
        if args.val or args.val_preference:
            raise ConfigError("--val/--val-preference are for sweeps (--alphas)")
        expo.extrapolate(
            args.base, args.tuned, args.out, alpha=args.alpha, include_head=include_head
        )
        print(f"wrote {args.out} (alpha={args.alpha:g}, head {'in' if include_head else 'kept'})")
        return 0

    if bool(args.val) == bool(args.val_preference):
        raise ConfigError("a sweep needs exactly one of --val and --val-preference")
    alphas = _alphas(args.alphas)
    rows, source = _val_rows(args)
    work = args.out.rstrip("/") + ".expo-sweep"
    if os.path.exists(work):
        raise ConfigError(f"{work} exists (left by an interrupted sweep?); remove it first")
    try:
        best, table = expo.sweep(
            args.base,
            args.tuned,
            alphas,
            eval_rows=rows,
            out_root=work,
            keep="best",
            include_head=include_head,
            batch_size=args.batch_size,
            max_len=args.max_len,
        )
        print(f"validation: {source}, {len(rows)} pairs")
        print(expo.format_table(table, best))
        kept = next(e for e in table if e["alpha"] == best)
        if best == 0:  # the tuned model itself: write a copy carrying the expo metadata
            expo.extrapolate(args.base, args.tuned, args.out, alpha=0.0, include_head=include_head)
        else:
            os.replace(kept["path"], args.out)
            kept["path"] = args.out
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.table:
        with open(args.table, "w", encoding="utf-8") as f:
            json.dump({"best_alpha": best, "validation": source, "table": table}, f, indent=2)
    print(f"wrote {args.out} (best alpha={best:g})")
    return 0


if __name__ == "__main__":
    main()
