"""DPO on HelpSteer2-Preference pairs, three ways (`nemotron_jax/losses/dpo.py`): Table 4's
Regular, Margin and Scaled DPO.

    python experiments/run.py --workdir runs/dpo --config \
        experiments/configs/dpo.py:variant=scaled,policy=runs/sft/params

Args:
    variant=regular|margin|scaled   the loss (margin and scaled: our definitions, see the loss)
    policy=PARAMS   the initial policy, also the frozen reference (e.g. an SFT run's params)
    reference=PARAMS  another frozen reference (default: the policy)
    beta=0.1, strength_scale=1.0 (m = |strength| x scale; 1/3 puts m in 1/3..1)
    model=tiny|llama3.1-8b|llama3.1-70b|..., data=DIR, smoke (with no policy, a random tiny one,
    said so at start: it checks the machinery only).

The reference's log-probs are computed once before step 0 and kept in the workdir
(`--config.dpo.reference=resident` keeps the reference on the devices instead). Real sizes use
NeMo-Aligner's DPO rate for Llama-3 70B (5e-7) with beta 0.1 over one epoch of the pairs.
"""

from experiments.configs import common


def get_config(arg=None):
    a = common.parse_arg(
        arg,
        lora=0,
        variant="regular",
        policy="",
        reference="",
        beta=0.1,
        strength_scale=1.0,
        model="tiny",
        data="",
        smoke=False,
    )
    c = common.base_config(f"dpo_{a.variant}", "dpo")
    common.real_model(c, a.model)
    if a.data:
        c.data.source, c.data.dir = "dir", a.data
    c.init_from = a.policy
    c.reference_from = a.reference
    c.dpo.variant = a.variant
    c.dpo.beta = a.beta
    c.dpo.strength_scale = a.strength_scale
    c.optim.lr = 1e-4  # tiny policy
    c.optim.weight_decay = 0.0
    c.num_steps = 100
    c.log_every = 10
    c.eval_every = c.checkpoint_every = 50
    if a.model != "tiny":
        c.data.template = "llama3"
        c.optim.lr = 5e-7
        c.optim.warmup_steps = 10
        c.num_steps = 60  # ~7.7k training pairs without ties at batch 128: one epoch
        c.eval_every = c.checkpoint_every = 20
    common.lora(c, a.lora)
    if a.smoke:
        common.smoke(c)
        if not a.policy:  # a random tiny policy, written at start
            c.init_from = "random"
    return c
