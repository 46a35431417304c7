"""Pure step functions: no jit here (the loop jits each once, with shardings).

Loss functions follow one contract (`nemotron_jax.losses`):

    loss_fn(outputs, batch) -> (loss [B], weight [B], metrics {name: (value [B], weight [B])})

and the objective of a batch is `sum(loss) / sum(weight)` over the whole global batch, reduced
by `losses.batch_sums` (which also drops padding rows, `example_weight` 0). Summing before
dividing makes the objective independent of how the batch is split into micro-batches or
devices; how that compares with NeMo's per-micro-batch means is in `nemotron_jax/losses`.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from nemotron_jax.losses import LossFn, batch_sums
from nemotron_jax.models import lora

# (params, batch) -> outputs; (params, batch, rng) -> outputs when the step draws dropout.
ApplyFn = Callable[..., jax.Array]


def _sums(apply_fn: ApplyFn, loss_fn: LossFn, params, batch, rng=None):
    """(Σ loss, {"loss": (Σ loss, Σ weight), metric: (weighted sum, weight sum)})."""
    outputs = apply_fn(params, batch) if rng is None else apply_fn(params, batch, rng)
    sums = batch_sums(*loss_fn(outputs, batch), batch.get("example_weight"))
    return sums["loss"][0], sums


# optax.tree.norm replaced optax.global_norm; older optax (accelerator images) lacks it.
_global_norm = getattr(getattr(optax, "tree", None), "norm", None) or optax.global_norm


def _micro_batches(batch: dict, n: int) -> dict:
    # [B, ...] -> [n, B/n, ...], taking every n-th example so each micro-batch stays spread over
    # all data-parallel devices instead of living on a 1/n slice of them.
    def split(x):
        return jnp.swapaxes(x.reshape(x.shape[0] // n, n, *x.shape[1:]), 0, 1)

    return jax.tree.map(split, batch)


def make_train_step(
    apply_fn: ApplyFn,
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    grad_accum: int = 1,
    *,
    adapters_only: bool = False,
    dropout_seed: int | None = None,
):
    """`step(state, batch) -> (state, metrics)` with state {"step", "params", "opt_state"} and
    metrics {name: (sum, weight)} (see `finish_metrics`); metrics["nonfinite"] is 1 when the
    loss or the gradient norm was not finite, and the update was then not applied.

    With `adapters_only` (LoRA) the gradient, the optimizer state and the update cover only the
    `lora.split` trainable leaves (adapters and reward heads): the base is a constant of the
    step, so no gradient or moment of its size exists. `dropout_seed` draws the adapters'
    dropout from fold_in(PRNGKey(seed), step) (and the micro-batch index), so a resumed run
    draws the same masks; `apply_fn` then takes the key as a third argument.
    """

    def objective(trainable, frozen, batch, rng):
        params = lora.combine(trainable, frozen) if adapters_only else trainable
        return _sums(apply_fn, loss_fn, params, batch, rng)

    grad_fn = jax.value_and_grad(objective, has_aux=True)

    def step(state, batch):
        trainable, frozen = lora.split(state["params"]) if adapters_only else (state["params"], {})
        rng = None
        if dropout_seed is not None:
            rng = jax.random.fold_in(jax.random.PRNGKey(dropout_seed), state["step"])
        if grad_accum == 1:
            (_, sums), grads = grad_fn(trainable, frozen, batch, rng)
        else:
            micro = _micro_batches(batch, grad_accum)
            index = jnp.arange(grad_accum)

            def body(carry, xs):
                mb, i = xs
                mb_rng = None if rng is None else jax.random.fold_in(rng, i)
                return jax.tree.map(jnp.add, carry, grad_fn(trainable, frozen, mb, mb_rng)), None

            first = jax.tree.map(lambda x: x[0], micro)
            shapes = jax.eval_shape(grad_fn, trainable, frozen, first, rng)
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
            ((_, sums), grads), _ = jax.lax.scan(body, zeros, (micro, index))
        # A batch whose every example has weight 0 (e.g. only dropped ties) updates nothing.
        weight_sum = sums["loss"][1]
        denom = jnp.where(weight_sum > 0, weight_sum, 1.0)
        grads = jax.tree.map(lambda g: g / denom.astype(g.dtype), grads)
        updates, opt_state = tx.update(grads, state["opt_state"], trainable)
        new_trainable = optax.apply_updates(trainable, updates)
        grad_norm = _global_norm(grads)
        # A non-finite loss or gradient norm applies no update, so the state stays finite;
        # the loop reads the flag with the metrics and stops or counts the skip
        # (config.nan_policy). One select per leaf, fused with the update.
        finite = jnp.isfinite(sums["loss"][0]) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
        kept = jax.tree.map(keep, new_trainable, trainable)
        new_state = {
            "step": state["step"] + 1,
            "params": lora.combine(kept, frozen) if adapters_only else kept,
            "opt_state": jax.tree.map(keep, opt_state, state["opt_state"]),
        }
        metrics = {
            **sums,
            "grad_norm": (grad_norm, jnp.ones(())),
            "nonfinite": (1.0 - finite.astype(jnp.float32), jnp.ones(())),
        }
        lost = lost_updates(trainable, updates, new_trainable)
        if lost is not None:
            metrics["lost_update_fraction"] = lost
        return new_state, metrics

    return step


def lost_updates(params, updates, new_params):
    """(updates lost, updates made): the nonzero updates of 16-bit parameters that rounding
    undid (the weight did not change), as a (sum, weight) metric; None when every parameter is
    float32 (master weights lose nothing). In bf16, an update below 2^-9 of its weight is lost:
    at lr 1e-6, most are."""
    flags = [
        (u != 0, new == old)
        for old, u, new in zip(
            jax.tree.leaves(params), jax.tree.leaves(updates), jax.tree.leaves(new_params),
            strict=True,
        )
        if jnp.dtype(old.dtype).itemsize < 4
    ]  # fmt: skip
    if not flags:
        return None
    made = sum(jnp.sum(nonzero, dtype=jnp.float32) for nonzero, _ in flags)
    lost = sum(jnp.sum(nonzero & same, dtype=jnp.float32) for nonzero, same in flags)
    return lost, made


def make_eval_step(apply_fn: ApplyFn, loss_fn: LossFn):
    """`eval_step(params, batch, total) -> total + the batch's sums`, over a whole split from
    `zero_sums`, then `finish_metrics`.

    The running total goes through the step, so each batch's computation depends on the one
    before: the batches run one after another rather than all at once, and the host dispatches
    one computation per batch instead of one addition per metric leaf as well."""

    def eval_step(params, batch, total):
        return jax.tree.map(jnp.add, total, _sums(apply_fn, loss_fn, params, batch)[1])

    return eval_step


def zero_sums(apply_fn: ApplyFn, loss_fn: LossFn, params, batch) -> dict:
    """Zeros shaped like one batch's {name: (sum, weight)} (numpy; traced, not run)."""
    shapes = jax.eval_shape(lambda p, b: _sums(apply_fn, loss_fn, p, b)[1], params, batch)
    return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)


def finish_metrics(total: dict) -> dict[str, float]:
    """Host-side means of {name: (sum, weight)}; metrics with no weight (e.g. the MAE of a head
    slot that no label supervises) are left out rather than reported as 0."""
    return {name: float(s) / float(c) for name, (s, c) in total.items() if float(c) > 0}
