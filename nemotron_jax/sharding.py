"""Device mesh and logical-axis sharding.

Models name every parameter and a few activation axes with *logical* names; the rules below map
them onto the three mesh axes, so a model file never mentions the mesh:

    data    pure data parallelism (replicated parameters)
    fsdp    data parallelism with parameters and optimizer state sharded (ZeRO-3 style)
    tensor  tensor (Megatron) parallelism inside attention heads and the MLP

Logical vocabulary (parameters):
    vocab      vocabulary rows of the embedding / LM head
    embed      the hidden size D
    mlp        the MLP size F
    q_heads    query heads N;  kv_heads  key/value heads K;  head_dim  H
    layers     the stacked-layer axis added by nn.scan
    norm       RMSNorm scales
    attributes the reward head's outputs A (9 attribute slots)
Logical vocabulary (activations):
    act_batch, act_seq, act_embed, act_heads, act_mlp, act_vocab
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from nemotron_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

DEFAULT_RULES: Rules = (
    # Parameters.
    ("vocab", "tensor"),  # LM head / embedding rows split like the MLP: logits stay tensor-local
    ("embed", "fsdp"),  # every weight has a D axis: FSDP shards along it
    ("mlp", "tensor"),  # Megatron MLP: column-parallel gate/up, row-parallel down
    ("q_heads", "tensor"),  # Megatron attention: whole heads per tensor shard
    ("kv_heads", "tensor"),  # same split for K/V, so a query group meets its own K/V locally
    ("head_dim", None),  # never split inside a head (RoPE mixes its two halves)
    ("layers", None),  # scan slices one layer per step; sharding this axis would gather
    ("norm", None),  # D-sized scales: too small to be worth sharding
    ("attributes", None),  # reward-head outputs: 9 columns, far too few to split
    # Activations.
    ("act_batch", ("data", "fsdp")),  # the batch is split over every data-parallel axis
    ("act_seq", None),  # no sequence parallelism (yet)
    ("act_embed", None),  # residual stream is whole on each device between blocks
    ("act_heads", "tensor"),  # matches q_heads
    ("act_mlp", "tensor"),  # matches mlp
    ("act_vocab", "tensor"),  # matches vocab
)


LOGICAL_AXES = tuple(name for name, _ in DEFAULT_RULES)


def validate_rules(rules: Rules, mesh_axes: Sequence[str] = MESH_AXES) -> None:
    """Rejects duplicate or unknown logical names and mesh axes that do not exist."""
    seen = set()
    for name, target in rules:
        if name in seen:
            raise ConfigError(f"logical axis {name!r} has more than one sharding rule")
        if name not in LOGICAL_AXES:
            raise ConfigError(
                f"rule {name!r}: no logical axis {name!r}; choose from {LOGICAL_AXES}"
            )
        seen.add(name)
        targets = (target,) if isinstance(target, str) or target is None else target
        for axis in targets:
            if axis is not None and axis not in mesh_axes:
                raise ConfigError(
                    f"rule {name!r} -> {target!r}: no mesh axis {axis!r}; choose from "
                    f"{tuple(mesh_axes)} or None"
                )


def make_mesh(shape: Sequence[int] = (1, -1, 1), devices: Sequence[Any] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh. One entry may be -1: it takes the remaining devices."""
    devices = list(jax.devices() if devices is None else devices)
    shape = list(shape)
    if len(shape) != 3:
        raise ConfigError(f"config.mesh: shape needs 3 entries (data, fsdp, tensor), got {shape}")
    if shape.count(-1) > 1:
        raise ConfigError(f"config.mesh: at most one axis may be -1, got {shape}")
    if -1 in shape:
        known = math.prod(s for s in shape if s != -1)
        if len(devices) % known:
            raise ConfigError(
                f"config.mesh: {len(devices)} devices do not divide into mesh {shape}"
            )
        shape[shape.index(-1)] = len(devices) // known
    if math.prod(shape) != len(devices):
        raise ConfigError(
            f"config.mesh {tuple(shape)} needs {math.prod(shape)} devices, have {len(devices)} "
            f"({devices[0].platform}); -1 on one axis takes the devices there are"
        )
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def logical_specs(boxed_tree: Any) -> Any:
    """Tree of logical PartitionSpecs from a tree of `nn.LogicallyPartitioned` leaves."""
    return nn.get_partition_spec(boxed_tree)


def _fit(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
    """Drops mesh axes that do not divide their dimension (e.g. 2 KV heads on tensor=4).

    The dimension is then replicated over those axes: correct, just less sharded.
    """
    fitted = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=True):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        kept = []
        for a in names:
            size = math.prod(mesh.shape[x] for x in kept) * mesh.shape[a]
            if dim % size == 0:
                kept.append(a)
        fitted.append(tuple(kept) if len(kept) > 1 else (kept[0] if kept else None))
    return P(*fitted)


def shardings_for(boxed_abstract: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
    """NamedShardings for an abstract (eval_shape'd, boxed) tree, via the logical rules."""
    validate_rules(rules, mesh.axis_names)
    specs = logical_specs(boxed_abstract)
    abstract = nn.unbox(boxed_abstract)
    mesh_specs = nn.logical_to_mesh(specs, rules)
    # An empty pytree node (optax's MaskedNode, where a `multi_transform` keeps no state)
    # reads as a P() leaf in the specs: keep it as it is.
    return jax.tree.map(
        lambda spec, x: (
            NamedSharding(mesh, _fit(spec, x.shape, mesh)) if hasattr(x, "shape") else x
        ),
        mesh_specs,
        abstract,
        is_leaf=lambda x: isinstance(x, P),
    )


def sharded_shapes(boxed_abstract: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
    """The unboxed tree as `jax.ShapeDtypeStruct`s carrying their `shardings_for` sharding:
    what a checkpoint restores into and what an ahead-of-time lowering takes."""
    shardings = shardings_for(boxed_abstract, mesh, rules)
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        nn.unbox(boxed_abstract),
        shardings,
    )


def active_mesh():
    """The mesh set by `jax.set_mesh` if it has the (data, fsdp, tensor) axes, else None.

    Opaque kernel calls (Pallas, cuDNN) use it to run per shard in `shard_map`; GSPMD would
    otherwise replicate them."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(MESH_AXES) <= set(mesh.axis_names):
        return None
    return mesh


def constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
    """Sharding constraint by logical names; a no-op unless logical rules are active."""
    return nn.with_logical_constraint(x, names)


def unannotated_leaves(boxed_tree: Any) -> list[str]:
    """Paths of leaves that carry no logical names (should be empty for a model's params)."""
    missing = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(
        boxed_tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)
    )[0]:
        if not isinstance(leaf, nn.LogicallyPartitioned):
            missing.append(jax.tree_util.keystr(path))
    return missing
