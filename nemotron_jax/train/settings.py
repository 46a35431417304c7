"""Start-of-run checks of a training config: every enumerated field against its choices, every
numeric field against its range, every path against the disk.

    check(config)       # raises ConfigError naming the key, before any array exists

A multi-stage experiment checks every stage before the first one trains, so that a typo in
stage 2 does not cost stage 1's hours. Settings that depend on the mesh or the model (batch
divisibility, context length) are checked where those exist (`loop.validate`,
`rollouts.check_settings`).
"""

from __future__ import annotations

import math
import os

from nemotron_jax.errors import ConfigError

DTYPES = ("float32", "bfloat16", "float16")
NAN_POLICIES = ("stop", "skip")


def _choices() -> dict[str, tuple]:
    # Imported here: each list lives beside the code that acts on it.
    from nemotron_jax.data.splits import SOURCES
    from nemotron_jax.losses.dpo import REFERENCE_MODES, VARIANTS
    from nemotron_jax.losses.reinforce import (
        ADVANTAGES,
        KL_ESTIMATORS,
        KL_PLACEMENTS,
        POLICY_LOSSES,
        REINFORCE_NORMALIZATIONS,
        TRUNCATED_POLICIES,
    )
    from nemotron_jax.losses.reward import NORMALIZATIONS, TIE_POLICIES
    from nemotron_jax.models.llama import ATTENTION_IMPLS, PRESETS, REMAT_POLICIES
    from nemotron_jax.optim import SCHEDULES
    from nemotron_jax.sampling import SAMPLER_WEIGHTS
    from nemotron_jax.train.objectives import OBJECTIVES

    return {
        "objective": tuple(OBJECTIVES),
        "model.preset": tuple(sorted(PRESETS)),
        "model.dtype": DTYPES,
        "model.param_dtype": DTYPES,
        "model.remat": tuple(REMAT_POLICIES),
        "model.attention_impl": tuple(ATTENTION_IMPLS),
        "loss.tie_policy": TIE_POLICIES,
        "loss.normalization": NORMALIZATIONS,
        "loss.logprobs_impl": ("chunked", "pallas", "pallas_interpret", "reference"),
        "data.source": SOURCES,
        "data.template": ("nemo", "llama3"),
        "data.truncation": ("truncate", "skip"),
        "data.attributes": ("helpfulness", "all"),
        "data.on_bad_row": ("raise", "skip"),
        "optim.schedule": SCHEDULES,
        "critic_optim.schedule": SCHEDULES,
        "nan_policy": NAN_POLICIES,
        "rl.kl_estimator": KL_ESTIMATORS,
        "rl.kl_reduce": ("mean", "sum"),
        "rl.baseline": ("rloo_eos", "rloo_all"),
        "rl.normalize": REINFORCE_NORMALIZATIONS,
        "rl.policy_logprobs": ("auto", "sampler", "recompute"),
        "rl.sampler_weights": SAMPLER_WEIGHTS,
        "rl.truncated": TRUNCATED_POLICIES,
        "rl.advantage": ADVANTAGES,
        "rl.kl_in": KL_PLACEMENTS,
        "rl.policy_loss": POLICY_LOSSES,
        "dpo.variant": VARIANTS,
        "dpo.reference": REFERENCE_MODES,
    }


