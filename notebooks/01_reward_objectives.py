# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Reward objectives: regression vs Bradley-Terry, from scratch vs from regression, + ExPO
#
# **Question.** On one dataset and one backbone, how do the reward objectives of the
# HelpSteer2-Preference paper (Table 1) compare: SteerLM regression (helpfulness only, all five
# attributes), Bradley-Terry regular / margin / scaled trained from scratch, the same three
# initialised from the helpfulness regression model, and Scaled BT + ExPO?
#
# **Runs.** Every model comes from one experiment config, `experiments/configs/rm_ablation.py`,
# the same as
#
# ```bash
# python experiments/run.py --config experiments/configs/rm_ablation.py --workdir runs/ablation
# ```
#
# By default it uses the generated synthetic HelpSteer2 and the `tiny` model (about 5 minutes on
# 2 CPU cores). Set `HELPSTEER2_DIR` to a directory with the downloaded HelpSteer2 files and
# `REWARDBENCH_FILE` to a RewardBench-format `.jsonl` to run on real data instead;
# `NOTEBOOK_SMOKE=1` shrinks everything to seconds (used by the test-suite).

# %%
import json
import os
import sys
from pathlib import Path

# Run from the repository root or from notebooks/: the experiment configs live beside the package.
REPO = next(p for p in [Path.cwd(), *Path.cwd().parents] if (p / "experiments").is_dir())
sys.path.insert(0, str(REPO))

import jax
import matplotlib.pyplot as plt
import numpy as np
from IPython.display import Markdown, display

from experiments.configs import rm_ablation, rm_recipe
from nemotron_jax import runtime
from nemotron_jax.data import helpsteer2
from nemotron_jax.data.pipeline import preference_splits
from nemotron_jax.data.splits import data_dir
from nemotron_jax.eval import rewardbench
from nemotron_jax.experiment import run_experiment
from nemotron_jax.metrics import read_metrics
from nemotron_jax.models import lora
from nemotron_jax.models.reward import abstract_reward_params
from nemotron_jax.train.objective import model_config

runtime.configure_cpu()  # before the first computation: see nemotron_jax/runtime.py

os.chdir(REPO)  # relative paths (workdirs, the synthetic-data cache) are the repository's
SMOKE = os.environ.get("NOTEBOOK_SMOKE") == "1"
DATA_DIR = os.environ.get("HELPSTEER2_DIR", "")
EVAL_FILE = os.environ.get("REWARDBENCH_FILE", "")
WORKDIR = Path(os.environ.get("NOTEBOOK_WORKDIR", "runs/ablation" + ("_smoke" if SMOKE else "")))

args = ",".join(
    a for a in ("smoke" if SMOKE else "", f"data={DATA_DIR}" if DATA_DIR else "",
                f"eval_data={EVAL_FILE}" if EVAL_FILE else "") if a
)
config = rm_ablation.get_config(args)
for stage in config.stages.values():
    stage.progress = False
print(f"config rm_ablation.py:{args}  ->  {WORKDIR}")

# %% [markdown]
# ## Train every variant (a finished workdir is only re-evaluated)

# %%
results = run_experiment(config, str(WORKDIR))

# %% [markdown]
# ## Table 1 on this data
# Overall is the RewardBench overall (mean of sections) on RewardBench data, and accuracy over
# all pairs on the synthetic held-out pairs, whose subsets are `synthetic-easy` (latent
# helpfulness margin >= 2.5) and `synthetic-hard`.

# %%
display(Markdown((WORKDIR / "results.md").read_text()))
print("ExPO: best alpha on validation =", results["3_expo"]["best_alpha"])

# %% [markdown]
# ## Training loss and validation accuracy

# %%
stages = sorted(config.stages)
fig, axes = plt.subplots(1, 2, figsize=(12, 4))
for name in stages:
    train = read_metrics(str(WORKDIR / name), "train")
    axes[0].plot([r["step"] for r in train], [r["loss"] for r in train], label=name)
    evals = [r for r in read_metrics(str(WORKDIR / name), "eval") if "accuracy" in r]
    if evals:
        axes[1].plot([r["step"] for r in evals], [r["accuracy"] for r in evals], "o-", label=name)
axes[0].set(title="training loss", xlabel="step", yscale="log")
axes[1].set(title="validation pair accuracy (BT stages)", xlabel="step")
axes[0].legend(fontsize=7)
axes[1].legend(fontsize=7)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Reward gap by preference strength
# Each model scores the validation preference pairs (ties excluded); the gap is
# r(chosen) - r(rejected), grouped by the annotators' strength |s| (1 slightly better, 2 better,
# 3 much better). Scaled BT weighs strong preferences more, so its gaps should grow with |s|.

# %%
first = config.stages[stages[0]]
pref_path = helpsteer2.find_helpsteer2_file(data_dir(first.data), "preference")
rows, _ = helpsteer2.read_preferences(pref_path)
val_pairs = [r for r in preference_splits(rows)["validation"] if r.preference_strength]
strength = np.array([abs(r.preference_strength) for r in val_pairs])

