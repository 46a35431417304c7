"""Fused attention on the CPU: `attention(..., implementation="cpu")`, float32 or bfloat16.

Forward and backward are each one XLA FFI custom call into a small C++ library (`attention.cc`,
compiled with `-O3 -march=native` and cached; `nemotron_jax.kernels.cpu.build`). The attention
API builds it before the first trace (`kernels.attention.prepare`), never while tracing.
They follow the masking rules of `reference.attention_reference`, their oracle in the tests, and
return what it returns up to float32 rounding. RoPE can be applied inside (`rope=(cos, sin)`):
q and k are rotated as they are loaded.

The forward also returns each row's log-sum-exp, which the backward uses to recompute the
probabilities key by key (flash-attention style): no [T, S] matrix is stored for the backward
and none is written during it. Backward tasks are (batch row, kv head) pairs, each owning its
keys' dk and dv.

Single device: the calls have no partitioning rule; under a mesh the attention API runs them
per shard (`attention_sharded`).
"""

from __future__ import annotations

import ctypes
import functools
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from nemotron_jax.kernels.attention import reference
from nemotron_jax.kernels.cpu.build import HandlerUnavailable, build_handler

TARGET = "nemotron_cpu_attention"
BACKWARD_TARGET = "nemotron_cpu_attention_backward"
_SOURCE = pathlib.Path(__file__).with_name("attention.cc")
_LANES = 16  # the handler's vector width in floats: the head dim is padded to a multiple of it


@functools.cache
def _register() -> None:
    if jax.default_backend() != "cpu":
        raise HandlerUnavailable(
            f"attention implementation 'cpu' runs on the CPU backend only; the default backend "
            f"is {jax.default_backend()!r} (use 'xla', 'cudnn' or 'pallas')"
        )
    path = build_handler(_SOURCE, what="attention implementation 'cpu'",
                         flags=["-O3", "-march=native"])  # fmt: skip
    lib = ctypes.cdll.LoadLibrary(str(path))
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.NemotronCpuAttention), "cpu")
    jax.ffi.register_ffi_target(
        BACKWARD_TARGET, jax.ffi.pycapsule(lib.NemotronCpuAttentionBackward), "cpu"
    )


@functools.cache  # `auto` asks at every trace; a failed build is not retried each time
def available() -> bool:
    """True when the handler builds and registers here (CPU backend and a C++ compiler)."""
    try:
        _register()
    except HandlerUnavailable:
        return False
    return True


def _operands(q, k, v, mask, rope):
    """The handlers' operands: q, k, v with the head dim padded to a multiple of 16 (zero
    features change no score and give zero outputs and gradients, sliced off by the callers;
    the rotary tables cover the first features only), the mask (empty when None), cos and sin
    (empty when None), and the handlers' flags."""
    h = q.shape[-1]
    pad = -h % _LANES
    if pad:
        q, k, v = (jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, pad))) for x in (q, k, v))
    has_mask, has_rope = mask is not None, rope is not None
    mask = mask.astype(bool) if has_mask else jnp.zeros((0,), bool)
    cos, sin = (x.astype(jnp.float32) for x in rope) if has_rope else (jnp.zeros((0,)),) * 2
    return (q, k, v, mask, cos, sin), dict(has_mask=has_mask, has_rope=has_rope)


def _forward(q, k, v, mask, rope, causal, scale):
    """(out [B, T, N, H] in q.dtype, lse [B, T, N] float32: each row's log-sum-exp)."""
    _register()
    operands, flags = _operands(q, k, v, mask, rope)
    b, t, n, h = q.shape
    shapes = (jax.ShapeDtypeStruct(operands[0].shape, q.dtype),
              jax.ShapeDtypeStruct((b, t, n), jnp.float32))  # fmt: skip
    call = jax.ffi.ffi_call(TARGET, shapes, vmap_method="sequential")
    out, lse = call(*operands, causal=causal, scale=np.float32(scale), **flags)
    return out[..., :h], lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _attention(q, k, v, mask, rope, causal, scale):
    return _forward(q, k, v, mask, rope, causal, scale)[0]


def _attention_fwd(q, k, v, mask, rope, causal, scale):
    out, lse = _forward(q, k, v, mask, rope, causal, scale)
    return out, (q, k, v, out, lse, mask, rope)


def _attention_bwd(causal, scale, residuals, g):
    q, k, v, out, lse, mask, rope = residuals
    h = q.shape[-1]
    operands, flags = _operands(q, k, v, mask, rope)
    pad = operands[0].shape[-1] - h
    out, g = (jnp.pad(x.astype(q.dtype), ((0, 0), (0, 0), (0, 0), (0, pad))) for x in (out, g))
    q_, k_, v_, mask_, cos, sin = operands
    shapes = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q_, k_, v_))
    call = jax.ffi.ffi_call(BACKWARD_TARGET, shapes, vmap_method="sequential")
    dq, dk, dv = call(q_, k_, v_, out, g, lse, mask_, cos, sin, causal=causal,
                      scale=np.float32(scale), **flags)  # fmt: skip
    # The mask is boolean and the rotary tables are functions of positions: no cotangents.
    no_rope = None if rope is None else jax.tree.map(jnp.zeros_like, rope)
    return dq[..., :h], dk[..., :h], dv[..., :h], None, no_rope


_attention.defvjp(_attention_fwd, _attention_bwd)


def cpu_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    mask: jax.Array | None = None,
    causal: bool = True,
    sm_scale: float | None = None,
    rope: tuple[jax.Array, jax.Array] | None = None,
) -> jax.Array:
    """`reference.attention_reference` with the same arguments, fused into one CPU call.

    With `rope` (cos, sin: float32 [B, T, R], self-attention) q and k are rotated first, as
    `reference.apply_rope` does, but as the kernel loads them: in float32, never rounded to
    bfloat16 and never written back to memory.

    Differentiable: the backward is its own fused call (gradients of q, k and v in their dtype,
    float32 arithmetic).

    q [B, T, N, H], k and v [B, S, K, H], all float32 or all bfloat16 (ValueError otherwise).
    Returns [B, T, N, H] in q.dtype; rows with no visible key are 0. Scores, softmax and the
    weighted sum are float32 in both cases; in bfloat16 the probabilities are not rounded to
    bfloat16 before the weighted sum as the reference's are, so the result is as close or
    closer to exact. With `causal=True` the keys after each query are skipped, not just masked.
    """
    reference.check_shapes(q, k, v)
    dtypes = {q.dtype, k.dtype, v.dtype}
    if len(dtypes) != 1 or q.dtype not in (jnp.float32, jnp.bfloat16):
        raise ValueError(
            f"attention implementation 'cpu' takes q, k and v all float32 or all bfloat16, got "
            f"{sorted(str(d) for d in dtypes)}; use implementation 'xla' for other dtypes"
        )
    if rope is not None:
        reference.check_rope(q, k, rope)
        rope = tuple(rope)
    b, t, _, h = q.shape
    scale = 1.0 / math.sqrt(h) if sm_scale is None else float(sm_scale)
    if segment_ids is not None or mask is not None:
        # The [B, T, S] "may attend" mask without causality, which the handler adds by index.
        mask = reference.build_mask(
            b, t, k.shape[1], segment_ids=segment_ids, mask=mask, causal=False
        )
    return _attention(q, k, v, mask, rope, causal, scale)