# key -> (lowest allowed, whether the lowest is allowed); None = no bound below.
_RANGES = {
    "seed": (0, True),
    "batch_size": (1, True),
    "eval_batch_size": (1, True),
    "micro_batch_size": (0, True),
    "grad_accum": (1, True),
    "num_steps": (1, True),
    "log_every": (1, True),
    "eval_every": (1, True),
    "checkpoint_every": (1, True),
    "max_to_keep": (1, True),
    "nan_max_skips": (0, True),
    "model.num_attributes": (1, True),
    "loss.slot": (0, True),
    "data.max_len": (2, True),
    "data.synthetic_prompts": (10, True),
    "data.synthetic_seed": (0, True),
    "data.sft_min_helpfulness": (0, True),
    "data.max_rows": (0, True),
    "optim.lr": (0, False),
    "optim.eps": (0, False),
    "optim.b1": (0, True),
    "optim.b2": (0, True),
    "optim.weight_decay": (0, True),
    "optim.clip_norm": (0, True),
    "optim.warmup_steps": (0, True),
    "optim.min_lr": (0, True),
    "critic_optim.lr": (0, False),
    "critic_optim.eps": (0, False),
    "critic_optim.b1": (0, True),
    "critic_optim.b2": (0, True),
    "critic_optim.weight_decay": (0, True),
    "critic_optim.clip_norm": (0, True),
    "critic_optim.warmup_steps": (0, True),
    "critic_optim.min_lr": (0, True),
    "rm_slot": (0, True),
    "rl.num_rollouts_per_prompt": (1, True),  # >= 2 unless advantage=gae (rollouts.check)
    "rl.prompts_per_step": (1, True),
    "rl.beta": (0, True),
    "rl.max_prompt_len": (1, True),
    "rl.max_new_tokens": (1, True),
    "rl.temperature": (0, True),
    "rl.top_k": (0, True),
    "rl.top_p": (0, False),
    "rl.eval_prompts": (1, True),
    "rl.eval_temperature": (0, True),
    "rl.clip_eps": (0, False),
    "rl.gamma": (0, True),
    "rl.lam": (0, True),
    "rl.value_clip": (0, True),
    "rl.epochs": (1, True),
    "dpo.beta": (0, False),
    "dpo.label_smoothing": (0, True),
    "dpo.sft_weight": (0, True),
    "dpo.strength_scale": (0, False),
    "lora.alpha": (0, False),
    "lora.dropout": (0, True),
}
# Upper bounds, inclusive unless noted.
_BELOW = {
    "optim.b1": (1, False),
    "optim.b2": (1, False),
    "rl.top_p": (1, True),
    "rl.clip_eps": (1, False),
    "critic_optim.b1": (1, False),
    "critic_optim.b2": (1, False),
    "rl.gamma": (1, True),
    "rl.lam": (1, True),
    "dpo.label_smoothing": (0.5, False),
    "lora.dropout": (1, False),
}
# Checkpoints read at start; "" means none, "@stage" an earlier stage's params, "random" a random
# model written at start (init_from and rm_from of REINFORCE smoke runs; experiment.py).
PATH_KEYS = ("init_from", "reference_from", "rm_from")


def get(config, key: str):
    """config.<key> for a dotted key; every key checked here is declared in
    experiments/configs/common.py, so a missing one is a config built elsewhere."""
    node = config
    for part in key.split("."):
        if part not in node:
            raise ConfigError(
                f"config.{key} is missing; training configs start from "
                f"experiments/configs/common.py:base_config, which declares every field"
            )
        node = node[part]
    return node


def check(config) -> None:
    """Raises `ConfigError` on the first field outside its choices or range, or a path that
    does not exist, naming the key, its value and what is valid."""
    for key, valid in _choices().items():
        value = get(config, key)
        if value not in valid:
            raise ConfigError(f"config.{key} is {value!r}; choose from {list(valid)}")
    for key, (low, inclusive) in _RANGES.items():
        value = get(config, key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"config.{key} is {value!r}; expected a number")
        if not math.isfinite(value) or value < low or (value == low and not inclusive):
            bound = f">= {low}" if inclusive else f"> {low}"
            raise ConfigError(f"config.{key} is {value!r}; it must be {bound}")
        high = _BELOW.get(key)
        if high and (value > high[0] or (value == high[0] and not high[1])):
            bound = f"<= {high[0]}" if high[1] else f"< {high[0]}"
            raise ConfigError(f"config.{key} is {value!r}; it must be {bound}")
    _check_online(config)
    _check_lora(config)
    shape = tuple(get(config, "mesh"))
    if len(shape) != 3 or any(not isinstance(s, int) or (s < 1 and s != -1) for s in shape):
        raise ConfigError(
            f"config.mesh is {shape}; expected (data, fsdp, tensor), positive ints, at most one "
            f"-1 (the remaining devices)"
        )
    from nemotron_jax.train.objectives.reinforce import RANDOM

    for key in PATH_KEYS:
        path = get(config, key)
        if path and path != RANDOM and not path.startswith("@") and not os.path.exists(path):
            raise ConfigError(f"config.{key} {path}: no such checkpoint directory")
    data = config.data
    if data.source in ("dir", "tfds"):
        if not data.dir:
            raise ConfigError(f"config.data.source is {data.source!r} but config.data.dir is empty")
        if not os.path.isdir(data.dir):
            raise ConfigError(f"config.data.dir {data.dir}: no such directory")
    if data.tokenizer not in ("", "llama3", "synthetic") and not os.path.isfile(data.tokenizer):
        raise ConfigError(
            f"config.data.tokenizer {data.tokenizer}: no such SentencePiece model file "
            f"('' = the data's own, 'llama3' = Meta's)"
        )


