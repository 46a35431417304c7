"""Pure-JAX fused log-probs: a `lax.scan` over vocabulary chunks with a recomputing backward.

Forward: for each chunk of `chunk` columns of lm_head, logits [N, chunk] = hidden @ W[:, chunk]
(float32 accumulation) feed an online logsumexp (running max m, running sum denom, and for the
entropy a running sum s of exp(z - m) * z). The label logit is one gather of N columns of W and
a row-wise dot, so the scan body has no [N, chunk] compare-and-select for it. Only the [N]
statistics are saved for the backward.

Backward (`jax.custom_vjp`): the same scan recomputes each logits chunk and forms
dz = p * (g_lse - g_logp - g_ent * (z - E)) (E = mean logit under p), then accumulates
d hidden += dz @ W_c^T and writes d lm_head[:, chunk] = hidden^T @ dz; the one-hot part of
d log p / dz (g_logp at the label) is added outside the scan with the same column gather and one
scatter-add. Peak temporary memory is O(N * chunk + N * D + D * V) instead of O(N * V).

A vocabulary that is not a multiple of `chunk` costs no padded copy of W: the last chunk's start
is clamped to V - chunk and its already-counted columns are masked.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

F32 = jnp.float32
# Finite rather than -inf: exp(NEG - m) is 0 and 0 * NEG is 0, so no inf - inf or 0 * inf NaNs.
NEG = -1e30
# Tuned on the 2-core CPU at V = 128,256 (benchmarks/kernels.py): big enough that the per-chunk
# matmul amortises the scan overhead, small enough that [N, chunk] float32 stays far below N * V.
DEFAULT_CHUNK = 4096


def _chunk_plan(v: int, chunk: int) -> tuple[int, int, bool]:
    if chunk <= 0:
        raise ValueError(f"chunk must be positive, got {chunk}")
    c = min(chunk, v)
    nc = -(-v // c)
    return c, nc, v % c != 0


def _chunk(w: jax.Array, h: jax.Array, i: jax.Array, c: int, v: int, ragged: bool):
    """Logits [N, c] float32 of chunk i, its first column's index and its valid-column mask."""
    start = jnp.minimum(i * c, v - c) if ragged else i * c
    wc = lax.dynamic_slice_in_dim(w, start, c, axis=1)  # [D, c]; a slice, never a padded copy
    z = jnp.dot(h, wc, preferred_element_type=F32)
    valid = None
    if ragged:  # the clamped last chunk re-reads columns that an earlier chunk already counted
        valid = (start + jnp.arange(c)) >= i * c
        z = jnp.where(valid[None, :], z, NEG)
    return wc, z, start, valid


def _label_logit(h: jax.Array, w: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
    wy = jnp.take(w, y, axis=1).T  # [N, D]: one column of W per token, not an [N, V] gather
    t = jnp.sum(h.astype(F32) * wy.astype(F32), axis=-1)
    return t, wy


def _forward(h, w, y, chunk: int, with_entropy: bool):
    n = h.shape[0]
    v = w.shape[1]
    c, nc, ragged = _chunk_plan(v, chunk)

    def body(carry, i):
        m, denom, s = carry
        _, z, _, _ = _chunk(w, h, i, c, v, ragged)
        m_new = jnp.maximum(m, jnp.max(z, axis=-1))
        alpha = jnp.exp(m - m_new)  # m starts at -inf: alpha = 0 on the first chunk
        e = jnp.exp(z - m_new[:, None])
        denom = denom * alpha + jnp.sum(e, axis=-1)
        if with_entropy:
            s = s * alpha + jnp.sum(e * z, axis=-1)
        return (m_new, denom, s), None

    init = (jnp.full((n,), -jnp.inf, F32), jnp.zeros((n,), F32), jnp.zeros((n,), F32))
    (m, denom, s), _ = lax.scan(body, init, jnp.arange(nc))
    lse = m + jnp.log(denom)
    t, _ = _label_logit(h, w, y)
    mean_z = s / denom if with_entropy else None  # E_p[z]; entropy = lse - E_p[z]
    return t - lse, lse, mean_z


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def logprob_stats_vjp(h, w, y, chunk: int, with_entropy: bool):
    """(logp, lse, entropy-or-None), each [N] float32; differentiable in h and w."""
    logp, lse, mean_z = _forward(h, w, y, chunk, with_entropy)
    return logp, lse, (lse - mean_z if with_entropy else None)


def _vjp_fwd(h, w, y, chunk, with_entropy):
    logp, lse, mean_z = _forward(h, w, y, chunk, with_entropy)
    out = (logp, lse, (lse - mean_z if with_entropy else None))
    return out, (h, w, y, lse, mean_z)


def _vjp_bwd(chunk, with_entropy, res, cts):
    h, w, y, lse, mean_z = res
    g_logp, g_lse, g_ent = cts
    n, d = h.shape
    v = w.shape[1]
    c, nc, ragged = _chunk_plan(v, chunk)
    # d logp/dz = onehot - p, d lse/dz = p, d entropy/dz = -p (z - E_p[z]).
    a = (g_lse - g_logp).astype(F32)[:, None]
    ge = g_ent.astype(F32)[:, None] if with_entropy else None

    def body(carry, i):
        dh, dw = carry
        wc, z, start, valid = _chunk(w, h, i, c, v, ragged)
        p = jnp.exp(z - lse[:, None])  # masked columns: exp(NEG) = 0
        coef = p * (a - ge * (z - mean_z[:, None])) if with_entropy else p * a
        if ragged:
            coef = jnp.where(valid[None, :], coef, 0.0)
        dz = coef.astype(w.dtype)
        dh = dh + jnp.dot(dz, wc.T, preferred_element_type=F32)
        dwc = jnp.dot(h.T, dz, preferred_element_type=F32)  # [D, c]
        if ragged:  # add, so the re-read (zero) columns keep their earlier values
            dwc = dwc + lax.dynamic_slice_in_dim(dw, start, c, axis=1)
        dw = lax.dynamic_update_slice_in_dim(dw, dwc, start, axis=1)
        return (dh, dw), None

    init = (jnp.zeros((n, d), F32), jnp.zeros((d, v), F32))
    (dh, dw), _ = lax.scan(body, init, jnp.arange(nc))
    # The one-hot term: g_logp at each label, one column gather and one scatter-add.
    g = g_logp.astype(F32)[:, None]
    _, wy = _label_logit(h, w, y)
    dh = dh + g * wy.astype(F32)
    dw = dw.at[:, y].add((g * h.astype(F32)).T)
    return dh.astype(h.dtype), dw.astype(w.dtype), None


logprob_stats_vjp.defvjp(_vjp_fwd, _vjp_bwd)


def logprob_stats(
    hidden: jax.Array,
    lm_head: jax.Array,
    labels: jax.Array,
    *,
    chunk: int = DEFAULT_CHUNK,
    with_entropy: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """log p(label), logsumexp and optional entropy without materialising [N, V] logits.

    Args:
        hidden: [N, D] float.
        lm_head: [D, V] float.
        labels: [N] int in [0, V).
        chunk: vocabulary columns per scan step (clamped to V; V need not be a multiple).
        with_entropy: also return the entropy (differentiable too).

    Returns:
        logp [N], lse [N], entropy [N] or None, all float32.
    """
    return logprob_stats_vjp(hidden, lm_head, labels.astype(jnp.int32), chunk, with_entropy)
