"""2-D matrix products on the CPU through oneDNN (`matmul_impl="onednn"` in `LlamaConfig`).

XLA:CPU sends dots to its own back-ends (YNNPACK, Eigen). On recent Xeons oneDNN's matmul
primitive (the library PyTorch uses) is faster in bfloat16: on the 2-core development machine
(AMX), [2048, 512] x [512, 1536] runs at 1.9-2.2 TFLOP/s against 1.3-1.7 for XLA, and a
bfloat16 reward-model training step takes about 25% less time. In float32 the two are level
(about 320 GFLOP/s). Figures: docs/benchmarks.md.

`matmul(a, b, out_dtype=...)` is an XLA FFI custom call into a small C++ handler
(`matmul.cc`). The handler is compiled on first use with the system C++ compiler against
jaxlib's FFI headers and oneDNN from the `onednn` extra (`pip install 'nemotron_jax[onednn]'`),
then cached (`nemotron_jax.kernels.ffi_build`). `$NEMOTRON_ONEDNN_ROOT`
points at another oneDNN install (a prefix with `include/` and `lib/`).

Single-device CPU only: the custom call has no partitioning rule, so the training loop refuses
it on a mesh of more than one device (`nemotron_jax.train.loop.validate`).

oneDNN's OpenMP runtime (libgomp.so.1) is the one torch loads too: in a process that runs both,
torch's eager code slows down once oneDNN has run (docs/architecture.md); time torch elsewhere.
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

from nemotron_jax.kernels.ffi_build import HandlerUnavailable, build_handler

TARGET = "nemotron_onednn_matmul"
SILU_MUL_TARGET = "nemotron_onednn_matmul_silu_mul"
_SOURCE = pathlib.Path(__file__).with_name("matmul.cc")
_INSTALL_HINT = "install it with: pip install 'nemotron_jax[onednn]' (Linux x86_64)"


class OnednnUnavailable(HandlerUnavailable):
    """oneDNN, a C++ compiler or the CPU backend is missing; the message says which."""


def _onednn_root() -> pathlib.Path:
    candidates = [os.environ.get("NEMOTRON_ONEDNN_ROOT"), sys.prefix]
    for root in filter(None, candidates):
        root = pathlib.Path(root)
        if (root / "include/oneapi/dnnl/dnnl.hpp").exists() and any(root.glob("lib/libdnnl.so*")):
            return root
    raise OnednnUnavailable(
        f"matmul_impl='onednn' needs oneDNN's headers and library under {sys.prefix} "
        f"(or $NEMOTRON_ONEDNN_ROOT); {_INSTALL_HINT}"
    )


def _build(root: pathlib.Path) -> pathlib.Path:
    """Compile matmul.cc once per (source, jaxlib, oneDNN, CPU) and return the shared library."""
    libs = sorted(root.glob("lib/libdnnl.so*"))
    try:
        return build_handler(
            _SOURCE,
            what="matmul_impl='onednn'",
            flags=["-O2", "-isystem", str(root / "include")],
            link=["-L", str(root / "lib"), "-ldnnl", f"-Wl,-rpath,{root / 'lib'}"],
            stamp=str(libs[-1].resolve()).encode(),
        )
    except HandlerUnavailable as e:
        raise OnednnUnavailable(str(e)) from None


@functools.cache
def _register() -> None:
    if jax.default_backend() != "cpu":
        raise OnednnUnavailable(
            f"matmul_impl='onednn' runs on the CPU only; the default backend is "
            f"{jax.default_backend()!r} (use matmul_impl='xla')"
        )
    lib = ctypes.cdll.LoadLibrary(str(_build(_onednn_root())))
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.NemotronOnednnMatmul), "cpu")
    jax.ffi.register_ffi_target(
        SILU_MUL_TARGET, jax.ffi.pycapsule(lib.NemotronOnednnMatmulSiluMul), "cpu"
    )


def available() -> bool:
    """True when the handler builds and registers here (CPU backend, oneDNN, a compiler)."""
    try:
        _register()
    except OnednnUnavailable:
        return False
    return True


def matmul(
    a: jax.Array,
    b: jax.Array,
    *,
    out_dtype=jnp.float32,
    transpose_a: bool = False,
    transpose_b: bool = False,
    silu_times: jax.Array | None = None,
) -> jax.Array:
    """op(a) [M, K] @ op(b) [K, N] -> [M, N] in `out_dtype`, accumulated in float32; or, for 3-D
    operands, the same for every index of their shared leading batch axis -> [Z, M, N].

    a and b: both float32 or both bfloat16; op transposes the last two axes when `transpose_a` /
    `transpose_b` (no copy is made). Not differentiable by itself: `models.llama._matmul` and
    `attention` below give it custom gradients built from the same call.

    With `silu_times` (float32 or bfloat16, the result's shape) it returns
    silu(op(a) @ op(b)) * silu_times instead: SwiGLU's hidden activation, silu and the product
    applied by oneDNN to the float32 accumulators (post-ops), rounded once, the pre-activation
    never written to memory.
    """
    _register()
    if a.ndim != b.ndim or a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[0] != b.shape[0]):
        raise ValueError(
            f"onednn.matmul takes two 2-D operands or two 3-D ones with the same batch size, "
            f"got {a.shape} and {b.shape}"
        )
    if a.dtype != b.dtype or a.dtype not in (jnp.float32, jnp.bfloat16):
        raise ValueError(f"onednn.matmul: operands must both be float32 or bfloat16, got "
                         f"{a.dtype} and {b.dtype}")  # fmt: skip
    out_dtype = jnp.dtype(out_dtype)
    if out_dtype not in (jnp.float32, jnp.bfloat16):
        raise ValueError(f"onednn.matmul: out_dtype must be float32 or bfloat16, got {out_dtype}")
    batch = a.shape[:-2]
    m, k = a.shape[-2:][::-1] if transpose_a else a.shape[-2:]
    kb, n = b.shape[-2:][::-1] if transpose_b else b.shape[-2:]
    if k != kb:
        raise ValueError(f"onednn.matmul: contracting sizes differ ({a.shape} x {b.shape}, "
                         f"transpose_a={transpose_a}, transpose_b={transpose_b})")  # fmt: skip
    # oneDNN has no float32 x float32 -> bfloat16 kernel: round the float32 result instead.
    call_dtype = jnp.float32 if a.dtype == jnp.float32 else out_dtype
    result = jax.ShapeDtypeStruct((*batch, m, n), call_dtype)
    flags = dict(transpose_a=np.bool_(transpose_a), transpose_b=np.bool_(transpose_b))
    if silu_times is None:
        y = jax.ffi.ffi_call(TARGET, result, vmap_method="sequential")(a, b, **flags)
        return y.astype(out_dtype)
    if silu_times.shape != result.shape or silu_times.dtype not in (jnp.float32, jnp.bfloat16):
        raise ValueError(
            f"onednn.matmul: silu_times must be float32 or bfloat16 of the result's shape "
            f"{result.shape}, got {silu_times.dtype}{list(silu_times.shape)}"
        )
    y = jax.ffi.ffi_call(SILU_MUL_TARGET, result, vmap_method="sequential")(
        a, b, silu_times, **flags
    )
    return y.astype(out_dtype)


# --- attention with oneDNN products -----------------------------------------------------------


@jax.custom_vjp
def _scores(q: jax.Array, k: jax.Array) -> jax.Array:
    """q [Z, M, H] x k [Z, S, H] -> float32 [Z, M, S] (q k^T per batch index)."""
    return matmul(q, k, transpose_b=True)


def _scores_fwd(q, k):
    return matmul(q, k, transpose_b=True), (q, k)


def _scores_bwd(res, g):
    q, k = res
    g = g.astype(q.dtype)
    dq = matmul(g, k, out_dtype=q.dtype)  # [Z, M, S] x [Z, S, H]
    dk = matmul(g, q, out_dtype=k.dtype, transpose_a=True)  # [Z, S, M] x [Z, M, H]
    return dq, dk


_scores.defvjp(_scores_fwd, _scores_bwd)


@jax.custom_vjp
def _weighted_values(p: jax.Array, v: jax.Array) -> jax.Array:
    """p [Z, M, S] x v [Z, S, H] -> float32 [Z, M, H]."""
    return matmul(p, v)


def _weighted_values_fwd(p, v):
    return matmul(p, v), (p, v)


def _weighted_values_bwd(res, g):
    p, v = res
    g = g.astype(v.dtype)
    dp = matmul(g, v, out_dtype=p.dtype, transpose_b=True)  # [Z, M, H] x [Z, H, S]
    dv = matmul(p, g, out_dtype=v.dtype, transpose_a=True)  # [Z, S, M] x [Z, M, H]
    return dp, dv


_weighted_values.defvjp(_weighted_values_fwd, _weighted_values_bwd)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: jax.Array) -> jax.Array:
    """`nemotron_jax.kernels.attention.reference.attention_reference(q, k, v, mask=mask,
    causal=False)` with its two batched products (and their gradients) through oneDNN; the
    masking and float32 softmax are the reference's. q [B, T, N, H], k and v [B, S, K, H], mask
    bool [B, T, S]; returns [B, T, N, H] in q.dtype."""
    from nemotron_jax.kernels.attention.reference import MASK_VALUE, check_shapes

    g = check_shapes(q, k, v)
    b, t, n, h = q.shape
    s, kv_heads = k.shape[1], k.shape[2]
    # Head-major as in the reference: [B*K, G*T, H] queries against [B*K, S, H] keys.
    qh = q.reshape(b, t, kv_heads, g, h).transpose(0, 2, 3, 1, 4).reshape(b * kv_heads, g * t, h)
    kh = k.transpose(0, 2, 1, 3).reshape(b * kv_heads, s, h)
    vh = v.transpose(0, 2, 1, 3).reshape(b * kv_heads, s, h).astype(q.dtype)
    scores = _scores(qh, kh.astype(q.dtype)).reshape(b, kv_heads, g, t, s) * (1.0 / math.sqrt(h))
    allowed = mask.astype(bool)[:, None, None]
    probs = jax.nn.softmax(jnp.where(allowed, scores, MASK_VALUE), axis=-1)
    probs = jnp.where(allowed, probs, 0.0).astype(q.dtype).reshape(b * kv_heads, g * t, s)
    out = _weighted_values(probs, vh).reshape(b, kv_heads, g, t, h).transpose(0, 3, 1, 2, 4)
    return out.reshape(b, t, n, h).astype(q.dtype)
