"""The paper's best reward-model recipe in one command: stage 1 trains a helpfulness-only
SteerLM regression model; stage 2 trains Scaled Bradley-Terry initialised from it, head
included, reading the same head slot (4).

    python experiments/run.py --config experiments/configs/rm_recipe.py --workdir runs/recipe
    python experiments/run.py --config experiments/configs/rm_recipe.py:smoke --workdir runs/r

Stage 3 extrapolates with ExPO (alpha chosen on stage 2's validation pairs), then every stage is
scored on RewardBench-format rows and <workdir>/results.md holds a Table-1-style table.

Args: model=tiny|llama3.1-8b|llama3.1-70b|..., init_from=PARAMS (stage 1's starting point, e.g.
an HF-converted Llama-3.1-70B-Instruct), data=DIR, eval_data=FILE.jsonl (RewardBench format),
bt=regular|margin|scaled, smoke.
A stage's field is overridden by subscript, since stage names start with a digit:
    --config.stages['2_scaled_bt'].optim.lr=1e-4
Outputs: <workdir>/1_regression, <workdir>/2_<bt>_bt, <workdir>/3_expo (each with params/),
results.md and results.json.
"""

import ml_collections

from experiments.configs import common, rm_bt, rm_regression


def get_config(arg=None):
    a = common.parse_arg(
        arg, lora=0, model="tiny", init_from="", data="", eval_data="", bt="scaled", smoke=False
    )
    passthrough = f"model={a.model}" + (f",data={a.data}" if a.data else "")
    passthrough += ",smoke" if a.smoke else ""
    passthrough += f",lora={a.lora}" if a.lora else ""
    stage1 = rm_regression.get_config(f"attributes=helpfulness,{passthrough}")
    stage1.init_from = a.init_from
    stage2 = rm_bt.get_config(f"loss={a.bt},init_from=@1_regression,{passthrough}")
    if a.model == "tiny" and not a.smoke:
        # From a trained regression model, BT needs far fewer steps and a lower rate.
        stage2.num_steps, stage2.optim.lr = 300, 3e-4
    c = ml_collections.ConfigDict()
    c.name = "rm_recipe"
    c.stages = ml_collections.ConfigDict({"1_regression": stage1, f"2_{a.bt}_bt": stage2})
    # Stage 3: ExPO, theta_2 + alpha (theta_2 - theta_1), alpha chosen on stage 2's validation
    # pairs (alpha = 0 keeps stage 2 itself).
    c.expo = ml_collections.ConfigDict()
    c.expo.base, c.expo.tuned = "1_regression", f"2_{a.bt}_bt"
    c.expo.alphas = (0.0, 0.1, 0.2, 0.5, 1.0) if a.smoke else (0.0, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0)
    c.expo.include_head = True
    # RewardBench-format evaluation of every stage (default file: the synthetic held-out pairs;
    # pass a RewardBench .jsonl with --config.evaluate.data=... for real data).
    c.evaluate = ml_collections.ConfigDict()
    c.evaluate.data = a.eval_data
    c.evaluate.batch_size = 16
    c.evaluate.rows = {
        "1_regression": ("SteerLM Regression", "Helpfulness only"),
        f"2_{a.bt}_bt": ("BT init. from helpfulness-only regression", a.bt.capitalize()),
        "3_expo": ("BT init. from helpfulness-only regression", f"{a.bt.capitalize()} + ExPO"),
    }
    return c
