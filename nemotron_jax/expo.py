"""ExPO model extrapolation (Zheng et al., arXiv 2404.16792; helpsteer2_spec.md §2.3, stage 3):

    theta = theta_tuned + alpha * (theta_tuned - theta_base)

In the HelpSteer2-Preference recipe `base` is the stage-1 regression RM and `tuned` the stage-2
Scaled-BT RM initialised from it. alpha is tuned on validation pairs (`sweep`); alpha = 0 is the
tuned model itself.

    extrapolate("runs/reg/params", "runs/sbt/params", "runs/expo/params", alpha=0.3)
    best, table = sweep("runs/reg/params", "runs/sbt/params", [0, 0.1, 0.3, 1], eval_rows=rows)

Checkpoints trained with LoRA are extrapolated as the plain models they compute: each adapted
weight is read merged, W + (alpha_lora / R) A @ B, and the result has no adapters (stage 2 of a
LoRA recipe starts from stage 1 merged, so their difference is stage 2's adapters and head).

`extrapolate` streams: each leaf, or each layer slice of a stacked leaf, is read from both
checkpoints, combined in float32, cast back to the tuned checkpoint's stored dtype and written
before the next is read, so host memory stays near one layer slice at any model size.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nemotron_jax import artifact, checkpoint
from nemotron_jax.errors import CheckpointError, ConfigError
from nemotron_jax.models import lora

HEAD_KEY = artifact.HEAD_KEY["reward_model"]


def _plain_leaves(ckpt_dir) -> dict[tuple[str, ...], tuple[tuple[int, ...], Any]]:
    """{leaf path: (shape, dtype)} of the checkpoint's plain model (LoRA adapters left out:
    `artifact.read_merged_leaf` folds them into their weights)."""
    saved = checkpoint.saved_leaves(ckpt_dir)
    return {p: v for p, v in saved.items() if not lora.is_adapter(p)}


def _check_same_leaves(base_dir, tuned_dir) -> dict[tuple[str, ...], tuple[tuple[int, ...], Any]]:
    """The tuned checkpoint's {leaf path: (shape, dtype)}, after checking base has the same
    leaves and shapes (dtypes may differ: both are read into float32). LoRA adapters do not
    count: each side is read as its plain, merged model."""
    base, tuned = _plain_leaves(base_dir), _plain_leaves(tuned_dir)
    for lp in sorted(set(base) | set(tuned)):
        name = "/".join(lp)
        if lp not in base:
            raise CheckpointError(f"leaf {name} is in tuned {tuned_dir} but not in base {base_dir}")
        if lp not in tuned:
            raise CheckpointError(f"leaf {name} is in base {base_dir} but not in tuned {tuned_dir}")
        if base[lp][0] != tuned[lp][0]:
            raise CheckpointError(
                f"leaf {name}: shape {base[lp][0]} in base {base_dir} but {tuned[lp][0]} in "
                f"tuned {tuned_dir}"
            )
    return tuned


def _abstract_tree(leaves: dict[tuple[str, ...], tuple[tuple[int, ...], Any]]) -> dict:
    import jax

    tree: dict = {}
    for lp, (shape, dtype) in leaves.items():
        node = tree
        for key in lp[:-1]:
            node = node.setdefault(key, {})
        node[lp[-1]] = jax.ShapeDtypeStruct(shape, dtype)
    return tree


def extrapolate(
    base_dir,
    tuned_dir,
    out_dir,
    *,
    alpha: float,
    include_head: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Writes the ExPO checkpoint `tuned + alpha * (tuned - base)` to `out_dir`.

    Args:
        base_dir: params checkpoint of the starting point (stage-1 RM).
        tuned_dir: params checkpoint trained from it (stage-2 RM); its dtypes, metadata and
            tokenizer file are what `out_dir` gets.
        out_dir: checkpoint directory to create (must not exist).
        alpha: extrapolation strength; 0 copies tuned exactly.
        include_head: also extrapolate the reward head; False copies the tuned head unchanged.
        progress: show a progress bar (bytes written).

    Returns:
        The metadata written: tuned's, plus {"expo": {"alpha", "base", "tuned", "include_head"}}.

    Raises:
        CheckpointError: the checkpoints' leaves or shapes differ (the message names the leaf),
            or `out_dir` exists.
    """
    alpha = float(alpha)
    if not math.isfinite(alpha):
        raise ConfigError(f"alpha must be finite, got {alpha}")
    # A run's workdir stands for its params/ (and its tokenizer file beside them).
    base_dir, tuned_dir = checkpoint.params_path(base_dir), checkpoint.params_path(tuned_dir)
    leaves = _check_same_leaves(base_dir, tuned_dir)
    a = np.float32(alpha)

    def fill(leaf_path: tuple[str, ...], index: int | None) -> np.ndarray:
        tuned = artifact.read_merged_leaf(tuned_dir, leaf_path, index)
        if alpha == 0 or (not include_head and leaf_path[0] == HEAD_KEY):
            return tuned
        base = artifact.read_merged_leaf(base_dir, leaf_path, index)
        t = tuned.astype(np.float32)
        out = t + a * (t - base.astype(np.float32))
        return out.astype(tuned.dtype)

    metadata = dict(checkpoint.read_metadata(tuned_dir))
    if artifact.MODEL_CONFIG in metadata:  # the plain model: no adapters
        metadata[artifact.MODEL_CONFIG] = {**metadata[artifact.MODEL_CONFIG], "lora_rank": 0}
    metadata["expo"] = {
        "alpha": alpha,
        "base": os.path.abspath(os.fspath(base_dir)),
        "tuned": os.path.abspath(os.fspath(tuned_dir)),
        "include_head": include_head,
    }
    checkpoint.save_params_streaming(
        out_dir, _abstract_tree(leaves), fill, metadata=metadata, progress=progress
    )
    artifact.copy_tokenizer(tuned_dir, out_dir)
    return metadata


