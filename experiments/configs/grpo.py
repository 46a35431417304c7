"""GRPO as a configuration of the REINFORCE parts (`nemotron_jax/losses/reinforce.py`):
group-normalised advantages over each prompt's K samples, the clipped ratio surrogate, and the
KL to the reference as a k3 loss term (DeepSeekMath's GRPO; TRL's GRPOTrainer defaults where
the paper is silent: std with ddof 1 and eps 1e-4 under it).

    python experiments/run.py --workdir runs/grpo --config \
        experiments/configs/grpo.py:policy=runs/sft/params,rm=runs/recipe/3_expo/params

Args: as reinforce.py (policy=, rm= or reward_fn=, model=, data=, k=, smoke), plus
beta=0.04 (the k3 loss coefficient), kl_in=loss|reward, clip_eps=0.2, normalize=sequence|token.
"""

from experiments.configs import common, reinforce


def get_config(arg=None):
    a = common.parse_arg(
        arg,
        lora=0,
        policy="",
        rm="",
        reward_fn="",
        model="tiny",
        data="",
        k=4,
        beta=0.04,
        kl_in="loss",
        clip_eps=0.2,
        normalize="sequence",
        smoke=False,
    )
    passed = {
        "policy": a.policy,
        "rm": a.rm,
        "reward_fn": a.reward_fn,
        "model": a.model,
        "lora": a.lora or "",
    }
    passed |= {"data": a.data, "k": a.k}
    arg = ",".join(f"{key}={value}" for key, value in passed.items() if value not in ("", None))
    c = reinforce.get_config(arg + (",smoke" if a.smoke else ""))
    c.name = "grpo"
    c.rl.advantage = "group_norm"
    c.rl.policy_loss = "clipped"
    c.rl.clip_eps = a.clip_eps
    c.rl.kl_in = a.kl_in
    c.rl.kl_estimator = "k3"  # the logged KL, and the reward's under kl_in=reward
    c.rl.beta = a.beta
    c.rl.normalize = a.normalize
    c.rl.baseline = "rloo_all"  # every sample counts in its group (read by rloo only)
    c.rl.truncated = "keep"  # GRPO trains on truncated samples too
    return c
