"""The two-stage recipe with ExPO and the Table-1 evaluation, end to end at smoke size."""

import json

from experiments.configs import rm_recipe
from nemotron_jax.experiment import run_experiment


def test_recipe_smoke_writes_table(tmp_path):
    config = rm_recipe.get_config("smoke")
    for stage in config.stages.values():
        stage.progress = False
    results = run_experiment(config, str(tmp_path))
    assert set(results) == {"1_regression", "2_scaled_bt", "3_expo", "evaluation"}
    assert results["3_expo"]["best_alpha"] in config.expo.alphas
    assert (tmp_path / "3_expo" / "params").is_dir()
    table = (tmp_path / "results.md").read_text()
    assert "| SteerLM Regression | Helpfulness only |" in table
    assert "| BT init. from helpfulness-only regression | Scaled + ExPO |" in table
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved) == {"1_regression", "2_scaled_bt", "3_expo"}
    for stage, r in saved.items():
        assert r["report"]["rows"] > 0, stage
