"""The paper's Table-1 ablation on one dataset: every reward objective, from scratch and from a
helpfulness regression model.

    python experiments/run.py --config experiments/configs/rm_ablation.py --workdir runs/ablation
    python experiments/run.py --config experiments/configs/rm_ablation.py:smoke --workdir runs/a

Stages (each in <workdir>/<stage>): regression on helpfulness only and on all five attributes;
regular, margin and scaled BT from scratch; the same three BT variants initialised from the
helpfulness regression model (head included). `notebooks/01_reward_objectives.py` reads the
workdir and adds ExPO and the table. Args: model, data=DIR, smoke.
"""

import ml_collections

from experiments.configs import common, rm_bt, rm_regression

BT = ("regular", "margin", "scaled")


def get_config(arg=None):
    a = common.parse_arg(arg, model="tiny", data="", smoke=False)
    passthrough = f"model={a.model}" + (f",data={a.data}" if a.data else "")
    passthrough += ",smoke" if a.smoke else ""
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
    return c