models = [s for s in stages if "bt" in s or s == "1_regression_helpfulness"] + ["3_expo"]
fig, axes = plt.subplots(1, len(models), figsize=(3 * len(models), 3), sharey=True)
summary = {}
for ax, name in zip(axes, models, strict=True):
    model = rewardbench.load_reward_model(WORKDIR / name / "params")
    chosen, rejected, _ = rewardbench.score_pairs(model, val_pairs, progress=False)
    gap = chosen - rejected
    for m in (1, 2, 3):
        if np.any(strength == m):
            ax.hist(gap[strength == m], bins=15, alpha=0.5, label=f"|s|={m}")
    summary[name] = {m: float(np.mean(gap[strength == m])) for m in (1, 2, 3)
                     if np.any(strength == m)}
    ax.set_title(name, fontsize=8)
    ax.axvline(0, color="k", lw=0.5)
axes[0].legend(fontsize=7)
plt.tight_layout()
plt.show()
for name, gaps in summary.items():
    print(f"{name:<32} mean gap by |s|: " + ", ".join(f"{m}: {g:+.2f}" for m, g in gaps.items()))

# %% [markdown]
# ## Full fine-tuning against LoRA
# The paper's recipe (helpfulness regression, then Scaled BT from it, then ExPO) once more with
# LoRA adapters on the attention projections (`rm_recipe.py:lora=8`, same data, steps and
# rates): the base stays frozen and only the adapters and the reward head train. Its rows sit
# under the full fine-tuning rows of the same three models from the ablation above. On the
# synthetic set with the tiny model (2 CPU cores, 2026-12-05), full fine-tuning scored 78.0 /
# 71.5 / 71.5 (regression / Scaled BT / + ExPO) and LoRA r=8, training 7,753 of 165,769
# parameters (4.7%), 73.5 / 74.0 / 74.0, in about the same wall time (16 and 35 s against 18 and
# 29 s). At this size LoRA saves no time; its point is the memory of real sizes
# (`docs/scaling.md`).

# %%
LORA_RANK = 8
lora_config = rm_recipe.get_config(",".join(a for a in (args, f"lora={LORA_RANK}") if a))
for stage in lora_config.stages.values():
    stage.progress = False
LORA_WORKDIR = WORKDIR.with_name(f"{WORKDIR.name}_lora{LORA_RANK}")
lora_results = run_experiment(lora_config, str(LORA_WORKDIR))


def trainable_params(stage_config) -> tuple[int, int]:
    """(trained, total) parameter counts of a stage's reward model, from shapes alone."""
    shapes = abstract_reward_params(model_config(stage_config), stage_config.model.num_attributes)
    total = sum(x.size for x in jax.tree.leaves(shapes))
    return (lora.count(shapes)[0] if stage_config.lora.rank else total), total


def wall_time(stage_dir: Path) -> str:
    wall = stage_dir / "wall_time.json"
    return f"{json.loads(wall.read_text())['seconds']:.0f}" if wall.exists() else ""


same_models = [  # (model, ablation stage, recipe stage)
    ("Regression (helpfulness)", "1_regression_helpfulness", "1_regression"),
    ("Scaled BT from regression", "3_scaled_bt_from_regression", "2_scaled_bt"),
    ("Scaled BT + ExPO", "3_expo", "3_expo"),
]
lines = [
    "| training | model | overall | trained parameters | wall time (s) |",
    "|---|---|---:|---:|---:|",
]
for group, run_results, run_config, run_dir, column in (
    ("Full fine-tuning", results, config, WORKDIR, 1),
    (f"LoRA r={LORA_RANK}", lora_results, lora_config, LORA_WORKDIR, 2),
):
    for row in same_models:
        stage = row[column]
        score = 100 * run_results["evaluation"][stage]
        trained = "none (weights extrapolated)"
        if stage in run_config.stages:
            n, total = trainable_params(run_config.stages[stage])
            trained = f"{n:,} of {total:,} ({100 * n / total:.2f}%)"
        wall = wall_time(run_dir / stage)
        lines.append(f"| {group} | {row[0]} | {score:.1f} | {trained} | {wall} |")
display(Markdown("\n".join(lines)))

# %% [markdown]
# ## Conclusion
# The cell below ranks the variants on the held-out pairs. On the paper's data (70B backbone),
# helpfulness regression beats regression on all attributes, Scaled is the best BT form, every BT
# variant gains from starting at the regression model, and ExPO adds a little on top; compare
# the ranking printed here with that ordering before drawing conclusions from a tiny model.

# %%
ranking = sorted(results["evaluation"].items(), key=lambda kv: -kv[1])
for rank, (name, score) in enumerate(ranking, 1):
    print(f"{rank}. {name:<32} {100 * score:.1f}")
