"""The attention API: `attention(q, k, v, ...)` is the one call a model makes, and
`resolve_implementation` the one place where `implementation="auto"` becomes a back end.

Implementations:
  * "xla" (any backend): `reference.attention_reference`, plain einsums; self-attention that is
    causal by index runs block-causal (`xla.block_causal_attention`), skipping the blocks above
    the diagonal.
  * "cudnn": `jax.nn.dot_product_attention(implementation="cudnn")`. Only on a GPU backend; on
    any other backend it raises ValueError rather than silently falling back, so a config that
    asks for cuDNN never measures something else. cuDNN itself needs fp16/bf16 inputs and a
    supported head_dim (JAX raises otherwise). Fully masked rows are zeroed after the call.
  * "pallas": the Triton flash-attention kernels in `pallas_gpu.py` (GPU only).
  * "pallas_interpret": the same kernels in the Pallas interpreter (CPU tests; slow).
  * "cpu": `kernels.cpu.attention`, fused C++ forward and backward kernels through XLA FFI (CPU
    backend only; built by `prepare`). Takes `mask` and `segment_ids` like "xla", and applies
    `rope` itself (the other implementations rotate q and k with `reference.apply_rope` first).
  * "auto": `resolve_implementation` picks one of the above.
The Pallas and cuDNN paths take padding as `segment_ids` and causality by index, not an arbitrary
`mask`: a call with an explicit mask (a KV cache) runs them as "xla".

Under a (data, fsdp, tensor) mesh the opaque kernels (all but "xla") run per shard
(`attention_sharded`), since GSPMD would otherwise replicate them.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from nemotron_jax import sharding
from nemotron_jax.kernels.attention import pallas_gpu, reference, xla

IMPLEMENTATIONS = ("xla", "cpu", "cudnn", "pallas", "pallas_interpret")
# What a config may name: a back end, or "auto" for `resolve_implementation` to choose.
CHOICES = ("auto", *IMPLEMENTATIONS)
# Implementations that take an arbitrary [B, T, S] mask (the others: segment ids only).
_TAKE_MASK = ("xla", "cpu")


@functools.cache
def _cpu_kernel_available() -> bool:
    """Builds the fused CPU kernel (once per process) and says whether it loaded."""
    if jax.default_backend() != "cpu":
        return False
    from nemotron_jax.kernels.cpu import attention as cpu_attention  # lazy: C++ build on use

    return cpu_attention.available()


def check_implementation(implementation: str, dtype) -> None:
    """ValueError unless `implementation` is a choice that can compute in `dtype`."""
    if implementation not in CHOICES:
        raise ValueError(f"implementation must be one of {CHOICES}, got {implementation!r}")
    if implementation == "cpu" and jnp.dtype(dtype) not in (jnp.float32, jnp.bfloat16):
        raise ValueError(
            f"implementation 'cpu' takes float32 or bfloat16, not {jnp.dtype(dtype).name}; "
            "use 'auto' or 'xla'"
        )


def prepare(implementation: str, dtype) -> None:
    """Builds, before the first trace, any back end that `implementation` may run for `dtype`
    (the C++ CPU kernel). Models call it when they are constructed, so nothing is compiled
    while a computation is traced; calling it again costs nothing."""
    check_implementation(implementation, dtype)
    if implementation == "cpu" or (
        implementation == "auto" and jnp.dtype(dtype) in (jnp.float32, jnp.bfloat16)
    ):
        _cpu_kernel_available()


def resolve_implementation(
    implementation: str, dtype, *, mesh: Mesh | None = None, explicit_mask: bool = False
) -> str:
    """The back end that runs: `implementation` itself, unless it is "auto" or the call carries
    an explicit mask that the back end cannot take.

    "auto": cuDNN on a GPU for 16-bit compute; the fused "cpu" kernel on the CPU for float32 and
    bfloat16 outside a multi-device mesh (where "xla" partitions any batch, while a per-shard
    kernel needs the batch to divide the mesh) when it was built (`prepare`); else "xla".
    A call with an explicit mask (a KV cache) runs on "xla" unless it asked for "cpu".
    """
    if implementation not in CHOICES:
        raise ValueError(f"implementation must be one of {CHOICES}, got {implementation!r}")
    dtype = jnp.dtype(dtype)
    if implementation == "auto":
        backend = jax.default_backend()
        if backend == "gpu" and dtype in (jnp.bfloat16, jnp.float16):
            implementation = "cudnn"
        elif (
            backend == "cpu"
            and dtype in (jnp.float32, jnp.bfloat16)
            and (mesh is None or mesh.size == 1)
            and not explicit_mask
            and _cpu_kernel_available()
        ):
            implementation = "cpu"
        else:
            implementation = "xla"
    if explicit_mask and implementation not in _TAKE_MASK:
        implementation = "xla"
    return implementation


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
    positions: jax.Array | None = None,
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
        positions: optional int [B, T], with `segment_ids`: causality by position instead of by
            index. Query t sees key s iff s is a real token (nonzero id) and positions[s] <=
            positions[t]; that is HF's mask for left-padded rows. `causal=True` then also
            declares that positions increase along each row's real tokens, so index causality
            holds on every real query and back ends may skip the keys after it; rows of padding
            queries are then unspecified. The Pallas and cuDNN kernels always take this form.
        mask: optional bool [B, T, S] ("may attend"); not with `segment_ids`. Pallas and cuDNN
            take none: with S != T (a KV cache) they run as "xla", with S == T they raise.
        causal: key j visible to query i only if j <= i.
        implementation: one of `CHOICES` ("auto": `resolve_implementation`).
        block_sizes: Pallas tiles (`BlockSizes`); ignored by the others.
        sm_scale: score scale; defaults to 1/sqrt(H).
        rope: optional rotary tables (cos, sin), float32 [B, T, R] each, for self-attention
            (S == T): q and k are rotated by position first (`reference.apply_rope`). The "cpu"
            kernel rotates them as it loads them, in float32, so the rotated q and k are never
            rounded to a 16-bit dtype or written to memory.

    Returns:
        [B, T, N, H] in q.dtype. Rows with no visible key are 0.
    """
    if implementation not in CHOICES:
        raise ValueError(f"implementation must be one of {CHOICES}, got {implementation!r}")
    if segment_ids is not None and mask is not None:
        raise ValueError("pass at most one of segment_ids and mask")
    if positions is not None and segment_ids is None:
        raise ValueError("positions need segment_ids (which tokens are real)")
    mesh = sharding.active_mesh()
    kv_cache = mask is not None and k.shape[1] != q.shape[1]
    impl = resolve_implementation(implementation, q.dtype, mesh=mesh, explicit_mask=kv_cache)
    if positions is not None:
        if impl in _TAKE_MASK:  # the [B, T, S] mask by position; `causal` allows key skipping
            mask = position_mask(positions, positions, segment_ids != 0)
            segment_ids = None
        else:  # segment ids and causality by index: equal to it on real queries
            causal = True
    if mesh is not None and impl != "xla":
        return attention_sharded(
            q, k, v, mesh=mesh, segment_ids=segment_ids, mask=mask, rope=rope, causal=causal,
            implementation=impl, block_sizes=block_sizes, sm_scale=sm_scale,
        )  # fmt: skip
    return _attention_here(
        q, k, v, segment_ids=segment_ids, mask=mask, causal=causal, implementation=impl,
        block_sizes=block_sizes, sm_scale=sm_scale, rope=rope,
    )  # fmt: skip