def _check_lora(config) -> None:
    """LoRA's targets, and its reference: the base the adapters train on."""
    from nemotron_jax.models.llama import LORA_TARGETS

    lora = config.lora
    if not isinstance(lora.rank, int) or isinstance(lora.rank, bool):
        raise ConfigError(f"config.lora.rank is {lora.rank!r}; expected an int (0 = no LoRA)")
    targets = (lora.targets,) if isinstance(lora.targets, str) else tuple(lora.targets)
    unknown = [t for t in targets if t not in LORA_TARGETS]
    if unknown or not targets:
        raise ConfigError(
            f"config.lora.targets {list(targets)}: {unknown or 'none given'}; each must be one of "
            f"the projections {list(LORA_TARGETS)}"
        )
    if lora.rank < 0:
        raise ConfigError(f"config.lora.rank is {lora.rank}; it must be > 0 (or 0: no LoRA)")
    if not lora.rank:
        from nemotron_jax.models.llama import LlamaConfig

        default = LlamaConfig()
        changed = [
            key
            for key, value, off in (
                ("targets", targets, default.lora_targets),
                ("alpha", lora.alpha, default.lora_alpha),
                ("dropout", lora.dropout, default.lora_dropout),
            )
            if value != off
        ]
        if changed:
            raise ConfigError(
                f"config.lora.{changed[0]} is set but config.lora.rank is 0 (LoRA off): give "
                f"the rank (lora=RANK, or --config.lora.rank=RANK), which must be > 0"
            )
        return
    with_reference = config.objective in ("dpo", "reinforce", "ppo")
    if with_reference and config.reference_from and config.reference_from != config.init_from:
        raise ConfigError(
            f"config.reference_from is {config.reference_from!r} with config.lora.rank "
            f"{lora.rank}: with LoRA the reference is the base model (config.init_from "
            f"{config.init_from!r}) with its adapters off; leave reference_from empty"
        )


def _check_online(config) -> None:
    """The policy-gradient settings that depend on each other."""
    rl, ppo = config.rl, config.objective == "ppo"
    if ppo != (rl.advantage == "gae"):
        raise ConfigError(
            f"config.rl.advantage is {rl.advantage!r} with config.objective {config.objective!r}: "
            f"GAE needs PPO's critic (objective ppo, advantage gae; experiments/configs/ppo.py)"
        )
    if ppo and not config.rm_from:
        raise ConfigError(
            "config.rm_from is empty: PPO needs a reward model, which scores the samples and "
            "is the critic's starting point"
        )
    if config.objective == "reinforce" and rl.num_rollouts_per_prompt < 2:
        what = (
            "group normalisation" if rl.advantage == "group_norm" else "the leave-one-out baseline"
        )
        raise ConfigError(
            f"config.rl.num_rollouts_per_prompt is {rl.num_rollouts_per_prompt}; it must be >= 2 "
            f"({what} compares each sample with its prompt's others)"
        )
