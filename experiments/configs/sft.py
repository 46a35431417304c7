"""Supervised fine-tuning of a policy on well-rated responses (helpfulness >= 3).

    python experiments/run.py --config experiments/configs/sft.py:smoke --workdir runs/sft_smoke

Args: model=tiny|llama3.1-8b|..., init_from=PARAMS, data=DIR, smoke. The tiny policy trained
here on the synthetic data is the starting point of the REINFORCE pipeline.
"""

from experiments.configs import common


def get_config(arg=None):
    a = common.parse_arg(arg, lora=0, model="tiny", init_from="", data="", smoke=False)
    c = common.base_config("sft", "sft")
    common.real_model(c, a.model)
    if a.model != "tiny":
        # The tiny model's 1e-3 from scratch would wreck a pretrained backbone. 2e-6 is the rate
        # NeMo's recipe fine-tunes the same backbone with on the same ratings (regression
        # stage); 160 steps at batch 128 are one pass's worth of the HelpSteer2 train split
        # (20,324 rows), somewhat more than an epoch of its well-rated subset.
        c.optim.lr, c.optim.weight_decay, c.num_steps = 2e-6, 0.1, 160
    c.init_from = a.init_from
    if a.data:
        c.data.source, c.data.dir = "dir", a.data
    common.lora(c, a.lora)
    if a.smoke:
        common.smoke(c)
    return c
