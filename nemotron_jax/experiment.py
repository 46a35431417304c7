"""Runs an experiment config: one training run, or the stages of a multi-stage config followed
by ExPO and the Table-1 evaluation.

    config.stages    {stage name: training config}, run in name order, each in
                     <workdir>/<stage name>; "@<stage>" as a stage's init_from, reference_from
                     or rm_from means that earlier stage's trained params
    config.expo      base, tuned (stage names), alphas, include_head: sweep alpha on the tuned
                     stage's preference validation pairs, keep the best as <workdir>/3_expo/params
    config.evaluate  data (RewardBench-format .jsonl; default: the synthetic data's held-out
                     rewardbench/filtered.jsonl), rows: {stage or "3_expo": (group, variant)}
    config.alignment judge, baseline, rows: every aligned policy sampled and scored on the same
                     held-out prompts (`run_alignment_table`), a Table-4-style results.md

Writes <workdir>/results.json and <workdir>/results.md, the latter in the layout of the paper's
Table 1 (group, variant, Overall, then the RewardBench sections, or the subsets when the data
is not RewardBench).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from nemotron_jax.errors import ConfigError

SECTIONS = ("Chat", "Chat Hard", "Safety", "Reasoning")
EXPO_STAGE = "3_expo"


def run_experiment(config, workdir: str) -> dict[str, Any]:
    """Runs a config (see the module docstring). Returns the final validation metrics, per stage
    when there are stages, then ExPO's best alpha and each evaluated stage's Overall score."""
    from nemotron_jax.train import settings
    from nemotron_jax.train.loop import run
    from nemotron_jax.train.workdir import check_resume, record_config

    if "stages" not in config:
        return run(_resolve_random_models(config, workdir), workdir)
    from nemotron_jax import distributed

    os.makedirs(workdir, exist_ok=True)
    started = os.path.exists(os.path.join(workdir, "config.json"))
    distributed.sync("workdir_read")  # every process has looked before process 0 writes
    if started:
        check_resume(workdir, config, 0)
    record_config(workdir, config, 0 if started else None)
    for name in sorted(config.stages.keys()):  # every stage before the first one trains
        try:
            settings.check(config.stages[name])
        except ConfigError as e:
            message = str(e)
            where = f"config.stages.{name}."
            raise ConfigError(
                message.replace("config.", where, 1) if "config." in message else f"{where} {e}"
            ) from None
    results = {}
    for name in sorted(config.stages.keys()):
        stage = config.stages[name]
        for key in settings.PATH_KEYS:  # "@<stage>": that earlier stage's trained params
            if not stage[key].startswith("@"):
                continue
            ref = stage[key][1:]
            if ref not in results:
                raise ConfigError(
                    f"stage {name}: {key} {stage[key]} names no earlier "
                    f"stage (have {sorted(results)})"
                )
            with stage.unlocked():
                stage[key] = os.path.join(workdir, ref, "params")
        print(f"=== stage {name} ===")
        t0 = time.perf_counter()
        results[name] = run(stage, os.path.join(workdir, name))
        _add_wall_time(os.path.join(workdir, name), time.perf_counter() - t0)
    after = [k for k in ("expo", "evaluate", "alignment") if k in config]
    if after and distributed.process_count() > 1:
        # ExPO's sweep and the RewardBench evaluation load checkpoints on one host's devices.
        if distributed.is_primary():
            print(
                f"config.{' and config.'.join(after)} not run: they run in one process; rerun "
                f"this command as one process (without --coordinator_address/--num_processes/"
                f"--process_id, or as one task): the trained stages resume as finished"
            )
        results["not_run"] = {"config_keys": after}
        return results
    if "expo" in config:
        print(f"=== stage {EXPO_STAGE}: ExPO alpha sweep ===")
        results[EXPO_STAGE] = run_expo(config, workdir)
    if "evaluate" in config:
        print("=== evaluation ===")
        evaluation = run_evaluation(config, workdir)
        results["evaluation"] = {stage: headline(r["report"]) for stage, r in evaluation.items()}
    if "alignment" in config:
        print("=== alignment table ===")
        results["alignment"] = run_alignment_table(config, workdir)
    return results


WALL_TIME_FILE = "wall_time.json"


def _add_wall_time(stage_dir: str, seconds: float) -> None:
    """Adds this invocation's seconds to the stage's total (a resumed stage sums its parts)."""
    from nemotron_jax import distributed

    if not distributed.is_primary():
        return
    path = os.path.join(stage_dir, WALL_TIME_FILE)
    total = json.loads(Path(path).read_text())["seconds"] if os.path.exists(path) else 0.0
    Path(path).write_text(json.dumps({"seconds": total + seconds}))


def run_alignment_table(config, workdir: str) -> dict[str, Any]:
    """Scores every aligned policy of config.alignment.rows on the same held-out prompts with
    the same sampling key: the reward model's mean reward, the win rate against the initial
    (SFT) policy judged by that reward model (ties count half), mean response length in
    tokens, KL to the initial policy, and each stage's training wall time. Writes
    <workdir>/results.json and a Table-4-style <workdir>/results.md.

    config.alignment: judge (the online stage whose policy, reward model, prompts and sampling
    settings the evaluation uses), baseline (row label of the initial policy), rows ((stage,
    group, model), ...) in the table's order."""
    import flax.linen as nn
    import jax

    from nemotron_jax import artifact, sharding
    from nemotron_jax.train import objectives

    spec = config.alignment
    judge = config.stages[spec.judge]  # its paths are resolved by now
    mesh = sharding.make_mesh(tuple(judge.mesh))
    rules = tuple(tuple(rule) for rule in judge.sharding_rules)
    table: dict[str, Any] = {}
    # Loaded as the loop loads (outside the mesh context), evaluated as it evaluates (inside).
    bundle = objectives.build(judge).make_data(mesh, rules)
    entries = [("initial", judge.init_from, ("baseline", spec.baseline))]
    entries += [
        (stage, os.path.join(workdir, stage, "params"), (group, name))
        for stage, group, name in spec.rows
    ]
    for stage, path, (group, name) in entries:  # one policy on the devices at a time
        policy = artifact.load(path, kind="causal_lm", mesh=mesh, rules=rules)
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            metrics = bundle.evaluate(policy.params)
        del policy
        wall = Path(workdir, stage, WALL_TIME_FILE)
        metrics["wall_time_s"] = json.loads(wall.read_text())["seconds"] if wall.exists() else None
        table[stage] = {"group": group, "model": name, **metrics}
        print(f"{name}: reward {metrics['reward_mean']:.4f}, win rate "
              f"{metrics['win_rate_vs_reference']:.3f}")  # fmt: skip
    from nemotron_jax import distributed

    if distributed.is_primary():
        Path(workdir, "results.json").write_text(json.dumps(table, indent=2))
        Path(workdir, "results.md").write_text(format_alignment_table(table, judge))
    return table


