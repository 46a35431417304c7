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
# # REINFORCE against a reward model: the KL penalty and its estimator
#
# **Question.** With NeMo-Aligner's REINFORCE (K samples per prompt, leave-one-out baseline over
# EOS-terminated siblings, KL-shaped reward R - beta KL), how do the reward, the KL to the initial
# policy and the response length move for a few values of beta, and does the KL estimator matter
# (NeMo's |k1| averaged over response tokens, TRL's k1 summed, Schulman's k3)?
#
# **Runs.** Every run is `experiments/configs/reinforce.py`, as on the command line:
#
# ```bash
# python experiments/run.py --config experiments/configs/reinforce.py:policy=P,rm=R,beta=0.01 --workdir W
# ```
#
# The policy and the reward model are those of `make demo` (`runs/demo_sft/params`,
# `runs/demo_recipe/3_expo/params`) when they exist; otherwise this notebook trains small ones
# first with `experiments/configs/sft.py` and `rm_recipe.py`. `NOTEBOOK_SMOKE=1` shrinks
# everything to seconds (used by the test-suite).

# %%
import os
import sys
from pathlib import Path

# Run from the repository root or from notebooks/: the experiment configs live beside the package.
REPO = next(p for p in [Path.cwd(), *Path.cwd().parents] if (p / "experiments").is_dir())
sys.path.insert(0, str(REPO))

import matplotlib.pyplot as plt
from IPython.display import Markdown, display

from experiments.configs import reinforce, rm_bt, sft
from nemotron_jax import runtime
from nemotron_jax.experiment import run_experiment
from nemotron_jax.metrics import read_metrics

runtime.configure_cpu()  # before the first computation: see nemotron_jax/runtime.py

os.chdir(REPO)  # relative paths (workdirs, the synthetic-data cache) are the repository's
SMOKE = os.environ.get("NOTEBOOK_SMOKE") == "1"
WORKDIR = Path(os.environ.get("NOTEBOOK_WORKDIR", "runs/reinforce_sweep" + ("_smoke" if SMOKE else "")))
POLICY = os.environ.get("POLICY", "runs/demo_sft/params")
REWARD_MODEL = os.environ.get("REWARD_MODEL", "runs/demo_recipe/3_expo/params")
print(f"workdir {WORKDIR}")

# %% [markdown]
# ## The initial policy and the reward model

# %%
if SMOKE or not (Path(POLICY).is_dir() and Path(REWARD_MODEL).is_dir()):
    size = "smoke" if SMOKE else ""
    for name, module, arg in (("sft", sft, size), ("rm", rm_bt, ",".join(filter(None, [size, "loss=scaled"])))):
        config = module.get_config(arg)
        config.progress = False
        run_experiment(config, str(WORKDIR / name))
    POLICY, REWARD_MODEL = str(WORKDIR / "sft" / "params"), str(WORKDIR / "rm" / "params")
print(f"policy {POLICY}\nreward model {REWARD_MODEL}")

# %% [markdown]
# ## The sweep
# Same seed, prompts and sampling keys in every run, so the curves differ only by the setting.

# %%
RUNS = {  # name -> config args
    "beta=0": "beta=0.0",
    "beta=0.01 |k1| mean (NeMo)": "beta=0.01",
    "beta=0.1 |k1| mean": "beta=0.1",
    "beta=0.01 k1 sum (TRL)": "beta=0.01,kl=k1,kl_reduce=sum",
    "beta=0.01 k3 mean": "beta=0.01,kl=k3",
}
if SMOKE:
    RUNS = {k: RUNS[k] for k in ("beta=0", "beta=0.1 |k1| mean", "beta=0.01 k3 mean")}

final = {}
for i, (name, arg) in enumerate(RUNS.items()):
    size = ",smoke" if SMOKE else ""
    config = reinforce.get_config(f"policy={POLICY},rm={REWARD_MODEL},{arg}{size}")
    config.progress = False
    if SMOKE:
        config.log_every = 1
    final[name] = run_experiment(config, str(WORKDIR / f"run{i}"))
    print(f"{name}: {final[name]}")

# %% [markdown]
# ## Reward, KL and length during training (rollout batches)

# %%
fig, axes = plt.subplots(1, 3, figsize=(15, 4))
for i, name in enumerate(RUNS):
    rows = read_metrics(str(WORKDIR / f"run{i}"), "train")
    steps = [r["step"] for r in rows]
    for ax, key in zip(axes, ("reward_mean", "kl", "response_length"), strict=True):
        ax.plot(steps, [r[key] for r in rows], label=name)
        ax.set_title(key)
        ax.set_xlabel("step")
axes[0].legend(fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## On held-out prompts: reward and win rate against the initial policy
# The win rate compares each held-out prompt's sample from the trained policy with the initial
# policy's sample, as judged by the reward model (ties count half); 50% means no change.

# %%
lines = ["| run | reward | initial policy's reward | win rate | KL | length | EOS rate |",
         "|---|---|---|---|---|---|---|"]
for name, m in final.items():
    lines.append(
        f"| {name} | {m['reward_mean']:.3f} | {m['reference_reward_mean']:.3f} | "
        f"{100 * m['win_rate_vs_reference']:.1f}% | {m['kl']:.4f} | {m['response_length']:.1f} | "
        f"{100 * m['eos_rate']:.0f}% |"
    )
display(Markdown("\n".join(lines)))

# %% [markdown]
# **Reading it.** A larger beta holds the policy closer to the initial one (smaller KL) at the
# cost of reward. The estimators are not on one scale: a summed KL grows with the response
# length, so the same beta penalises long answers more under `kl_reduce=sum`, and k1 can be
# negative on a single sample where |k1| and k3 cannot.