def _rank_key(entry: dict[str, Any]) -> tuple[float, float, float]:
    # Accuracy first; then the larger mean reward gap; then the smaller |alpha| (less change).
    gap = entry["mean_gap"]
    return (entry["accuracy"], gap if math.isfinite(gap) else -math.inf, -abs(entry["alpha"]))


def pick_best(table: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The best `sweep` table entry: highest accuracy, then larger mean gap, then smaller
    |alpha|; the first listed wins a full tie."""
    if not table:
        raise ConfigError("no alphas evaluated")
    return max(table, key=_rank_key)


def _alpha_name(alpha: float) -> str:
    return f"alpha_{alpha:g}".replace("-", "m")


def sweep(
    base_dir,
    tuned_dir,
    alphas: Sequence[float],
    *,
    eval_rows: Sequence[Any],
    out_root=None,
    keep: str = "best",
    include_head: bool = True,
    mesh=None,
    batch_size: int = 8,
    max_len: int | None = None,
    progress: bool = False,
) -> tuple[float, list[dict[str, Any]]]:
    """Evaluates ExPO at each alpha on validation pairs and picks the best.

    Each alpha is written to `<out_root>/alpha_<alpha>` (alpha = 0 is `tuned_dir` itself, not
    copied), restored on `mesh` and scored with `eval.rewardbench.score_pairs`.

    Args:
        base_dir, tuned_dir: as in `extrapolate`.
        alphas: values to try.
        eval_rows: validation pairs: `RewardBenchRow`s (e.g. the synthetic data's
            `rewardbench/filtered.jsonl`) or `PreferenceRow`s with a nonzero strength. Rows too
            long to encode count as wrong, as in RewardBench scoring.
        out_root: where extrapolated checkpoints go; default a new temporary directory (the
            caller owns whatever is kept there).
        keep: "best" deletes every extrapolated checkpoint but the best one's, "all" keeps all,
            "none" deletes all.
        include_head: as in `extrapolate`.
        mesh, batch_size, max_len: passed to `load_reward_model` / `score_pairs`.
        progress: progress bars for writing and scoring.

    Returns:
        (best alpha, table): one dict per alpha, in the order given, with "alpha", "accuracy"
        (correct / all rows), "mean_gap" (mean chosen - rejected reward over scored rows),
        "rows", "unscored" and "path" (None once deleted).
    """
    from nemotron_jax.eval.rewardbench import load_reward_model, score_pairs

    if keep not in ("best", "all", "none"):
        raise ConfigError(f"keep must be 'best', 'all' or 'none', got {keep!r}")
    alphas = [float(a) for a in alphas]
    if not alphas:
        raise ConfigError("no alphas to sweep")
    if len(set(alphas)) != len(alphas):
        raise ConfigError(f"alphas repeat: {alphas}")
    eval_rows = list(eval_rows)
    if not eval_rows:
        raise ConfigError("no validation rows")
    _check_same_leaves(base_dir, tuned_dir)  # fail before any write
    root = Path(tempfile.mkdtemp(prefix="expo-sweep-") if out_root is None else out_root)
    root.mkdir(parents=True, exist_ok=True)

    table = []
    for alpha in alphas:
        path = Path(tuned_dir)
        if alpha != 0:
            path = root / _alpha_name(alpha)
            extrapolate(
                base_dir, tuned_dir, path, alpha=alpha, include_head=include_head, progress=progress
            )
        model = load_reward_model(path, mesh=mesh)
        chosen, rejected, _ = score_pairs(
            model, eval_rows, batch_size=batch_size, max_len=max_len, progress=progress
        )
        del model  # free the device copy before the next alpha's
        gaps = chosen - rejected
        scored = ~np.isnan(gaps)
        table.append(
            {
                "alpha": alpha,
                "accuracy": float(np.mean(chosen > rejected)),  # NaN rows count as wrong
                "mean_gap": float(np.mean(gaps[scored])) if scored.any() else math.nan,
                "rows": len(eval_rows),
                "unscored": int((~scored).sum()),
                "path": str(path),
            }
        )
    best = pick_best(table)
    for entry in table:
        if entry["alpha"] == 0:
            continue  # the tuned checkpoint is the caller's
        if keep == "none" or (keep == "best" and entry is not best):
            shutil.rmtree(entry["path"], ignore_errors=True)
            entry["path"] = None
    return best["alpha"], table


def format_table(table: Sequence[dict[str, Any]], best_alpha: float | None = None) -> str:
    """The sweep table as text, the best alpha marked with '*'."""
    lines = [f"{'alpha':>8} {'acc %':>7} {'mean gap':>10} {'unscored':>8}"]
    for e in table:
        mark = " *" if best_alpha is not None and e["alpha"] == best_alpha else ""
        lines.append(
            f"{e['alpha']:>8g} {100 * e['accuracy']:>7.2f} {e['mean_gap']:>10.4g} "
            f"{e['unscored']:>8}{mark}"
        )
    return "\n".join(lines)
