"""Plain-XLA attention: the `implementation="xla"` path and the oracle for the Pallas kernels.

Layout (the einsum letters of `nemotron_jax/models/llama.py`): q [B, T, N, H], k and v
[B, S, K, H], with N = K * G query heads sharing each of the K kv heads. GQA folds the G query
heads of a kv head into the einsum instead of repeating K/V in memory. Scores, the softmax and its
statistics are float32 whatever the input dtype.

Masking rules shared by every implementation (`build_mask`):
  * `causal=True`: query i sees key j only if j <= i (top-left aligned, as `jnp.tril`).
  * `segment_ids` [B, T] (self-attention, T == S): query i sees key j only if their ids are equal
    and nonzero; id 0 marks padding.
  * `mask` [B, T, S] boolean: True means "may attend"; ANDed with `causal`.
A query row with no visible key returns exactly 0 (not the uniform average a finite mask value
would give, and not NaN).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

# Finite, so that masked scores never produce inf - inf = NaN; masked probabilities are then
# zeroed explicitly, so the value itself never leaks into the result.
MASK_VALUE = -1e30


def build_mask(
    batch: int,
    q_len: int,
    kv_len: int,
    *,
    segment_ids: jax.Array | None = None,
    mask: jax.Array | None = None,
    causal: bool = True,
) -> jax.Array | None:
    """The boolean [B, T, S] "may attend" mask, or None when nothing is masked.

    Args:
        batch: B.
        q_len: T.
        kv_len: S.
        segment_ids: optional int [B, T] (requires T == S); 0 is padding.
        mask: optional bool [B, T, S]; mutually exclusive with `segment_ids`.
        causal: whether query i may only see keys j <= i.

    Returns:
        bool [B, T, S], or None if every query sees every key.
    """
    if segment_ids is not None and mask is not None:
        raise ValueError("pass at most one of segment_ids and mask")
    out = None
    if segment_ids is not None:
        if segment_ids.shape != (batch, q_len) or q_len != kv_len:
            raise ValueError(
                f"segment_ids must be [B, T] = {(batch, q_len)} with T == S ({kv_len}), "
                f"got {segment_ids.shape}"
            )
        seg = segment_ids
        out = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] != 0)
    elif mask is not None:
        if mask.shape != (batch, q_len, kv_len):
            raise ValueError(f"mask must be [B, T, S] = {(batch, q_len, kv_len)}, got {mask.shape}")
        out = mask.astype(bool)
    if causal:
        tril = jnp.tril(jnp.ones((q_len, kv_len), dtype=bool))[None]
        out = tril if out is None else out & tril
    return out


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotary position embedding in the rotate-half layout (Llama, HF): x [B, T, heads, H]
    rotated by the tables cos, sin [B, T, R] on its first R features (R = H for Llama); computed
    in float32, returned in x.dtype."""
    r = cos.shape[-1]
    xf = x.astype(jnp.float32)
    xr, rest = xf[..., :r], xf[..., r:]
    half = r // 2
    rotated = jnp.concatenate([-xr[..., half:], xr[..., :half]], axis=-1)
    out = xr * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    if rest.shape[-1]:
        out = jnp.concatenate([out, rest], axis=-1)
    return out.astype(x.dtype)


def check_rope(q: jax.Array, k: jax.Array, rope) -> None:
    """Validates rotary tables (cos, sin) for self-attention: each float32 [B, T, R], R even
    and at most H, and S == T."""
    if not (isinstance(rope, tuple | list) and len(rope) == 2):
        raise ValueError("rope must be a pair (cos, sin)")
    cos, sin = rope
    b, t, _, h = q.shape
    ok = cos.shape == sin.shape and cos.ndim == 3 and cos.shape[:2] == (b, t)
    if not ok or cos.shape[-1] % 2 or cos.shape[-1] > h or k.shape[1] != t:
        raise ValueError(
            f"rope tables must be two [B, T, R] = [{b}, {t}, R] arrays with R even and <= H = "
            f"{h}, for self-attention (S == T = {t}, got S = {k.shape[1]}); got cos "
            f"{cos.shape}, sin {sin.shape}"
        )


def check_shapes(q: jax.Array, k: jax.Array, v: jax.Array) -> int:
    """Validates q [B, T, N, H], k/v [B, S, K, H] with N % K == 0; returns G = N // K."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be rank 4, got {q.shape}, {k.shape}, {v.shape}")
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: {k.shape} vs {v.shape}")
    b, _, n, h = q.shape
    if k.shape[0] != b or k.shape[3] != h:
        raise ValueError(f"q {q.shape} and k {k.shape} disagree on B or H")
    if n % k.shape[2]:
        raise ValueError(f"query heads N={n} must be a multiple of kv heads K={k.shape[2]}")
    return n // k.shape[2]


def attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    mask: jax.Array | None = None,
    causal: bool = True,
    sm_scale: float | None = None,
) -> jax.Array:
    """Softmax attention with float32 statistics.

    Args:
        q: [B, T, N, H].
        k: [B, S, K, H].
        v: [B, S, K, H].
        segment_ids: optional int [B, T]; see the module docstring.
        mask: optional bool [B, T, S]; see the module docstring.
        causal: causal (top-left aligned) masking.
        sm_scale: score scale; defaults to 1/sqrt(H).

    Returns:
        [B, T, N, H] in q.dtype; rows with no visible key are 0.
    """
    g = check_shapes(q, k, v)
    b, t, n, h = q.shape
    s, kv_heads = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(h) if sm_scale is None else sm_scale
    allowed = build_mask(b, t, s, segment_ids=segment_ids, mask=mask, causal=causal)
    # Head-major: the G query heads of each kv head are folded into the query axis (M = G * T)
    # so both matmuls are [B, K, M, H] x [B, K, S, H]; XLA:CPU then needs no transpose of the
    # scores (measurably faster than grouping queries as [B, T, K, G, H]).
    qh = q.reshape(b, t, kv_heads, g, h).transpose(0, 2, 3, 1, 4).reshape(b, kv_heads, g * t, h)
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, S, H]
    scores = jnp.einsum("BKMH,BKSH->BKMS", qh, kh, preferred_element_type=jnp.float32)
    scores = scores.reshape(b, kv_heads, g, t, s) * scale
    if allowed is not None:
        scores = jnp.where(allowed[:, None, None], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1)
    if allowed is not None:
        # A fully masked row would otherwise be uniform over its (masked) keys.
        probs = jnp.where(allowed[:, None, None], probs, 0.0)
    probs = probs.astype(v.dtype).reshape(b, kv_heads, g * t, s)
    out = jnp.einsum("BKMS,BKSH->BKMH", probs, vh, preferred_element_type=jnp.float32)
    out = out.reshape(b, kv_heads, g, t, h).transpose(0, 3, 1, 2, 4)
    return out.reshape(b, t, n, h).astype(q.dtype)
