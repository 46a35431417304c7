"""The objective families, one module each, and the registry `config.objective` selects from.

    regression, regular_bt, margin_bt, scaled_bt   reward.py: RewardModel on HelpSteer2
    sft                                            sft.py: Llama LM on well-rated responses
    reinforce                                      reinforce.py: Llama LM on its own samples
    dpo                                            dpo.py: Llama LM on preference pairs
    ppo                                            ppo.py: Llama LM and critic, on samples

A new objective is one module whose `build(config) -> Objective` (see
`nemotron_jax/train/objective.py`) is registered here, plus one experiment config.
"""

from __future__ import annotations

from nemotron_jax.errors import ConfigError
from nemotron_jax.train.objective import Objective
from nemotron_jax.train.objectives import dpo, ppo, reinforce, reward, sft

OBJECTIVES = {
    "regression": reward.build,
    "regular_bt": reward.build,
    "margin_bt": reward.build,
    "scaled_bt": reward.build,
    "sft": sft.build,
    "reinforce": reinforce.build,
    "dpo": dpo.build,
    "ppo": ppo.build,
}


def build(config) -> Objective:
    """The objective named by `config.objective`, its model and its loss with options bound."""
    if config.objective not in OBJECTIVES:
        raise ConfigError(
            f"config.objective {config.objective!r} is unknown; choose from {list(OBJECTIVES)}"
        )
    return OBJECTIVES[config.objective](config)
