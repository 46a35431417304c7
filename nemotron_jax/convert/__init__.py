"""Checkpoint conversion between nemotron_jax and Hugging Face formats."""

from nemotron_jax.convert.hf_config import config_from_hf, config_to_hf
from nemotron_jax.convert.hf_llama import (
    KINDS,
    REWARD_KINDS,
    HFCheckpoint,
    HFKind,
    load_hf,
    make_reader,
    open_hf,
    read_reward_head_info,
    reward_direction,
    save_hf,
    tree_reader,
)

__all__ = [
    "KINDS",
    "REWARD_KINDS",
    "HFCheckpoint",
    "HFKind",
    "load_hf",
    "make_reader",
    "open_hf",
    "read_reward_head_info",
    "reward_direction",
    "config_from_hf",
    "config_to_hf",
    "save_hf",
    "tree_reader",
]
