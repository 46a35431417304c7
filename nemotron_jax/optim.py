"""The optimizer: AdamW with NeMo-Aligner's reward-model defaults, built from a config.

Defaults (NeMo-Aligner `training_rm.yaml`): betas (0.9, 0.98), weight decay 0.1, gradient
clipping at global norm 1.0, linear warm-up then constant (or cosine to `min_lr`). As in
Megatron, biases and norm scales are not decayed.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from nemotron_jax.errors import ConfigError

SCHEDULES = ("constant", "cosine")


def learning_rate_schedule(
    *,
    lr: float,
    warmup_steps: int,
    total_steps: int,
    schedule: str = "constant",
    min_lr: float | None = None,
) -> optax.Schedule:
    if schedule not in SCHEDULES:
        raise ConfigError(f"optim.schedule {schedule!r} is unknown; choose from {list(SCHEDULES)}")
    warmup = optax.linear_schedule(0.0, lr, max(warmup_steps, 1))
    if schedule == "constant":
        after = optax.constant_schedule(lr)
    else:
        decay_steps = max(total_steps - warmup_steps, 1)
        after = optax.cosine_decay_schedule(lr, decay_steps, alpha=(min_lr or 0.0) / lr)
    if warmup_steps == 0:  # no warm-up: the first update already runs at the full rate
        return after
    return optax.join_schedules([warmup, after], [warmup_steps])


def decay_mask(params: Any) -> Any:
    """True for weights that get weight decay: not norm scales, not biases."""

    def keep(path, _):
        names = [str(getattr(k, "key", k)) for k in path]
        return not any("norm" in n or n == "bias" for n in names)

    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(optim: Any, total_steps: int) -> optax.GradientTransformation:
    """`optim` is the experiment's `config.optim` (lr, b1, b2, eps, weight_decay, clip_norm,
    warmup_steps, schedule, min_lr)."""
    if optim.lr <= 0:
        raise ConfigError(f"optim.lr must be positive, got {optim.lr}")
    schedule = learning_rate_schedule(
        lr=optim.lr,
        warmup_steps=optim.warmup_steps,
        total_steps=total_steps,
        schedule=optim.schedule,
        min_lr=optim.min_lr,
    )
    return optax.chain(
        optax.clip_by_global_norm(optim.clip_norm),
        optax.adamw(
            schedule,
            b1=optim.b1,
            b2=optim.b2,
            eps=optim.eps,
            weight_decay=optim.weight_decay,
            mask=decay_mask,
        ),
    )
