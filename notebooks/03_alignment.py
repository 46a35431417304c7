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
# # Alignment baselines: the paper's Table 4 at small scale
#
# **Question.** From one SFT policy and one reward model, how do REINFORCE (NeMo-Aligner's, with
# a leave-one-out baseline), PPO (critic + GAE), GRPO and the three DPO forms (regular, margin,
# scaled) compare on held-out prompts: reward, win rate against the SFT policy as the reward
# model judges it, response length (the paper saw REINFORCE answers grow by 27%), KL to the SFT
# policy, and training wall time?
#
# **Runs.** One experiment config trains every row and writes the table:
#
# ```bash
# python experiments/run.py --config experiments/configs/alignment.py --workdir runs/demo_alignment
# ```
#
# (`make demo-alignment`). This notebook reads `runs/demo_alignment` when it holds a finished
# table; otherwise it runs the config first. `NOTEBOOK_SMOKE=1` shrinks everything to seconds
# (used by the test-suite).

# %%
import json
import os
import sys
from pathlib import Path

# Run from the repository root or from notebooks/: the experiment configs live beside the package.
REPO = next(p for p in [Path.cwd(), *Path.cwd().parents] if (p / "experiments").is_dir())
sys.path.insert(0, str(REPO))

import matplotlib.pyplot as plt
from IPython.display import Markdown, display

from experiments.configs import alignment
from nemotron_jax import runtime
from nemotron_jax.experiment import run_experiment
from nemotron_jax.metrics import read_metrics

runtime.configure_cpu()  # before the first computation: see nemotron_jax/runtime.py

os.chdir(REPO)  # relative paths (workdirs, the synthetic-data cache) are the repository's
SMOKE = os.environ.get("NOTEBOOK_SMOKE") == "1"
WORKDIR = Path(
    os.environ.get("NOTEBOOK_WORKDIR", "runs/alignment_smoke" if SMOKE else "runs/demo_alignment")
)
print(f"workdir {WORKDIR}")

# %% [markdown]
# ## Train (or resume) every row
#
# Stages `0_sft` and `0_reward_model` train the starting policy and the judge; stages 1-6 the
# aligned policies. A finished stage resumes as finished, so rerunning costs only the
# evaluation.

# %%
config = alignment.get_config("smoke" if SMOKE else "")
if SMOKE:
    for stage in config.stages.values():
        stage.progress = False
run_experiment(config, str(WORKDIR))
table = json.loads((WORKDIR / "results.json").read_text())
display(Markdown((WORKDIR / "results.md").read_text()))

# %% [markdown]
# ## The columns side by side

# %%
rows = list(table.values())
names = [r["model"] for r in rows]
columns = [
    ("reward_mean", "RM reward (held-out)"),
    ("win_rate_vs_reference", "win rate vs SFT"),
    ("response_length", "length (tokens)"),
    ("kl", "KL to SFT"),
    ("wall_time_s", "wall time (s)"),
]
fig, axes = plt.subplots(1, len(columns), figsize=(4 * len(columns), 3.5))
colours = ["grey" if r["group"] == "baseline" else "C0" if "offline" in r["group"] else "C1"
           for r in rows]  # fmt: skip
for ax, (key, title) in zip(axes, columns, strict=True):
    ax.barh(names, [r[key] or 0.0 for r in rows], color=colours)
    ax.set_title(title)
    ax.invert_yaxis()
for ax in axes[1:]:
    ax.set_yticklabels([])
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Training curves
#
# Online rows: the reward of each rollout batch and its KL to the reference. DPO rows: the
# loss and the implicit-reward accuracy on the training pairs.

# %%
fig, axes = plt.subplots(1, 4, figsize=(16, 3.5))
for stage, row in table.items():
    if stage == "initial":
        continue
    train = read_metrics(str(WORKDIR / stage), "train")
    steps = [r["step"] for r in train]
    if "reward_mean" in train[0]:
        axes[0].plot(steps, [r["reward_mean"] for r in train], label=row["model"])
        axes[1].plot(steps, [r["kl"] for r in train], label=row["model"])
    else:
        axes[2].plot(steps, [r["loss"] for r in train], label=row["model"])
        axes[3].plot(steps, [r["accuracy"] for r in train], label=row["model"])
titles = ("online: rollout reward", "online: KL", "DPO: loss", "DPO: pair accuracy")
for ax, title in zip(axes, titles, strict=True):
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.legend(fontsize=7)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Reading the table
#
# - The reward model is also the judge of the win rate, so online methods that optimise it
#   directly are favoured by construction; the paper used GPT-4-Turbo (MT-Bench) and
#   AlpacaEval / Arena Hard judges, which need an external model.
# - At the tiny size every number is noisy (a handful of held-out prompts, one sample each):
#   the table checks that each method trains and is scored alike, not which one wins.

# %%
best = max((r for r in rows if r["group"] != "baseline"), key=lambda r: r["win_rate_vs_reference"])
print(f"highest win rate against the SFT policy: {best['model']} ({best['win_rate_vs_reference']:.3f})")
