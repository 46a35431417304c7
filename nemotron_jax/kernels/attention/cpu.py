"""Fused attention on the CPU: `attention(..., implementation="cpu")`, float32 or bfloat16.

The forward is one XLA FFI custom call into a small C++ handler (`cpu.cc`, compiled on first use
with `-O3 -march=native` and cached; `nemotron_jax.kernels.ffi_build`). It follows the masking
rules of `reference.attention_reference`, its oracle in the tests, and returns what it returns
up to float32 rounding. On the 2-core development machine it runs a causal GQA attention of
q [8, 128, 8, 32] and k, v [8, 128, 2, 32] in about 0.50 ms, against 1.35-1.47 ms for XLA's
block-causal attention and 0.77 ms for torch's scaled_dot_product_attention (docs/benchmarks.md).

The gradient is the reference's: the backward recomputes the attention with XLA and
differentiates that (`jax.vjp`), so training with this implementation is exact but pays for one
more attention forward per layer; it is meant for inference-heavy work (scoring, evaluation).

Single device: the call has no partitioning rule; under a mesh the model runs it per shard with
`attention_sharded`.
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
from nemotron_jax.kernels.ffi_build import HandlerUnavailable, build_handler

TARGET = "nemotron_cpu_attention"
_SOURCE = pathlib.Path(__file__).with_name("cpu.cc")
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


def available() -> bool:
    """True when the handler builds and registers here (CPU backend and a C++ compiler)."""
    try:
        _register()
    except HandlerUnavailable:
        return False
    return True


def _fused(q, k, v, mask, rope, causal, scale):
    _register()
    h = q.shape[-1]
    pad = -h % _LANES  # zero features change no score and give zero outputs, sliced off below
    if pad:  # (the rotary tables cover the first features only; the padding is not rotated)
        q, k, v = (jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, pad))) for x in (q, k, v))
    has_mask, has_rope = mask is not None, rope is not None
    mask = mask.astype(bool) if has_mask else jnp.zeros((0,), bool)
    cos, sin = (x.astype(jnp.float32) for x in rope) if has_rope else (jnp.zeros((0,)),) * 2
    call = jax.ffi.ffi_call(
        TARGET, jax.ShapeDtypeStruct(q.shape, q.dtype), vmap_method="sequential"
    )
    out = call(q, k, v, mask, cos, sin, causal=causal, has_mask=has_mask, has_rope=has_rope,
               scale=np.float32(scale))  # fmt: skip
    return out[..., :h] if pad else out


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _attention(q, k, v, mask, rope, causal, scale):
    return _fused(q, k, v, mask, rope, causal, scale)


def _attention_fwd(q, k, v, mask, rope, causal, scale):
    return _fused(q, k, v, mask, rope, causal, scale), (q, k, v, mask, rope)


def _attention_bwd(causal, scale, residuals, g):
    q, k, v, mask, rope = residuals

    def plain(q, k, v):
        if rope is not None:
            q, k = (reference.apply_rope(x, *rope) for x in (q, k))
        return reference.attention_reference(q, k, v, mask=mask, causal=causal, sm_scale=scale)

    _, vjp = jax.vjp(plain, q, k, v)
    # The mask is boolean and the rotary tables are functions of positions: no cotangents.
    no_rope = None if rope is None else jax.tree.map(jnp.zeros_like, rope)
    return (*vjp(g), None, no_rope)


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
