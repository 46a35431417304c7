"""Language-model objectives: supervised fine-tuning on next-token cross entropy.

Same contract as every loss in `nemotron_jax.losses`: per-example loss and weight [B], and the
objective is `sum(loss) / sum(weight)` over the global batch (here: a mean over target tokens).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

Metrics = dict[str, tuple[jax.Array, jax.Array]]


def token_logprobs_reference(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """log p(target) [B, T] in float32 from logits [B, T, V] and int targets [B, T].

    The naive, obviously correct oracle (a full float32 log-softmax); a fused kernel that avoids
    materialising [B, T, V] in float32 must match it. Targets are already aligned with the logits
    (no shift here).
    """
    logits = jnp.asarray(logits).astype(jnp.float32)
    targets = jnp.asarray(targets).astype(jnp.int32)
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {logits.shape} do not match targets {targets.shape}")
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def _logprobs(hidden, lm_head, labels, implementation):
    """log p(labels) [B, L] from hidden [B, L, D]. Pallas kernels run per shard in `shard_map`
    under a (data, fsdp, tensor) mesh (GSPMD would replicate them); the pure-JAX paths are left
    to GSPMD."""
    from nemotron_jax.kernels import token_logprobs, token_logprobs_sharded
    from nemotron_jax.sharding import active_mesh

    b, length, d = hidden.shape
    mesh = active_mesh() if implementation.startswith("pallas") else None
    if mesh is not None:
        # Tokens of one example stay on the example's devices: flatten batch-major.
        flat = token_logprobs_sharded(
            hidden.reshape(b * length, d),
            lm_head,
            labels.reshape(b * length),
            mesh=mesh,
            implementation=implementation,
        )
        return flat.reshape(b, length)
    return token_logprobs(hidden, lm_head, labels, implementation=implementation)


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
    logp = _logprobs(hidden[:, :-1], lm_head, tokens[:, 1:].astype(jnp.int32), implementation)
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
