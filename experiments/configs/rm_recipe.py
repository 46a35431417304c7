"""The paper's best reward-model recipe in one command: stage 1 trains a helpfulness-only
SteerLM regression model; stage 2 trains Scaled Bradley-Terry initialised from it, head
included, reading the same head slot (4).

    python experiments/run.py --config experiments/configs/rm_recipe.py --workdir runs/recipe
    python experiments/run.py --config experiments/configs/rm_recipe.py:smoke --workdir runs/r

Args: model=tiny|llama3.1-8b|llama3.1-70b|..., init_from=PARAMS (stage 1's starting point, e.g.
an HF-converted Llama-3.1-70B-Instruct), data=DIR, bt=regular|margin|scaled, smoke.
Outputs: <workdir>/1_regression and <workdir>/2_<bt>_bt, each with metrics.jsonl and params/.
"""

import ml_collections

from experiments.configs import common, rm_bt, rm_regression


def get_config(arg=None):
    a = common.parse_arg(arg, model="tiny", init_from="", data="", bt="scaled", smoke=False)
    passthrough = f"model={a.model}" + (f",data={a.data}" if a.data else "")
    passthrough += ",smoke" if a.smoke else ""
    stage1 = rm_regression.get_config(f"attributes=helpfulness,{passthrough}")
    stage1.init_from = a.init_from
    stage2 = rm_bt.get_config(f"loss={a.bt},init_from=@1_regression,{passthrough}")
    if a.model == "tiny" and not a.smoke:
        # From a trained regression model, BT needs far fewer steps and a lower rate.
        stage2.num_steps, stage2.optim.lr = 300, 3e-4
    c = ml_collections.ConfigDict()
    c.name = "rm_recipe"
    c.stages = ml_collections.ConfigDict({"1_regression": stage1, f"2_{a.bt}_bt": stage2})
    return c
