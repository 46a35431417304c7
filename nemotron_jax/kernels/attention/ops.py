"""The public entry points: `attention` (dispatch on `implementation=`) and `attention_sharded`.

Implementations:
  * "xla" (default, any backend): `reference.attention_reference`, plain einsums.
  * "cudnn": `jax.nn.dot_product_attention(implementation="cudnn")`. Only on a GPU backend; on
    any other backend it raises ValueError rather than silently falling back, so a config that
    asks for cuDNN never measures something else. cuDNN itself needs fp16/bf16 inputs and a
    supported head_dim (JAX raises otherwise). Fully masked rows are zeroed after the call.
  * "pallas": the Triton flash-attention kernels in `pallas_gpu.py` (GPU only).
  * "pallas_interpret": the same kernels in the Pallas interpreter (CPU tests; slow).
  * "cpu": `cpu.cpu_attention`, fused C++ forward and backward kernels through XLA FFI (CPU
    backend only; compiled on first use). Takes `mask` and `segment_ids` like "xla", and applies
    `rope` itself (the other implementations rotate q and k with `reference.apply_rope` first).
The Pallas paths support `segment_ids` but not an arbitrary `mask` (ValueError).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from nemotron_jax.kernels.attention import pallas_gpu, reference

IMPLEMENTATIONS = ("xla", "cpu", "cudnn", "pallas", "pallas_interpret")


def _cudnn_attention(q, k, v, *, segment_ids, mask, causal, sm_scale):
    if jax.default_backend() != "gpu":
        raise ValueError(
            f"implementation='cudnn' needs a GPU backend, this one is {jax.default_backend()!r}; "
            "use implementation='xla' on CPU"
        )
    b, t, _, _ = q.shape
    allowed = reference.build_mask(
        b, t, k.shape[1], segment_ids=segment_ids, mask=mask, causal=False
    )
    out = jax.nn.dot_product_attention(
        q,
        k,
        v,
        mask=None if allowed is None else allowed[:, None],  # [B, 1, T, S], broadcast over N
        scale=sm_scale,
        is_causal=causal,
        implementation="cudnn",
    )
    if allowed is not None:
        if causal:
            allowed = allowed & jnp.tril(jnp.ones(allowed.shape[1:], bool))[None]
        # cuDNN gives a fully masked row some average of V; the contract is 0.
        out = jnp.where(jnp.any(allowed, axis=-1)[:, :, None, None], out, 0).astype(out.dtype)
    return out


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    mask: jax.Array | None = None,
    causal: bool = True,
    implementation: str = "xla",
    block_sizes: pallas_gpu.BlockSizes | None = None,
    sm_scale: float | None = None,
    rope: tuple[jax.Array, jax.Array] | None = None,
) -> jax.Array:
    """Multi-head (GQA) softmax attention with float32 statistics.

    Args:
        q: [B, T, N, H].
        k: [B, S, K, H], N % K == 0 (K/V are not repeated in memory).
        v: [B, S, K, H].
        segment_ids: optional int [B, T] (T == S); tokens attend only within equal nonzero ids,
            0 is padding.
        mask: optional bool [B, T, S] ("may attend"); not with `segment_ids`; not for Pallas.
        causal: key j visible to query i only if j <= i.
        implementation: one of `IMPLEMENTATIONS`.
        block_sizes: Pallas tiles (`BlockSizes`); ignored by "xla" and "cudnn".
        sm_scale: score scale; defaults to 1/sqrt(H).
        rope: optional rotary tables (cos, sin), float32 [B, T, R] each, for self-attention
            (S == T): q and k are rotated by position first (`reference.apply_rope`). The "cpu"
            kernel rotates them as it loads them, in float32, so the rotated q and k are never
            rounded to a 16-bit dtype or written to memory.

    Returns:
        [B, T, N, H] in q.dtype. Rows with no visible key are 0.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    if segment_ids is not None and mask is not None:
        raise ValueError("pass at most one of segment_ids and mask")
    if rope is not None:
        reference.check_rope(q, k, rope)
        if implementation != "cpu":
            q, k = (reference.apply_rope(x, *rope) for x in (q, k))
            rope = None
    if implementation == "xla":
        return reference.attention_reference(
            q, k, v, segment_ids=segment_ids, mask=mask, causal=causal, sm_scale=sm_scale
        )
    if implementation == "cpu":
        from nemotron_jax.kernels.attention import cpu  # lazy: builds the handler on first use

        return cpu.cpu_attention(
            q, k, v, segment_ids=segment_ids, mask=mask, causal=causal, sm_scale=sm_scale,
            rope=rope,
        )  # fmt: skip
    reference.check_shapes(q, k, v)
    if implementation == "cudnn":
        return _cudnn_attention(
            q, k, v, segment_ids=segment_ids, mask=mask, causal=causal, sm_scale=sm_scale
        )
    if mask is not None:
        raise ValueError(
            f"implementation={implementation!r} supports segment_ids, not an explicit mask; "
            "use implementation='xla' for arbitrary masks"
        )
    return pallas_gpu.pallas_attention(
        q,
        k,
        v,
        segment_ids=segment_ids,
        causal=causal,
        sm_scale=sm_scale,
        block_sizes=block_sizes,
        interpret=implementation == "pallas_interpret",
    )