def format_alignment_table(table: dict[str, Any], judge) -> str:
    """The alignment results in the layout of the paper's Table 4 (group, model, then the
    columns measurable without an external judge)."""
    lines = [
        f"Held-out: {judge.rl.eval_prompts} prompts at most, temperature "
        f"{judge.rl.eval_temperature}, {judge.rl.max_new_tokens} new tokens at most; the reward "
        f"model {judge.rm_from} judges. Win rate: against the initial policy's sample for the "
        f"same prompt (ties count half). KL: {judge.rl.kl_estimator} per token "
        f"({judge.rl.kl_reduce}) to the initial policy.",
        "",
        "| group | model | RM reward | win rate vs initial | length (tokens) | KL | wall time (s) "
        "|",
        "|---|---|---|---|---|---|---|",
    ]
    for row in table.values():
        wall = "" if row["wall_time_s"] is None else f"{row['wall_time_s']:.0f}"
        lines.append(
            f"| {row['group']} | {row['model']} | {row['reward_mean']:.4f} | "
            f"{row['win_rate_vs_reference']:.3f} | {row['response_length']:.1f} | "
            f"{row['kl']:.4f} | {wall} |"
        )
    return "\n".join(lines) + "\n"


def _resolve_random_models(config, workdir: str):
    """`init_from=random` / `rm_from=random` (REINFORCE smoke runs with no trained models): a
    copy of the config naming random tiny models written under <workdir>/random_models."""
    from nemotron_jax.train.objectives import reinforce

    keys = [k for k in ("init_from", "rm_from") if config[k] == reinforce.RANDOM]
    if not keys:
        return config
    paths = reinforce.write_random_models(config, os.path.join(workdir, "random_models"))
    config = config.copy_and_resolve_references()
    with config.unlocked():
        for key, path in paths.items():
            config[key] = path
    from nemotron_jax import distributed

    if not distributed.is_primary():
        return config
    print(
        "no trained models given: "
        + ", ".join(
            f"{k}={reinforce.RANDOM} is a random {config.model.preset} model in {p}"
            for k, p in paths.items()
        )
        + " (a smoke run checks the machinery, not the result)"
    )
    return config


