"""Model definitions."""

from nemotron_jax.models.llama import (
    PRESETS,
    Llama,
    LlamaConfig,
    abstract_params,
    count_params,
    init_params,
    positions_from_mask,
)

__all__ = [
    "PRESETS",
    "Llama",
    "LlamaConfig",
    "abstract_params",
    "count_params",
    "init_params",
    "positions_from_mask",
]
