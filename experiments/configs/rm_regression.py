"""SteerLM regression reward model (stage 1 of the paper's recipe).

    python experiments/run.py --config experiments/configs/rm_regression.py:smoke \
        --workdir runs/rm_regression_smoke
    python experiments/run.py --config experiments/configs/rm_regression.py:attributes=all \
        --workdir runs/rm_regression_all

Args: attributes=helpfulness|all (slot 4 only, or slots 4-8), model=tiny|llama3.1-8b|..., data=
DIR (the downloaded HelpSteer2 files; default: the generated synthetic set), smoke.
On the synthetic data (tiny model, 300 steps, about 3 minutes on 2 CPU cores) the validation
MSE on helpfulness falls well below the label variance.
"""

from experiments.configs import common


def get_config(arg=None):
    a = common.parse_arg(arg, lora=0, attributes="helpfulness", model="tiny", data="", smoke=False)
    c = common.base_config("rm_regression", "regression")
    c.data.attributes = a.attributes
    common.real_model(c, a.model)
    if a.model != "tiny":  # NeMo's stage-1 recipe: 2 epochs of HS2 train, 317 steps
        c.num_steps, c.optim.lr = 317, 2e-6
    if a.data:
        c.data.source, c.data.dir = "dir", a.data
    common.lora(c, a.lora)
    if a.smoke:
        common.smoke(c)
    return c