def _validation_pairs(stage_config) -> list:
    """The tuned stage's validation preference pairs, ties dropped (as its training did)."""
    from nemotron_jax.data import helpsteer2
    from nemotron_jax.data.pipeline import preference_splits
    from nemotron_jax.data.splits import data_dir

    path = helpsteer2.find_helpsteer2_file(data_dir(stage_config.data), "preference")
    rows, _ = helpsteer2.read_preferences(path, on_bad_row=stage_config.data.on_bad_row)
    return [r for r in preference_splits(rows)["validation"] if r.preference_strength]


def run_expo(config, workdir: str) -> dict[str, Any]:
    from nemotron_jax import expo

    e = config.expo
    for name in (e.base, e.tuned):
        if name not in config.stages:
            raise ConfigError(f"config.expo names stage {name!r}; stages: {sorted(config.stages)}")
    base = os.path.join(workdir, e.base, "params")
    tuned = os.path.join(workdir, e.tuned, "params")
    out_root = Path(workdir) / EXPO_STAGE / "sweep"
    best, table = expo.sweep(
        base,
        tuned,
        tuple(e.alphas),
        eval_rows=_validation_pairs(config.stages[e.tuned]),
        out_root=out_root,
        keep="best",
        include_head=e.include_head,
    )
    final = Path(workdir) / EXPO_STAGE / "params"
    if final.exists():
        import shutil

        shutil.rmtree(final)
    if best == 0:  # the tuned model itself wins: extrapolate with alpha 0 copies it
        expo.extrapolate(base, tuned, final, alpha=0.0, include_head=e.include_head)
    else:
        os.replace(next(p for p in out_root.iterdir() if p.is_dir()), final)
    print(expo.format_table(table, best))
    return {"best_alpha": best, "table": table}


def _eval_file(config, workdir: str) -> Path | None:
    if config.evaluate.data:
        return Path(config.evaluate.data)
    from nemotron_jax.data.splits import data_dir

    first = config.stages[sorted(config.stages)[0]]
    if first.data.source != "synthetic":
        return None
    return data_dir(first.data) / "rewardbench" / "filtered.jsonl"


def run_evaluation(config, workdir: str) -> dict[str, Any]:
    from nemotron_jax.data.helpsteer2 import read_rewardbench
    from nemotron_jax.eval import rewardbench as rb

    path = _eval_file(config, workdir)
    if path is None:
        print("evaluation skipped: real data needs config.evaluate.data (a RewardBench .jsonl)")
        return {}
    rows, _ = read_rewardbench(path)
    results = {}
    for stage, (group, variant) in config.evaluate.rows.items():
        params = Path(workdir) / stage / "params"
        if not params.exists():
            continue
        model = rb.load_reward_model(params)
        report, *_ = rb.evaluate(model, rows, batch_size=config.evaluate.batch_size, progress=False)
        results[stage] = {"group": group, "variant": variant, "report": report}
    table = format_table(results)
    Path(workdir, "results.md").write_text(f"Evaluated on `{path}`.\n\n{table}\n")
    Path(workdir, "results.json").write_text(json.dumps(results, indent=2, default=float))
    print(table)
    return results


def headline(report: dict[str, Any]) -> float | None:
    """The Overall column: RewardBench's overall (mean of sections) on RewardBench data, else
    accuracy pooled over every row."""
    if report["sections"]:
        return report["overall"]["score"]
    return sum(v["correct"] for v in report["subsets"].values()) / max(report["rows"], 1)


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def format_table(results: dict[str, Any]) -> str:
    """Markdown in Table 1's layout: Overall, then the sections (or, for data outside
    RewardBench, the subsets; Overall is then accuracy over all rows)."""
    if not results:
        return "(no results)"
    reports = [r["report"] for r in results.values()]
    in_rewardbench = any(rep["sections"] for rep in reports)
    if in_rewardbench:
        columns = list(SECTIONS)
    else:
        columns = sorted({s for rep in reports for s in rep["subsets"]})
    lines = [
        "| group | variant | Overall | " + " | ".join(columns) + " |",
        "|---|---|---|" + "---|" * len(columns),
    ]
    for r in results.values():
        rep = r["report"]
        overall = headline(rep)
        if in_rewardbench:
            cells = [
                _pct(sec.get("score")) + ("*" if sec.get("partial") else "")
                for sec in (rep["sections"].get(s, {}) for s in columns)
            ]
        else:
            cells = [_pct(rep["subsets"].get(s, {}).get("accuracy")) for s in columns]
        lines.append(
            f"| {r['group']} | {r['variant']} | {_pct(overall)} | " + " | ".join(cells) + " |"
        )
    if in_rewardbench:
        lines.append("\n\\* partial section: some of its subsets are missing or incomplete.")
    return "\n".join(lines)
