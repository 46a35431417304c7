"""Tiny random transformers Llama models, built locally (no download), as test references."""

from __future__ import annotations

import numpy as np
import pytest


def make_hf_llama(
    *,
    num_heads: int = 8,
    num_kv_heads: int = 2,
    hidden: int = 64,
    layers: int = 2,
    vocab: int = 256,
    intermediate: int = 96,
    rope: str = "llama3",
    original_max: int = 32,
    tie: bool = False,
    seed: int = 0,
):
    """A random `LlamaForCausalLM` (float32, eager attention) with non-trivial norm scales."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    rope_scaling = None
    if rope == "llama3":
        rope_scaling = {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": original_max,
        }
    cfg = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=hidden // num_heads,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling=rope_scaling,
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    return model


def hf_logits(model, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = model(
            input_ids=torch.as_tensor(tokens, dtype=torch.long),
            attention_mask=torch.as_tensor(mask, dtype=torch.long),
        )
    return out.logits.float().numpy()


def padded_batch(vocab: int, lengths: list[int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded random tokens [B, max(lengths)] and their 0/1 mask."""
    rng = np.random.default_rng(seed)
    t = max(lengths)
    tokens = rng.integers(3, vocab, size=(len(lengths), t))
    mask = (np.arange(t)[None, :] < np.asarray(lengths)[:, None]).astype(np.int32)
    return np.where(mask, tokens, 0), mask
