"""PPO with a critic, as NeMo-Aligner runs it: the policy samples, the frozen reward model
scores, the critic (started from the reward model) values each response token, GAE(gamma,
lambda) turns per-token rewards (-beta * KL_t, plus the score on the last token) into
advantages, and the policy's clipped surrogate and the critic's clipped value loss train for
several epochs of minibatches per rollout batch. Same rollouts, sampler, reference and reward
model as REINFORCE (`nemotron_jax/train/objectives/ppo.py`).

    python experiments/run.py --workdir runs/ppo --config \
        experiments/configs/ppo.py:policy=runs/sft/params,rm=runs/recipe/3_expo/params

Args: as reinforce.py (policy=, rm=, model=, data=, smoke), plus k=1 (samples per prompt;
NeMo's PPO samples one), beta=0.01, gamma=1.0, lam=0.95, clip_eps=0.2, value_clip=0.2,
epochs=2, critic_lr (default: 3x the policy's rate).
"""

from experiments.configs import common, reinforce


def get_config(arg=None):
    a = common.parse_arg(
        arg,
        lora=0,
        policy="",
        rm="",
        model="tiny",
        data="",
        k=1,
        beta=0.01,
        gamma=1.0,
        lam=0.95,
        clip_eps=0.2,
        value_clip=0.2,
        epochs=2,
        critic_lr=0.0,
        smoke=False,
    )
    passed = {
        "policy": a.policy,
        "rm": a.rm,
        "model": a.model,
        "lora": a.lora or "",
        "data": a.data,
        "beta": a.beta,
    }
    arg = ",".join(f"{key}={value}" for key, value in passed.items() if value not in ("", None))
    c = reinforce.get_config(arg + (",smoke" if a.smoke else ""))
    c.name = c.objective = "ppo"
    c.rl.advantage = "gae"
    c.rl.policy_loss = "clipped"
    c.rl.num_rollouts_per_prompt = a.k
    c.rl.prompts_per_step *= 4 // a.k if a.k < 4 else 1  # as many samples as REINFORCE's
    c.rl.gamma, c.rl.lam = a.gamma, a.lam
    c.rl.clip_eps, c.rl.value_clip = a.clip_eps, a.value_clip
    c.rl.epochs = a.epochs
    c.rl.normalize = "token"  # NeMo's PPO: a masked mean over the minibatch's response tokens
    c.rl.truncated = "keep"  # PPO trains on responses cut at max_new_tokens too
    c.critic_optim = c.optim.copy_and_resolve_references()
    c.critic_optim.lr = a.critic_lr or 3 * c.optim.lr
    if a.smoke and not a.policy:
        c.rm_from = c.rm_from or "random"
    return c
