"""LoRA adapters on a frozen base: which leaves train, merging, and the base with adapters off.

The adapters themselves are part of the Llama math (`models.llama.projection`): a config with
`lora_rank > 0` gives each targeted projection `<proj>_lora_a` [L, *in, R] and
`<proj>_lora_b` [L, R, *out] beside its weight. Everything here works on plain params trees
of any model built from Llama layers (an LM, a reward model, PPO's {"policy", "critic"}).

    trainable, frozen = split(params)        # adapters (and reward heads) | the base
    params = combine(trainable, frozen)
    reference = adapters_off(params)          # exactly the base model, same module
    plain = merge(params, config)             # W + (alpha / R) A @ B; for `base_config(config)`
    fingerprint(frozen)                       # uint32: is a rebuilt base the one trained on?
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import traverse_util

from nemotron_jax.models.llama import LlamaConfig

ADAPTER_ENDINGS = ("_lora_a", "_lora_b")
# Heads trained from scratch (or from the reward model) alongside the adapters.
HEAD_KEYS = ("reward_head",)
# The LlamaConfig fields that describe adapters, not the base model.
ADAPTER_FIELDS = frozenset({"lora_rank", "lora_alpha", "lora_targets", "lora_dropout"})


def _name(key) -> str:
    return str(getattr(key, "key", key))


def is_adapter(path: tuple) -> bool:
    return _name(path[-1]).endswith(ADAPTER_ENDINGS)


def is_trainable(path: tuple) -> bool:
    """An adapter leaf, or a leaf of a head that trains with them."""
    return is_adapter(path) or any(_name(k) in HEAD_KEYS for k in path)


def has_adapters(params) -> bool:
    return any(is_adapter(p) for p in traverse_util.flatten_dict(params))


def split(params) -> tuple[dict, dict]:
    """(trainable, frozen): two nested dicts with the leaves of each kind (see `is_trainable`).
    The leaves may be arrays, `ShapeDtypeStruct`s or boxed `nn.LogicallyPartitioned`."""
    flat = traverse_util.flatten_dict(params)
    trainable = {p: v for p, v in flat.items() if is_trainable(p)}
    frozen = {p: v for p, v in flat.items() if not is_trainable(p)}
    return traverse_util.unflatten_dict(trainable), traverse_util.unflatten_dict(frozen)


def combine(trainable, frozen) -> dict:
    """The inverse of `split`."""
    flat = {**traverse_util.flatten_dict(frozen), **traverse_util.flatten_dict(trainable)}
    return traverse_util.unflatten_dict(flat)


def adapters_off(params) -> dict:
    """`params` with every B matrix zeroed: the same module then computes the base model
    exactly (the adapter term is 0 * anything), so a LoRA run's reference policy needs no
    second copy of the weights."""
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict(
        {p: jnp.zeros_like(v) if _name(p[-1]).endswith("_lora_b") else v for p, v in flat.items()}
    )


def base_config(config: LlamaConfig) -> LlamaConfig:
    """`config` without adapters."""
    return config.replace(lora_rank=0)


def adapter_scale(config: LlamaConfig) -> float:
    return config.lora_alpha / config.lora_rank


def merge(params, config: LlamaConfig) -> dict:
    """The params of `base_config(config)`: each adapted weight becomes W + (alpha / R) A @ B
    (computed in float32, stored in W's dtype) and the adapter leaves are dropped."""
    flat = traverse_util.flatten_dict(params)
    out = {p: v for p, v in flat.items() if not is_adapter(p)}
    scale = adapter_scale(config) if config.lora_rank else 0.0
    for path in flat:
        if not _name(path[-1]).endswith("_lora_a"):
            continue
        w_path = path[:-1] + (path[-1][: -len("_lora_a")],)
        w, a = flat[w_path], flat[path]
        b = flat[path[:-1] + (w_path[-1] + "_lora_b",)]
        out[w_path] = merged_weight(w, a, b, scale)
    return traverse_util.unflatten_dict(out)


def merged_weight(w: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """W [L, *in, *out] + scale * A [L, *in, R] @ B [L, R, *out], in W's dtype."""
    layers, rank = a.shape[0], a.shape[-1]
    a2 = jnp.asarray(a, jnp.float32).reshape(layers, -1, rank)
    b2 = jnp.asarray(b, jnp.float32).reshape(layers, rank, -1)
    delta = jnp.einsum("lir,lro->lio", a2, b2).reshape(w.shape)
    return (jnp.asarray(w, jnp.float32) + scale * delta).astype(w.dtype)


def count(params) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable, frozen = split(params)
    size = lambda tree: sum(int(x.size) for x in jax.tree.leaves(tree))  # noqa: E731
    return size(trainable), size(trainable) + size(frozen)


_UINT = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}
# Multipliers of each axis's coordinate in a position's weight.
_MIX = (0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D, 0x27D4EB2F, 0x165667B1, 0xD3A2646D)


@jax.jit
def fingerprint(params) -> jax.Array:
    """A uint32 of every bit of every leaf and its position: the sum mod 2**32 of each leaf's
    bit patterns times odd position weights. The same for the same tree on any mesh or device
    count, since integer sums wrap exactly in any order; any one changed bit changes it (2**k
    times an odd weight is never 0 mod 2**32). LoRA checkpoints hold no frozen base: a resumed
    run rebuilds it and compares this to tell that it is the base it trained on."""
    total = jnp.uint32(0)
    for i, x in enumerate(jax.tree.leaves(params)):
        bits = jax.lax.bitcast_convert_type(x, _UINT[x.dtype.itemsize]).astype(jnp.uint32)
        mixed = jnp.zeros(bits.shape, jnp.uint32)
        for axis in range(bits.ndim):
            place = jax.lax.broadcasted_iota(jnp.uint32, bits.shape, axis)
            mixed = mixed + place * jnp.uint32(_MIX[axis % len(_MIX)])
        leaf = jnp.sum(bits * (2 * mixed + 1), dtype=jnp.uint32)
        total = total + leaf * jnp.uint32(2 * i + 1) + jnp.uint32(i)
    return total
