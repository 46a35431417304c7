"""Per-token log-probs log p(label | hidden) through an LM head without [N, V] logits.

`token_logprobs(hidden, lm_head, labels, implementation=...)` computes
log_softmax(hidden @ lm_head)[label] in float32, optionally with the logsumexp and the entropy of
each token's distribution. Implementations:

- "reference": full float32 logits (the test oracle; O(N * V) memory).
- "chunked": pure JAX `lax.scan` over vocabulary chunks with a recomputing `custom_vjp`
  backward; the CPU default.
- "pallas" / "pallas_interpret": fused Pallas kernels (Triton on GPU; the interpreter on CPU).

All are differentiable in hidden and lm_head, entropy included. `token_logprobs_sharded` runs any
of them under a (data, fsdp, tensor) mesh with the vocabulary split over "tensor".
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from nemotron_jax.kernels.logprobs import chunked, pallas_gpu, reference
from nemotron_jax.kernels.logprobs.pallas_gpu import BlockSizes

IMPLEMENTATIONS = ("reference", "chunked", "pallas", "pallas_interpret")

__all__ = ["IMPLEMENTATIONS", "BlockSizes", "token_logprobs", "token_logprobs_sharded"]


def _stats(hidden, lm_head, labels, implementation, block_sizes, with_entropy):
    if implementation == "reference":
        if block_sizes is not None:
            raise ValueError("implementation='reference' takes no block_sizes")
        return reference.logprob_stats(hidden, lm_head, labels, with_entropy=with_entropy)
    if implementation == "chunked":
        if block_sizes is None:
            chunk = chunked.DEFAULT_CHUNK
        elif isinstance(block_sizes, BlockSizes):
            chunk = block_sizes.block_v
        elif isinstance(block_sizes, int) and not isinstance(block_sizes, bool):
            chunk = block_sizes
        else:
            raise ValueError(
                f"chunked block_sizes must be an int or BlockSizes, got {block_sizes!r}"
            )
        return chunked.logprob_stats(
            hidden, lm_head, labels, chunk=chunk, with_entropy=with_entropy
        )
    if implementation in ("pallas", "pallas_interpret"):
        if block_sizes is not None and not isinstance(block_sizes, BlockSizes):
            raise ValueError(f"pallas block_sizes must be a BlockSizes, got {block_sizes!r}")
        return pallas_gpu.logprob_stats(
            hidden,
            lm_head,
            labels,
            block_sizes=block_sizes,
            with_entropy=with_entropy,
            interpret=implementation == "pallas_interpret",
        )
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")


def _check(hidden, lm_head, labels):
    if hidden.ndim < 1 or lm_head.ndim != 2 or hidden.shape[-1] != lm_head.shape[0]:
        raise ValueError(
            f"need hidden [..., D] and lm_head [D, V]; got {hidden.shape}, {lm_head.shape}"
        )
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(
            f"labels {labels.shape} must match hidden's leading dims {hidden.shape[:-1]}"
        )
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"labels must be integers, got {labels.dtype}")


def token_logprobs(
    hidden: jax.Array,
    lm_head: jax.Array,
    labels: jax.Array,
    *,
    implementation: str = "chunked",
    return_lse: bool = False,
    return_entropy: bool = False,
    block_sizes: BlockSizes | int | None = None,
) -> jax.Array | tuple[jax.Array, ...]:
    """log p(label) = log_softmax(hidden @ lm_head)[label], float32, without [N, V] logits.

    Args:
        hidden: [..., D] float (bf16 or f32); matmuls accumulate in float32.
        lm_head: [D, V] float.
        labels: [...] int in [0, V) (not checked inside jit; out-of-range labels give garbage).
        implementation: "reference" | "chunked" | "pallas" | "pallas_interpret".
        return_lse: also return logsumexp of the logits [...] float32.
        return_entropy: also return the entropy of softmax(logits) [...] float32.
        block_sizes: "chunked": an int (vocabulary chunk) or a BlockSizes (its block_v);
            "pallas*": a BlockSizes; None: the implementation's default.

    Returns:
        logp [...] float32, or the tuple (logp, lse?, entropy?) when either flag is set. All
        outputs are differentiable in hidden and lm_head.
    """
    hidden, lm_head, labels = jnp.asarray(hidden), jnp.asarray(lm_head), jnp.asarray(labels)
    _check(hidden, lm_head, labels)
    lead = hidden.shape[:-1]
    h2 = hidden.reshape(-1, hidden.shape[-1])
    logp, lse, ent = _stats(
        h2, lm_head, labels.reshape(-1), implementation, block_sizes, return_entropy
    )
    outs = [logp.reshape(lead)]
    if return_lse:
        outs.append(lse.reshape(lead))
    if return_entropy:
        outs.append(ent.reshape(lead))
    return outs[0] if len(outs) == 1 else tuple(outs)


def token_logprobs_sharded(
    hidden: jax.Array,
    lm_head: jax.Array,
    labels: jax.Array,
    *,
    mesh: Mesh,
    batch_axes: Sequence[str] = ("data", "fsdp"),
    vocab_axis: str | None = "tensor",
    implementation: str = "chunked",
    return_lse: bool = False,
    return_entropy: bool = False,
    block_sizes: BlockSizes | int | None = None,
) -> jax.Array | tuple[jax.Array, ...]:
    """`token_logprobs` under `jax.shard_map`: tokens split over `batch_axes`, V over `vocab_axis`.

    Each device runs the chosen implementation on its tokens and its vocabulary shard, giving a
    per-shard logsumexp lse_s, label logit t_s (0 unless the label is in the shard) and mean logit
    E_s. They combine exactly: lse = M + log(psum(exp(lse_s - M))) with M = pmax(lse_s) (a
    constant shift, so it carries no gradient), t = psum(t_s), E = psum(exp(lse_s - lse) * E_s).
    Gradients flow through the collectives. `check_vma=False` because `pallas_call` outputs carry
    no varying-manual-axes annotation.

    Args:
        hidden: [N, D], N divisible by the product of the batch axes' sizes.
        lm_head: [D, V], V divisible by the vocab axis size (D is gathered if it is sharded).
        labels: [N] int.
        mesh: a mesh with the named axes.
        batch_axes: mesh axes splitting the tokens.
        vocab_axis: mesh axis splitting the vocabulary, or None to replicate lm_head.
        implementation, return_lse, return_entropy, block_sizes: as in `token_logprobs`.

    Returns:
        As `token_logprobs`, each [N] sharded over `batch_axes`.
    """
    if hidden.ndim != 2 or labels.ndim != 1:
        raise ValueError(f"need hidden [N, D] and labels [N]; got {hidden.shape}, {labels.shape}")
    _check(hidden, lm_head, labels)
    batch = tuple(batch_axes)
    v = lm_head.shape[1]
    n_vocab_shards = mesh.shape[vocab_axis] if vocab_axis else 1
    if v % n_vocab_shards:
        raise ValueError(f"V={v} is not divisible by the {n_vocab_shards} {vocab_axis!r} shards")

    def local(h, w, y):
        if vocab_axis is None:
            logp, lse, ent = _stats(h, w, y, implementation, block_sizes, return_entropy)
            return logp, lse, ent
        v_local = w.shape[1]
        offset = lax.axis_index(vocab_axis) * v_local
        y_local = y - offset
        here = (y_local >= 0) & (y_local < v_local)
        logp_s, lse_s, ent_s = _stats(
            h, w, jnp.clip(y_local, 0, v_local - 1), implementation, block_sizes, return_entropy
        )
        t = lax.psum(jnp.where(here, logp_s + lse_s, 0.0), vocab_axis)
        big = lax.pmax(lax.stop_gradient(lse_s), vocab_axis)
        lse = big + jnp.log(lax.psum(jnp.exp(lse_s - big), vocab_axis))
        ent = None
        if return_entropy:
            mean_z = lax.psum(jnp.exp(lse_s - lse) * (lse_s - ent_s), vocab_axis)
            ent = lse - mean_z
        return t - lse, lse, ent

    vocab_spec = P(None, vocab_axis) if vocab_axis else P()
    out_spec = P(batch)
    fn = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(P(batch, None), vocab_spec, P(batch)),
        out_specs=(out_spec, out_spec, out_spec if return_entropy else None),
        check_vma=False,
    )
    logp, lse, ent = fn(hidden, lm_head, labels.astype(jnp.int32))
    outs = [logp] + ([lse] if return_lse else []) + ([ent] if return_entropy else [])
    return outs[0] if len(outs) == 1 else tuple(outs)
