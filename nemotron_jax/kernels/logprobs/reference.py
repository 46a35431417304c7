"""The oracle: full float32 logits, then log-softmax, logsumexp and entropy.

`logprob_stats` materialises [N, V] float32 logits, so it is for tests and benchmarks only; every
other implementation in this package must match it in values and gradients.
`token_logprobs_reference` is the same log-softmax on logits a caller already has (`sft`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_logprobs_reference(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """log p(target) [...] in float32 from logits [..., V] and int targets [...].

    The naive, obviously correct oracle on logits (a full float32 log-softmax); every kernel
    that avoids materialising the logits in float32 must match it. Targets are already aligned
    with the logits (no shift here).
    """
    logits = jnp.asarray(logits).astype(jnp.float32)
    targets = jnp.asarray(targets).astype(jnp.int32)
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {logits.shape} do not match targets {targets.shape}")
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def logprob_stats(
    hidden: jax.Array, lm_head: jax.Array, labels: jax.Array, *, with_entropy: bool = False
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """log p(label), logsumexp and (optionally) entropy of softmax(hidden @ lm_head).

    Args:
        hidden: [N, D] float (any float dtype; the matmul accumulates in float32).
        lm_head: [D, V] float.
        labels: [N] int in [0, V).
        with_entropy: also return the entropy of each row's distribution.

    Returns:
        logp [N] float32, lse [N] float32, entropy [N] float32 or None. Fully differentiable
        (plain autodiff) in hidden and lm_head.
    """
    logits = jnp.dot(hidden, lm_head, preferred_element_type=jnp.float32)  # [N, V]
    logp = token_logprobs_reference(logits, labels)
    lse = jax.nn.logsumexp(logits, axis=-1)
    ent = None
    if with_entropy:
        p = jax.nn.softmax(logits, axis=-1)
        ent = lse - jnp.sum(p * logits, axis=-1)
    return logp, lse, ent
