"""The training loop and experiment runner."""

from __future__ import annotations

import os
from typing import Any

from nemotron_jax.errors import ConfigError


def run_experiment(config, workdir: str) -> dict[str, Any]:
    """Runs a config; one with `stages` runs each stage in `<workdir>/<stage name>`, in name
    order. A stage's `init_from` of the form "@<stage name>" means that stage's trained params.
    Returns the final validation metrics (per stage when there are stages)."""
    from nemotron_jax.train.loop import run

    if "stages" not in config:
        return run(config, workdir)
    results = {}
    for name in sorted(config.stages.keys()):
        stage = config.stages[name]
        if stage.init_from.startswith("@"):
            ref = stage.init_from[1:]
            if ref not in results:
                raise ConfigError(
                    f"stage {name}: init_from {stage.init_from} names no earlier "
                    f"stage (have {sorted(results)})"
                )
            with stage.unlocked():
                stage.init_from = os.path.join(workdir, ref, "params")
        print(f"=== stage {name} ===")
        results[name] = run(stage, os.path.join(workdir, name))
    from nemotron_jax.train import recipe

    if config.get("expo") is not None:
        print(f"=== stage {recipe.EXPO_STAGE}: ExPO alpha sweep ===")
        results[recipe.EXPO_STAGE] = recipe.run_expo(config, workdir)
    if config.get("evaluate") is not None:
        print("=== evaluation ===")
        evaluation = recipe.run_evaluation(config, workdir)
        results["evaluation"] = {
            stage: recipe.headline(r["report"]) for stage, r in evaluation.items()
        }
    return results
