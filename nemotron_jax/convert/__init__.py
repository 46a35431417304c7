"""Checkpoint conversion between nemotron_jax and Hugging Face formats."""

from nemotron_jax.convert.hf_llama import (
    KINDS,
    HFCheckpoint,
    load_hf,
    make_reader,
    open_hf,
    save_hf,
    tree_reader,
)

__all__ = ["KINDS", "HFCheckpoint", "load_hf", "make_reader", "open_hf", "save_hf", "tree_reader"]