def position_mask(
    q_positions: jax.Array, kv_positions: jax.Array, kv_valid: jax.Array
) -> jax.Array:
    """Boolean [B, T, S]: query t may attend key s iff s is a real token not after t.

    Causality is by position, not by index, so the same mask serves a KV cache whose slots hold
    earlier positions (queries [B, T], cache keys [B, S]).
    """
    causal = kv_positions[:, None, :] <= q_positions[:, :, None]
    return causal & kv_valid[:, None, :].astype(bool)


def _attention_here(
    q,
    k,
    v,
    *,
    segment_ids=None,
    mask=None,
    causal=True,
    implementation="xla",
    block_sizes=None,
    sm_scale=None,
    rope=None,
) -> jax.Array:
    """`attention` on this device (or inside a shard), for a resolved implementation."""
    if rope is not None:
        reference.check_rope(q, k, rope)
        if implementation != "cpu":
            q, k = (reference.apply_rope(x, *rope) for x in (q, k))
            rope = None
    if implementation == "xla":
        return xla.xla_attention(
            q, k, v, segment_ids=segment_ids, mask=mask, causal=causal, sm_scale=sm_scale
        )
    if implementation == "cpu":
        from nemotron_jax.kernels.cpu import attention as cpu_attention  # built by `prepare`

        return cpu_attention.cpu_attention(
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
    implementation: str = "xla",
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
        implementation: one of `CHOICES`; "auto" is resolved for a single device.
        **kwargs: passed to `attention` (causal, block_sizes, sm_scale).

    Returns:
        [B, T, N, H] sharded as q's spec.
    """
    impl = resolve_implementation(implementation, q.dtype)
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
        return _attention_here(
            q, k, v, segment_ids=seg, mask=msk, rope=tables, implementation=impl, **kwargs
        )

    return jax.shard_map(
        shard_fn,
        mesh=mesh,
        in_specs=(qkv_spec, qkv_spec, qkv_spec, *extra_specs),
        out_specs=qkv_spec,
        check_vma=False,
    )(q, k, v, *extras)
