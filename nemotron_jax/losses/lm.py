"""Language-model objectives: supervised fine-tuning on next-token cross entropy, and
`token_logprobs`, the per-sequence log-probs that it, REINFORCE and the rollouts share.

Same contract as every loss in `nemotron_jax.losses`: per-example loss and weight [B], and the
objective is `sum(loss) / sum(weight)` over the global batch (here: a mean over target tokens).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from nemotron_jax.kernels import logprobs as logprob_kernels
from nemotron_jax.kernels.logprobs.reference import token_logprobs_reference
from nemotron_jax.sharding import active_mesh

Metrics = dict[str, tuple[jax.Array, jax.Array]]


def token_logprobs(
    hidden: jax.Array, lm_head: jax.Array, labels: jax.Array, implementation: str = "chunked"
) -> jax.Array:
    """log p(labels) [B, L] float32 from hidden [B, L, D], lm_head [D, V] and int labels [B, L].

    `nemotron_jax.kernels.token_logprobs` for a batch of sequences. Under an active (data, fsdp,
    tensor) mesh every implementation runs per shard in `shard_map`: each device takes its own
    examples' tokens and its vocabulary shard, so neither the hidden states nor the logits are
    resharded (GSPMD would replicate a Pallas call, and gathers the chunked path's hidden states
    to all tokens x D / fsdp). A batch that does not divide the data-parallel devices is left to
    GSPMD.
    """
    b, length, d = hidden.shape
    mesh = active_mesh()
    if mesh is not None and b % (mesh.shape["data"] * mesh.shape["fsdp"]) == 0:
        # Tokens of one example stay on the example's devices: flatten batch-major.
        flat = logprob_kernels.token_logprobs_sharded(
            hidden.reshape(b * length, d),
            lm_head,
            labels.reshape(b * length),
            mesh=mesh,
            implementation=implementation,
        )
        return flat.reshape(b, length)
    return logprob_kernels.token_logprobs(hidden, lm_head, labels, implementation=implementation)


def sft_fused(
    outputs: tuple[jax.Array, jax.Array],
    batch: Mapping[str, Any],
    *,
    implementation: str = "chunked",
) -> tuple[jax.Array, jax.Array, Metrics]:
    """`sft` from final hidden states and the LM head, without ever forming [B, T, V] logits.

    Args:
        outputs: (hidden [B, T, D], lm_head [D, V]), as `Llama.hidden_and_head` returns them.
        batch: as for `sft`.
        implementation: `nemotron_jax.kernels.token_logprobs` implementation ("chunked" on
            CPU; "pallas" on GPUs).

    Returns:
        As `sft`, with the metric `token_nll` (mean -log p per target token) in place of
        `token_accuracy`, which would need every logit.
    """
    hidden, lm_head = outputs
    tokens = jnp.asarray(batch["tokens"])
    mask = jnp.asarray(batch["loss_mask"])[:, 1:].astype(bool)  # [B, T-1]
    logp = token_logprobs(hidden[:, :-1], lm_head, tokens[:, 1:].astype(jnp.int32), implementation)
    loss = jnp.sum(jnp.where(mask, -logp, 0.0), axis=-1)
    weight = jnp.sum(mask, axis=-1).astype(jnp.float32)
    return loss, weight, {"token_nll": (loss / jnp.maximum(weight, 1.0), weight)}


def sft(logits: jax.Array, batch: Mapping[str, Any]) -> tuple[jax.Array, jax.Array, Metrics]:
    """Next-token cross entropy on the tokens whose `loss_mask` is 1.

    Logits at position t predict token t + 1, so token t is a target iff `loss_mask[t] == 1` and
    t >= 1 (`loss_mask[:, 0]` is ignored: nothing predicts the first token), and the logits at
    the last position are unused.

    Args:
        logits: [B, T, V] (cast to float32).
        batch: `tokens` int [B, T] and `loss_mask` [B, T] (1 on target tokens, e.g. responses).

    Returns:
        loss [B]: the sum of -log p over the example's target tokens; weight [B]: their number
        (so the global objective is the mean over target tokens); metrics: `token_accuracy`
        (argmax == target) over target tokens.
    """
    tokens = jnp.asarray(batch["tokens"])
    loss_mask = jnp.asarray(batch["loss_mask"])
    logits = jnp.asarray(logits)
    if logits.ndim != 3 or logits.shape[:2] != tokens.shape or loss_mask.shape != tokens.shape:
        raise ValueError(
            f"sft needs logits [B, T, V], tokens and loss_mask [B, T]; got {logits.shape}, "
            f"{tokens.shape}, {loss_mask.shape}"
        )
    targets = tokens[:, 1:]
    mask = loss_mask[:, 1:].astype(bool)  # [B, T-1]
    logits = logits[:, :-1]
    logp = token_logprobs_reference(logits, targets)
    loss = jnp.sum(jnp.where(mask, -logp, 0.0), axis=-1)
    weight = jnp.sum(mask, axis=-1).astype(jnp.float32)
    correct = jnp.sum(mask & (jnp.argmax(logits, axis=-1) == targets), axis=-1)
    metrics = {"token_accuracy": (correct / jnp.maximum(weight, 1.0), weight)}
    return loss, weight, metrics
