"""The oracle: full float32 logits, then log-softmax, logsumexp and entropy.

Materialises [N, V] float32 logits, so it is for tests and benchmarks only; every other
implementation in this package must match it in values and gradients.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nemotron_jax.losses.lm import token_logprobs_reference


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
