"""REINFORCE: a Llama LM on its own samples, scored by a frozen reward model (or a Python
function), with a leave-one-out baseline and a KL penalty to a frozen reference policy. Its
batches come from `nemotron_jax/train/rollouts.py`, which reads only `ReinforceSettings`."""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import numpy as np

from nemotron_jax import artifact
from nemotron_jax.errors import CheckpointError, ConfigError
from nemotron_jax.losses import get_loss
from nemotron_jax.models import lora
from nemotron_jax.models.llama import Llama
from nemotron_jax.train.objective import DataBundle, Objective, model_config


@dataclasses.dataclass(frozen=True)
class ReinforceSettings:
    """What REINFORCE reads of an experiment config: `config.rl` (whose comments in
    `experiments/configs/common.py` explain each field), the models and the run's sizes."""

    num_rollouts_per_prompt: int  # K
    prompts_per_step: int  # P
    beta: float
    kl_estimator: str
    kl_reduce: str
    baseline: str
    advantage: str
    kl_in: str
    gamma: float
    lam: float
    whiten_advantages: bool
    epochs: int
    policy_logprobs: str
    max_prompt_len: int
    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    eval_prompts: int
    eval_temperature: float
    sampler_weights: str
    policy_from: str  # config.init_from
    reference_from: str  # "" = the initial policy
    rm_from: str
    rm_slot: int
    reward_fn: str
    minibatch_size: int  # config.batch_size: sequences per optimizer update
    eval_batch_size: int
    seed: int
    template: str
    logprobs_impl: str

    @classmethod
    def from_config(cls, config) -> ReinforceSettings:
        rl = config.rl
        fields = {f.name: rl[f.name] for f in dataclasses.fields(cls) if f.name in rl}
        if fields["policy_logprobs"] == "auto":  # 16-bit sampler log-probs would bias the KL
            wide = np.dtype(jax.numpy.dtype(config.model.dtype)).itemsize >= 4
            fields["policy_logprobs"] = "sampler" if wide else "recompute"
        return cls(
            **fields,
            policy_from=config.init_from,
            reference_from=config.reference_from or config.init_from,
            rm_from=config.rm_from,
            rm_slot=config.rm_slot,
            reward_fn=config.reward_fn,
            minibatch_size=config.batch_size,
            eval_batch_size=config.eval_batch_size,
            seed=config.seed,
            template=config.data.template,
            logprobs_impl=config.loss.logprobs_impl,
        )


# config.init_from / config.rm_from value (smoke runs): a random model of config.model's
# architecture, written into the workdir at start (`write_random_models`).
RANDOM = "random"


def write_random_models(config, out_dir) -> dict[str, str]:
    """A random policy and reward model of config.model's architecture, with the configured
    data's tokenizer, as params checkpoints under `out_dir` (kept when already there): what
    `init_from=random` and `rm_from=random` resolve to. Returns {config key: path}."""
    from pathlib import Path

    from nemotron_jax import distributed
    from nemotron_jax.data.splits import configured_tokenizer
    from nemotron_jax.models.reward import RewardModel

    mcfg = lora.base_config(model_config(config))  # plain models: a LoRA run adds its adapters
    tokenizer = configured_tokenizer(config.data)
    tokens = jax.numpy.zeros((1, 1), jax.numpy.int32)
    paths = {}
    for key, kind in (("init_from", "causal_lm"), ("rm_from", "reward_model")):
        if config[key] != RANDOM:
            continue
        path = Path(out_dir) / ("policy" if kind == "causal_lm" else "reward_model")
        written = path.exists()
        distributed.sync(f"random_{kind}_looked_for")  # all agree before process 0 writes it
        if not written:
            heads = config.model.num_attributes
            module = Llama(mcfg) if kind == "causal_lm" else RewardModel(mcfg, heads)
            rng = jax.random.PRNGKey(config.seed + (kind == "reward_model"))
            params = jax.jit(lambda rng, m=module: m.init(rng, tokens, attention_mask=tokens + 1))(
                rng
            )
            artifact.save(  # host copies: every process saves, process 0 writes (orbax)
                path,
                jax.device_get(nn.unbox(params["params"])),
                config=mcfg,
                kind=kind,
                num_attributes=heads if kind == "reward_model" else None,
                tokenizer=tokenizer,
                template=config.data.template,
                max_len=config.data.max_len,
                extra={"objective": f"random ({key}={RANDOM})"},
            )
        paths[key] = str(path)
    return paths


