"""The "xla" implementation: the reference einsums, block-causal when that skips work.

Any backend and any mesh (GSPMD partitions it like any other einsum).
"""

from __future__ import annotations

import jax.numpy as jnp

from nemotron_jax.kernels.attention import reference

# Row blocks of a block-causal attention: with 4, 3/8 of the score and probability work (the
# blocks above the diagonal) is skipped; more blocks skip more but make more, smaller products.
CAUSAL_BLOCKS = 4


def xla_attention(q, k, v, *, segment_ids=None, mask=None, causal=True, sm_scale=None):
    """`reference.attention_reference`, split into row blocks for causal self-attention."""
    if causal and q.shape[1] == k.shape[1] and q.shape[1] >= 2:
        b, t = q.shape[:2]
        allowed = reference.build_mask(b, t, t, segment_ids=segment_ids, mask=mask, causal=True)
        allowed = jnp.broadcast_to(allowed, (b, t, t))
        return block_causal_attention(q, k, v, allowed, sm_scale=sm_scale)
    return reference.attention_reference(
        q, k, v, segment_ids=segment_ids, mask=mask, causal=causal, sm_scale=sm_scale
    )


def block_causal_attention(q, k, v, mask, *, blocks=CAUSAL_BLOCKS, sm_scale=None):
    """Self-attention (T == S) whose [B, T, S] `mask` is causal by index: the queries are split
    into `blocks` row blocks and block i attends only to keys [0, end of block i), so the fully
    masked scores above the diagonal are never computed. The mask still applies inside each
    block, so the result equals the plain call."""
    t = q.shape[1]
    blocks = min(blocks, t)
    bounds = [i * t // blocks for i in range(1, blocks)]
    # Split and concatenate rather than slice: their transposes are concatenate and split, so
    # the backward assembles dq, dk and dv without a zero-padded [B, T, ...] copy per block
    # (a slice's transpose is a pad).
    q_blocks = jnp.split(q, bounds, axis=1)
    k_blocks, v_blocks = jnp.split(k, bounds, axis=1), jnp.split(v, bounds, axis=1)
    mask_rows = jnp.split(mask, bounds, axis=1)
    outs = []
    for i, q_i in enumerate(q_blocks):
        hi = t if i == blocks - 1 else bounds[i]
        k_i = jnp.concatenate(k_blocks[: i + 1], axis=1)
        v_i = jnp.concatenate(v_blocks[: i + 1], axis=1)
        outs.append(
            reference.attention_reference(
                q_i, k_i, v_i, mask=mask_rows[i][:, :, :hi], causal=False, sm_scale=sm_scale
            )
        )
    return jnp.concatenate(outs, axis=1)
