"""The paper's Table-1 ablation on one dataset: every reward objective, from scratch and from a
helpfulness regression model.

    python experiments/run.py --config experiments/configs/rm_ablation.py --workdir runs/ablation
    python experiments/run.py --config experiments/configs/rm_ablation.py:smoke --workdir runs/a

Stages (each in <workdir>/<stage>): regression on helpfulness only and on all five attributes;
regular, margin and scaled BT from scratch; the same three BT variants initialised from the
helpfulness regression model (head included); then ExPO on the scaled one, and every model
scored on RewardBench-format rows into <workdir>/results.md (Table 1's layout).
`notebooks/01_reward_objectives.py` runs it and plots the results.
Args: model, data=DIR, eval_data=FILE.jsonl (RewardBench format), smoke.
"""

import ml_collections

from experiments.configs import common, rm_bt, rm_regression

BT = ("regular", "margin", "scaled")


def get_config(arg=None):
    a = common.parse_arg(arg, lora=0, model="tiny", data="", eval_data="", smoke=False)
    passthrough = f"model={a.model}" + (f",data={a.data}" if a.data else "")
    passthrough += ",smoke" if a.smoke else ""
    passthrough += f",lora={a.lora}" if a.lora else ""
    stages = {
        "1_regression_helpfulness": rm_regression.get_config(
            f"attributes=helpfulness,{passthrough}"
        ),
        "1_regression_all": rm_regression.get_config(f"attributes=all,{passthrough}"),
    }
    for loss in BT:
        stages[f"2_{loss}_bt_scratch"] = rm_bt.get_config(f"loss={loss},{passthrough}")
        init = rm_bt.get_config(f"loss={loss},init_from=@1_regression_helpfulness,{passthrough}")
        if a.model == "tiny" and not a.smoke:
            init.num_steps, init.optim.lr = 300, 3e-4  # as rm_recipe's stage 2
        stages[f"3_{loss}_bt_from_regression"] = init
    c = ml_collections.ConfigDict()
    c.name = "rm_ablation"
    c.stages = ml_collections.ConfigDict(stages)
    c.expo = ml_collections.ConfigDict()
    c.expo.base, c.expo.tuned = "1_regression_helpfulness", "3_scaled_bt_from_regression"
    c.expo.alphas = (0.0, 0.2, 0.5, 1.0) if a.smoke else (0.0, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0)
    c.expo.include_head = True
    c.evaluate = ml_collections.ConfigDict()
    c.evaluate.data = a.eval_data
    c.evaluate.batch_size = 16
    rows = {
        "1_regression_all": ("SteerLM Regression", "HelpSteer attributes (all 5)"),
        "1_regression_helpfulness": ("SteerLM Regression", "Helpfulness only"),
    }
    for loss in BT:
        rows[f"2_{loss}_bt_scratch"] = ("BT from scratch", loss.capitalize())
    for loss in BT:
        rows[f"3_{loss}_bt_from_regression"] = (
            "BT init. from helpfulness-only regression",
            loss.capitalize(),
        )
    rows["3_expo"] = ("BT init. from helpfulness-only regression", "Scaled + ExPO")
    c.evaluate.rows = rows
    return c