def _axis_size(mesh: Mesh, axes: str | Sequence[str] | None) -> int:
    if axes is None:
        return 1
    names = (axes,) if isinstance(axes, str) else tuple(axes)
    size = 1
    for name in names:
        size *= mesh.shape[name]
    return size


def attention_sharded(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mesh: Mesh,
    segment_ids: jax.Array | None = None,
    mask: jax.Array | None = None,
    rope: tuple[jax.Array, jax.Array] | None = None,
    batch_axes: str | Sequence[str] | None = ("data", "fsdp"),
    head_axis: str | None = "tensor",
    **kwargs,
) -> jax.Array:
    """`attention` run per shard under `jax.shard_map`: batch over `batch_axes`, heads over
    `head_axis` (whole kv groups per shard, as the `q_heads`/`kv_heads` rules place them).

    Without this, GSPMD treats a `pallas_call` as opaque and replicates it. `check_vma=False`
    because `pallas_call` out_shapes carry no varying-manual-axes annotation.

    Args:
        q: [B, T, N, H]; B divisible by the batch axes' size, N and K by the head axis' size.
        k: [B, S, K, H].
        v: [B, S, K, H].
        mesh: the device mesh.
        segment_ids: optional int [B, T].
        mask: optional bool [B, T, S].
        rope: optional rotary tables (cos, sin), float32 [B, T, R] each.
        batch_axes: mesh axes splitting B (None: replicated).
        head_axis: mesh axis splitting N and K (None: replicated).
        **kwargs: passed to `attention` (causal, implementation, block_sizes, sm_scale).

    Returns:
        [B, T, N, H] sharded as q's spec.
    """
    batch = tuple(batch_axes) if isinstance(batch_axes, list) else batch_axes
    b_size, h_size = _axis_size(mesh, batch), _axis_size(mesh, head_axis)
    if q.shape[0] % b_size:
        raise ValueError(f"batch {q.shape[0]} is not divisible by mesh axes {batch} ({b_size})")
    if q.shape[2] % h_size or k.shape[2] % h_size:
        raise ValueError(
            f"heads N={q.shape[2]}, K={k.shape[2]} must be divisible by mesh axis "
            f"{head_axis!r} ({h_size})"
        )
    qkv_spec = P(batch, None, head_axis, None)
    extras, extra_specs = [], []
    if segment_ids is not None:
        extras.append(segment_ids)
        extra_specs.append(P(batch, None))
    if mask is not None:
        extras.append(mask)
        extra_specs.append(P(batch, None, None))
    if rope is not None:
        extras.extend(rope)
        extra_specs.extend([P(batch, None, None)] * 2)

    def shard_fn(q, k, v, *extra):
        extra = list(extra)
        seg = extra.pop(0) if segment_ids is not None else None
        msk = extra.pop(0) if mask is not None else None
        tables = (extra.pop(0), extra.pop(0)) if rope is not None else None
        return attention(q, k, v, segment_ids=seg, mask=msk, rope=tables, **kwargs)

    return jax.shard_map(
        shard_fn,
        mesh=mesh,
        in_specs=(qkv_spec, qkv_spec, qkv_spec, *extra_specs),
        out_specs=qkv_spec,
        check_vma=False,
    )(q, k, v, *extras)
