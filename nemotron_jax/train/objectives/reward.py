"""Reward models on HelpSteer2: SteerLM regression on the ratings (9-slot labels, -100 =
missing) and Bradley-Terry on HelpSteer2-Preference pairs [B, 2, T] (regular, margin, scaled)."""

from __future__ import annotations

import functools

import jax
import numpy as np

from nemotron_jax.errors import ConfigError
from nemotron_jax.losses import get_loss
from nemotron_jax.models.reward import RewardModel
from nemotron_jax.train.objective import (
    Objective,
    model_config,
    supervised_batch_spec,
    supervised_data,
)

PAIR_LOSSES = ("regular_bt", "margin_bt", "scaled_bt")


def _pair_loss(config, num_attributes: int):
    """The BT loss named by config.objective with config.loss's options bound."""
    loss = config.loss
    if not 0 <= loss.slot < num_attributes:
        raise ConfigError(f"config.loss.slot {loss.slot} is outside the {num_attributes}-slot head")
    options = dict(slot=loss.slot, tie_policy=loss.tie_policy)
    if loss.attribute_weights:
        weights = tuple(loss.attribute_weights)
        if len(weights) != num_attributes:
            raise ConfigError(
                f"config.loss.attribute_weights has {len(weights)} entries; "
                f"the head has {num_attributes} slots"
            )
        options["weights"] = weights
    if config.objective == "scaled_bt":
        options["normalization"] = loss.normalization
    fn = functools.partial(get_loss(config.objective), **options)
    # Bind-time check of the options, so a bad tie policy fails before data loading.
    jax.eval_shape(
        fn, np.zeros((1, 2, num_attributes), np.float32), {"strength": np.ones(1, np.int32)}
    )
    return fn


def build(config) -> Objective:
    """A `RewardModel` of config.model.num_attributes head slots and config.objective's loss."""
    mcfg = model_config(config)
    num_attributes = config.model.num_attributes
    if config.objective == "regression":
        loss, kind, keys = get_loss("regression"), "regression", ("loss", "mse")
    else:
        loss, kind = _pair_loss(config, num_attributes), "pairs"
        keys = ("loss", "accuracy", "reward_gap")
    drop_ties = kind == "pairs" and config.loss.tie_policy == "drop"
    return Objective(
        name=config.objective,
        model_config=mcfg,
        module=RewardModel(mcfg, num_attributes),
        loss_fn=loss,
        progress_keys=keys,
        make_data=lambda mesh, rules, workdir=None: supervised_data(
            config, mcfg, kind, mesh, drop_ties
        ),
        batch_spec=supervised_batch_spec(kind),
        seq_len=config.data.max_len,
        num_attributes=num_attributes,
    )
