"""Bradley-Terry reward models on HelpSteer2-Preference: regular, margin or scaled.

    python experiments/run.py --config experiments/configs/rm_bt.py:loss=scaled,smoke \
        --workdir runs/rm_bt_smoke
    python experiments/run.py --config experiments/configs/rm_bt.py:loss=margin \
        --config.init_from=runs/rm_regression/params --workdir runs/rm_margin_from_reg

Args: loss=regular|margin|scaled, init_from=PARAMS (an earlier run's <workdir>/params, head
included, or an HF-converted backbone), model=tiny|llama3.1-8b|..., data=DIR, smoke.
Ties (strength 0) are dropped (config.loss.tie_policy=nemo keeps NeMo's treatment).
"""

from experiments.configs import common
from nemotron_jax.errors import ConfigError

LOSSES = {"regular": "regular_bt", "margin": "margin_bt", "scaled": "scaled_bt"}


def get_config(arg=None):
    a = common.parse_arg(
        arg, lora=0, loss="scaled", init_from="", model="tiny", data="", smoke=False
    )
    if a.loss not in LOSSES:
        raise ConfigError(f"config arg loss={a.loss!r}; choose from {sorted(LOSSES)}")
    c = common.base_config(f"rm_{a.loss}_bt", LOSSES[a.loss])
    common.real_model(c, a.model)
    if a.model != "tiny":  # NeMo's stage-2 recipe: 105 steps of 64 pairs at 1e-6
        c.num_steps, c.optim.lr, c.batch_size, c.eval_batch_size = 105, 1e-6, 64, 64
    c.init_from = a.init_from
    if a.data:
        c.data.source, c.data.dir = "dir", a.data
    common.lora(c, a.lora)
    if a.smoke:
        common.smoke(c)
    return c
