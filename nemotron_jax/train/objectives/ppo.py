"""PPO as NeMo-Aligner runs it: a policy and a critic trained together on the policy's own
samples, scored by a frozen reward model, with GAE advantages over the response tokens.

The two models are one parameter tree {"policy", "critic"} (`models.reward.ActorCritic`), so
the one loop, checkpoint and resume serve both; each has its own optimizer (`optax`'s
`multi_transform`: config.optim for the policy, config.critic_optim for the critic, each with
its own clipping and Adam moments). The critic starts from the reward model (backbone and
head; its value is the head's `rm_slot`), the policy from config.init_from. Rollouts are
REINFORCE's (`train/rollouts.py`) with `rl.advantage = "gae"`; the loss is
`losses.reinforce.ppo`. The run writes the policy to <workdir>/params and the critic to
<workdir>/critic.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import numpy as np
import optax

from nemotron_jax import artifact
from nemotron_jax.artifact import NUMERIC_FIELDS
from nemotron_jax.losses import get_loss
from nemotron_jax.models import lora
from nemotron_jax.models.llama import LlamaConfig
from nemotron_jax.models.reward import ActorCritic
from nemotron_jax.optim import make_optimizer
from nemotron_jax.train.objective import Objective, model_config, restore_into
from nemotron_jax.train.objectives import reinforce


@dataclasses.dataclass(frozen=True)
class PPOObjective(Objective):
    """`Objective` over the {"policy", "critic"} tree: it loads, exports and optimises the two
    models separately."""

    critic_config: LlamaConfig | None = None
    critic_attributes: int = 1
    rm_from: str = ""

    def load_init(self, path, params, shardings, *, init_head=True):
        del init_head  # the critic always takes the reward model's head
        policy = restore_into(
            path,
            params["policy"],
            shardings["policy"],
            self.model_config,
            "causal_lm",
            True,
            "init_from",
        )
        critic = restore_into(
            self.rm_from,
            params["critic"],
            shardings["critic"],
            self.critic_config,
            "reward_model",
            True,
            "rm_from (the critic's start)",
        )
        return {"policy": policy, "critic": critic}

    def exports(self, params):
        return {
            "params": (params["policy"], self.model_config, "causal_lm", None),
            "critic": (
                params["critic"],
                self.critic_config,
                "reward_model",
                self.critic_attributes,
            ),
        }


def critic_architecture(config, policy_config: LlamaConfig) -> tuple[LlamaConfig, int]:
    """The critic's architecture and head size: the reward model's (config.rm_from), in the
    run's numerics and LoRA adapters; the policy's and config.model.num_attributes when no
    reward model is on disk yet (an ahead-of-time plan)."""
    path = config.rm_from
    if not path or path == reinforce.RANDOM or path.startswith("@") or not os.path.exists(path):
        return policy_config, config.model.num_attributes
    rm = artifact.load(path, kind="reward_model", restore=False)
    # The run's numerics, and its LoRA adapters: with LoRA the critic trains adapters too.
    numerics = {k: getattr(policy_config, k) for k in NUMERIC_FIELDS | lora.ADAPTER_FIELDS}
    return dataclasses.replace(rm.config, **numerics), rm.num_attributes


def optimizer(config, total_updates: int) -> optax.GradientTransformation:
    """One optimizer per model: config.optim for the policy, config.critic_optim for the
    critic."""

    def labels(params):  # the label tree keeps the (boxed) structure of params
        return {name: jax.tree.map(lambda _, n=name: n, tree) for name, tree in params.items()}

    return optax.multi_transform(
        {
            "policy": make_optimizer(config.optim, total_updates),
            "critic": make_optimizer(config.critic_optim, total_updates),
        },
        labels,
    )


def batch_spec(batch_size: int, seq_len: int) -> dict[str, jax.ShapeDtypeStruct]:
    """One PPO minibatch (`rollouts.RolloutSource.produce` with a critic): REINFORCE's rows with
    per-token advantages, GAE returns and the rollout critic's values instead of a
    per-sequence advantage."""
    spec = reinforce.batch_spec(batch_size, seq_len)
    del spec["advantage"]
    per_token = jax.ShapeDtypeStruct((batch_size, seq_len), np.float32)
    return {**spec, "token_advantage": per_token, "returns": per_token, "old_values": per_token}


def build(config) -> Objective:
    mcfg = model_config(config)
    critic_config, heads = critic_architecture(config, mcfg)
    loss = functools.partial(
        get_loss("ppo"),
        implementation=config.loss.logprobs_impl,
        normalize=config.rl.normalize,
        clip_eps=config.rl.clip_eps,
        value_clip=config.rl.value_clip,
    )
    return PPOObjective(
        name="ppo",
        model_config=mcfg,
        module=ActorCritic(mcfg, critic_config, heads, config.rm_slot),
        loss_fn=loss,
        progress_keys=("reward_mean", "kl", "value_loss"),
        make_data=lambda mesh, rules, workdir=None: reinforce.rollout_data(
            config, mcfg, mesh, rules, critic=(critic_config, heads)
        ),
        batch_spec=batch_spec,
        seq_len=config.rl.max_prompt_len + config.rl.max_new_tokens,
        make_optimizer=lambda total: optimizer(config, total),
        critic_config=critic_config,
        critic_attributes=heads,
        rm_from=config.rm_from,
    )