def _policy(config):
    """The initial policy's artifact; it must read the run's chat template."""
    if not config.init_from:
        raise ConfigError(
            "config.init_from must name the initial policy (e.g. an SFT run's <workdir>/params)"
        )
    try:
        policy = artifact.load(config.init_from, kind="causal_lm", restore=False)
    except CheckpointError as e:
        raise CheckpointError(f"config.init_from (the policy): {e}") from None
    if policy.template is not None and policy.template != config.data.template:
        raise ConfigError(
            f"config.data.template is {config.data.template!r} but the policy {config.init_from} "
            f"was trained with {policy.template!r}"
        )
    return policy


def rollout_data(config, mcfg, mesh, rules, critic=None) -> DataBundle:
    """The rollout source over the configured prompts. `critic` (architecture, head size):
    PPO's, whose values the rollouts read from the {"policy", "critic"} parameters."""
    from nemotron_jax import sharding
    from nemotron_jax.data import splits
    from nemotron_jax.train import rollouts

    policy = _policy(config)
    # The policy's own tokenizer reads the prompts, unless the config names one.
    data = splits.load(
        config.data,
        "prompts",
        tokenizer=None if config.data.tokenizer else policy.tokenizer,
        max_len=config.rl.max_prompt_len,
    )
    artifact.check_vocabulary(data.tokenizer, mcfg)
    mesh = sharding.make_mesh(tuple(config.mesh)) if mesh is None else mesh
    rules = sharding.DEFAULT_RULES if rules is None else rules
    settings = ReinforceSettings.from_config(config)
    source, report = rollouts.build(settings, mcfg, mesh, rules, policy, data, critic=critic)
    return DataBundle(source, [], report, data.tokenizer, evaluate=source.evaluate)


def batch_spec(batch_size: int, seq_len: int) -> dict[str, jax.ShapeDtypeStruct]:
    """One minibatch as `rollouts.RolloutSource.produce` yields it: the sampled sequences
    (prompt + response, right-padded to T), their advantages, and the reference's and the
    rollout policy's log-probs."""
    rows = jax.ShapeDtypeStruct((batch_size, seq_len), np.int32)
    return {
        "tokens": rows,
        "attention_mask": rows,
        "response_mask": rows,
        "advantage": jax.ShapeDtypeStruct((batch_size,), np.float32),
        "is_end": jax.ShapeDtypeStruct((batch_size,), np.bool_),
        "ref_logprobs": jax.ShapeDtypeStruct((batch_size, seq_len), np.float32),
        "old_logprobs": jax.ShapeDtypeStruct((batch_size, seq_len), np.float32),
    }


def build(config) -> Objective:
    mcfg = model_config(config)
    loss = functools.partial(
        get_loss("reinforce"),
        implementation=config.loss.logprobs_impl,
        normalize=config.rl.normalize,
        truncated=config.rl.truncated,
        clip_eps=config.rl.clip_eps if config.rl.policy_loss == "clipped" else 0.0,
        kl_loss_coef=config.rl.beta if config.rl.kl_in == "loss" else 0.0,
    )
    return Objective(
        name="reinforce",
        model_config=mcfg,
        module=Llama(mcfg),
        loss_fn=loss,
        progress_keys=("reward_mean", "kl", "response_length"),
        make_data=lambda mesh, rules, workdir=None: rollout_data(config, mcfg, mesh, rules),
        batch_spec=batch_spec,
        seq_len=config.rl.max_prompt_len + config.rl.max_new_tokens,
        method="hidden_and_head",
    )
