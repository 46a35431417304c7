"""Params-only checkpoints: atomic save, streaming (memory-bounded) save, restore, slice reads.

A checkpoint is one directory, written by orbax into a temporary directory and renamed into
place only when complete, so an interrupted save never leaves something that looks finished:

    <path>/params/     an ordinary orbax PyTree checkpoint (OCDBT + zarr), one array per leaf
    <path>/metadata/   a JSON dict, e.g. the model config

This is also the layout of one step of an `ocp.CheckpointManager` with items "params" and
"metadata", so `mngr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(t)))`
and `ocp.StandardCheckpointer().restore(path / "params", t)` read it as well.

Stacked leaves (a leading layer axis; by default any leaf under a "layers" key) are stored in
chunks of at most one layer (`shard_axes=(0,)`) and `CHUNK_BYTES`, which lets
`save_params_streaming` write, and `read_leaf` read, one layer slice at a time. Measured on a
1.5 GiB float32 leaf: orbax's own save of a `np.memmap` leaf copies it (3 GB peak, OCDBT or
not); slice writes into chunks spanning all layers peak at 6.3 GB; slice writes into per-layer
chunks peak at about three slices above the baseline, whatever the leaf size.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import inspect
import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath
from tqdm import tqdm

from nemotron_jax.errors import CheckpointError

PARAMS, METADATA = "params", "metadata"
CHUNK_BYTES = 64 * 2**20  # also bounds read amplification when restoring into small shards
LeafPath = tuple[str, ...]
FillFn = Callable[[LeafPath, int | None], Any]


def _abs(path) -> epath.Path:
    # Orbax's OCDBT layer rejects relative paths.
    return epath.Path(os.path.abspath(os.fspath(path)))


def params_path(path) -> epath.Path:
    """The params checkpoint at `path`; a run's workdir is read for its `<workdir>/params`."""
    path = _abs(path)
    if not (path / PARAMS / "_METADATA").exists() and (path / "params" / PARAMS).is_dir():
        return path / "params"
    return path


def default_stacked(leaf_path: LeafPath) -> bool:
    """True for leaves under a "layers" key (the nn.scan axis), whose axis 0 is the layer."""
    return "layers" in leaf_path[:-1]


def _leaf_path(key_path) -> LeafPath:
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in key_path)


_is_array = lambda x: hasattr(x, "shape") and hasattr(x, "dtype")
_name = "/".join  # leaf path -> "layers/mlp/kernel", as errors and `read_leaf` spell it


def _save_args(tree, stacked: Callable[[LeafPath], bool]):
    # Identical chunking for in-memory and streaming saves, so both produce the same layout.
    def args(kp, x):
        axes = (0,) if np.ndim(x) and stacked(_leaf_path(kp)) else ()
        return ocp.SaveArgs(chunk_byte_size=CHUNK_BYTES, shard_axes=axes)

    return jax.tree_util.tree_map_with_path(args, tree)


def _malloc_trim() -> None:
    # Tensorstore frees its chunk buffers into glibc arenas that otherwise keep growing (peak
    # RSS grew by ~15% of the leaf size without this); handing them back keeps it flat.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class _StreamedLeaf:
    """A leaf to be saved whose data `fill_fn` supplies while it is written."""

    def __init__(self, leaf_path, shape, dtype, stacked, fill_fn, bar):
        self.leaf_path, self.shape, self.dtype = leaf_path, tuple(shape), np.dtype(dtype)
        self.stacked, self.fill_fn, self.bar = stacked, fill_fn, bar
        self.size, self.ndim = int(np.prod(self.shape)), len(self.shape)

    def __deepcopy__(self, memo):  # Orbax deep-copies host values; nothing to copy here.
        return self

    def fetch(self, index: int | None) -> np.ndarray:
        x = np.asarray(self.fill_fn(self.leaf_path, index))
        shape = self.shape[1:] if index is not None else self.shape
        if x.shape != shape or x.dtype != self.dtype:
            where = _name(self.leaf_path) + ("" if index is None else f"[{index}]")
            raise CheckpointError(
                f"fill_fn({where}): expected shape {shape} dtype {self.dtype}, "
                f"got shape {x.shape} dtype {x.dtype}"
            )
        return x


class _Handler(ocp.type_handlers.NumpyHandler):
    """Numpy handler that also writes `_StreamedLeaf`s, one slice at a time.

    Orbax builds the tensorstore spec (paths, OCDBT, zarr metadata, chunking) exactly as for a
    numpy leaf; only the final write is replaced, so the result is an ordinary checkpoint.
    """

    def __init__(self):
        # Saves are synchronous, so orbax's defensive copy of host arrays only costs memory.
        no_copy = "deepcopy_host_arrays" in inspect.signature(super().__init__).parameters
        super().__init__(**({"deepcopy_host_arrays": False} if no_copy else {}))
        self._lock: asyncio.Lock | None = None
        self._failed = False

    async def _open_and_write(self, value, tspec, ts_context):
        if not isinstance(value, _StreamedLeaf):
            return await super()._open_and_write(value, tspec, ts_context)
        # Orbax starts the writes of all leaves at once; one at a time keeps one slice alive.
        self._lock = self._lock or asyncio.Lock()
        async with self._lock:
            # Orbax does not cancel the other leaves when one fails: without this, the next one
            # would start writing into the directory that the failed save is removing.
            if self._failed:
                return
            try:
                t = await ts.open(ts.Spec(tspec), create=True, open=True, context=ts_context)
                for index in range(value.shape[0]) if value.stacked else [None]:
                    x = value.fetch(index)
                    dest = t if index is None else t[index]
                    await dest.write(x, can_reference_source_data_indefinitely=True)
                    value.bar.update(x.nbytes)
                    del x
                    _malloc_trim()
            except BaseException:
                self._failed = True
                raise


def _checkpointer() -> ocp.Checkpointer:
    handler = _Handler()
    types = [
        (ty, handler if ty is np.ndarray else ocp.type_handlers.get_type_handler(ty))
        for ty in ocp.type_handlers.supported_types()
    ]
    registry = ocp.type_handlers.create_type_handler_registry(*types, (_StreamedLeaf, handler))
    pytree = ocp.PyTreeCheckpointHandler(type_handler_registry=registry)
    handlers = ocp.DefaultCheckpointHandlerRegistry()
    handlers.add(PARAMS, ocp.args.PyTreeSave, pytree)
    handlers.add(PARAMS, ocp.args.PyTreeRestore, pytree)
    handlers.add(METADATA, ocp.args.JsonSave, ocp.JsonCheckpointHandler())
    handlers.add(METADATA, ocp.args.JsonRestore, ocp.JsonCheckpointHandler())
    return ocp.Checkpointer(ocp.CompositeCheckpointHandler(handler_registry=handlers))


def _save(path, tree, stacked, metadata: Mapping | None) -> None:
    path = _abs(path)
    if path.exists():
        raise CheckpointError(f"{path} already exists; refusing to overwrite it")
    args = ocp.args.Composite(
        params=ocp.args.PyTreeSave(tree, save_args=_save_args(tree, stacked)),
        metadata=ocp.args.JsonSave(dict(metadata or {})),
    )
    try:
        _checkpointer().save(path, args=args)
    except BaseException:
        # Orbax leaves its temporary directory behind on failure; it is never a checkpoint.
        for tmp in path.parent.glob(f"{path.name}.orbax-checkpoint-tmp*"):
            shutil.rmtree(tmp, ignore_errors=True)  # best effort: its name already says tmp
        raise


def save_params(path, params, *, metadata: Mapping | None = None, stacked=default_stacked) -> None:
    """Saves an in-memory params tree (jax or numpy leaves) and a JSON metadata dict atomically.

    Args:
        path: Checkpoint directory; must not exist yet.
        params: Nested dict of arrays.
        metadata: JSON-serialisable dict stored next to the params (e.g. the model config).
        stacked: Predicate on a leaf path telling whether axis 0 is the layer axis (sets the
            chunking that `read_leaf` relies on to read one layer cheaply).
    """
    _save(path, params, stacked, metadata)


def save_params_streaming(
    path,
    abstract_params,
    fill_fn: FillFn,
    *,
    metadata: Mapping | None = None,
    stacked: Callable[[LeafPath], bool] = default_stacked,
    progress: bool = True,
) -> None:
    """Saves params supplied piece by piece by `fill_fn`, holding about one layer slice at a time.

    `fill_fn(leaf_path, index)` returns `leaf[index]` (shape `shape[1:]`) for a stacked leaf
    (`stacked(leaf_path)`, called for index 0, 1, ... in order) and the whole leaf for index None
    otherwise, with exactly the leaf's dtype. Each piece is written and dropped before the next
    call. The order of leaves is unspecified, so read the source lazily (e.g. `safe_open(...)
    .get_tensor(name)`) rather than caching a file. If `fill_fn` raises, nothing is left at
    `path` and the exception propagates.

    Args:
        path: Checkpoint directory; must not exist yet.
        abstract_params: Nested dict of `jax.ShapeDtypeStruct` (shardings are ignored).
        fill_fn: Supplies the data, as above.
        metadata: JSON-serialisable dict stored next to the params.
        stacked: Predicate on a leaf path telling whether axis 0 is the layer axis.
        progress: Show a tqdm progress bar (bytes written).
    """
    leaves = jax.tree_util.tree_leaves(abstract_params)
    total = sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in leaves)
    desc = f"saving {_abs(path).name}"
    with tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not progress) as bar:

        def streamed(kp, a):
            lp = _leaf_path(kp)
            return _StreamedLeaf(lp, a.shape, a.dtype, bool(a.shape) and stacked(lp), fill_fn, bar)

        tree = jax.tree_util.tree_map_with_path(streamed, abstract_params)
        _save(path, tree, stacked, metadata)


def _params_dir(path) -> epath.Path:
    path = params_path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if not (path / PARAMS / "_METADATA").exists():
        raise CheckpointError(f"{path} is not a params checkpoint (no {PARAMS}/_METADATA)")
    return path / PARAMS


def _saved(path) -> tuple[Any, dict[LeafPath, Any]]:
    """The checkpoint's tree metadata and its array metadata by leaf path (no data is read)."""
    meta = ocp.PyTreeCheckpointHandler().metadata(_params_dir(path))
    flat = jax.tree_util.tree_flatten_with_path(meta.tree, is_leaf=_is_array)[0]
    return meta, {_leaf_path(kp): m for kp, m in flat}


def saved_leaves(path) -> dict[LeafPath, tuple[tuple[int, ...], np.dtype]]:
    """{leaf path: (shape, dtype)} of every saved leaf; reads no array data."""
    return {lp: (tuple(m.shape), np.dtype(m.dtype)) for lp, m in _saved(path)[1].items()}


def read_metadata(path) -> dict:
    """Returns the JSON metadata dict saved with the checkpoint at `path`."""
    _params_dir(path)
    args = ocp.args.Composite(metadata=ocp.args.JsonRestore())
    return dict(_checkpointer().restore(params_path(path), args=args).metadata or {})


def restore_params(path, abstract_params=None, *, shardings=None):
    """Restores params, each device reading only its own shards.

    Args:
        path: Checkpoint directory.
        abstract_params: Target tree of `jax.ShapeDtypeStruct` (or arrays), possibly a subset of
            the saved leaves, with exactly their shapes and dtypes. Default: all saved leaves.
        shardings: A tree of shardings matching the target, or one sharding for all leaves;
            overrides the target's. Leaves left without one go whole to the default device.

    Returns:
        Nested dict of `jax.Array`s.
    """
    meta, saved = _saved(path)
    abstract_params = meta.tree if abstract_params is None else abstract_params
    flat, treedef = jax.tree_util.tree_flatten_with_path(abstract_params, is_leaf=_is_array)
    if shardings is None or isinstance(shardings, jax.sharding.Sharding):
        shardings = [shardings] * len(flat)
    else:
        shardings = treedef.flatten_up_to(shardings)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    leaves = []
    for (kp, a), sharding in zip(flat, shardings, strict=True):
        lp, want = _leaf_path(kp), (tuple(a.shape), np.dtype(a.dtype))
        if lp not in saved:
            raise CheckpointError(f"{path}: leaf {_name(lp)} is not in the checkpoint")
        got = (tuple(saved[lp].shape), np.dtype(saved[lp].dtype))
        if want != got:
            raise CheckpointError(
                f"{path}: leaf {_name(lp)}: expected shape {want[0]} dtype {want[1]}, "
                f"got shape {got[0]} dtype {got[1]}"
            )
        # Metadata of a saved jax.Array carries sharding *metadata*, not a usable Sharding.
        own = getattr(a, "sharding", None)
        own = own if isinstance(own, jax.sharding.Sharding) else None
        leaves.append(jax.ShapeDtypeStruct(want[0], want[1], sharding=sharding or own or device))
    target = treedef.unflatten(leaves)
    partial = {"partial_restore": True} if len(leaves) < len(saved) else {}
    restore = ocp.args.PyTreeRestore(
        target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), **partial
    )
    return (
        _checkpointer().restore(params_path(path), args=ocp.args.Composite(params=restore)).params
    )


def _open_leaf(path, leaf_path) -> ts.TensorStore:
    leaf_path = tuple(leaf_path.split("/")) if isinstance(leaf_path, str) else tuple(leaf_path)
    meta, saved = _saved(path)
    if leaf_path not in saved:
        raise CheckpointError(f"{path}: leaf {_name(leaf_path)} is not in the checkpoint")
    params_dir = params_path(path) / PARAMS
    ocdbt = ocp.type_handlers.is_ocdbt_checkpoint(params_dir)
    context = ocp.type_handlers.get_ts_context(use_ocdbt=ocdbt)
    # Orbax's own spec builder: the same driver, kvstore and OCDBT layout that restore uses.
    info = ocp.type_handlers.ParamInfo(
        name=saved[leaf_path].name,
        parent_dir=params_dir,
        is_ocdbt_checkpoint=ocdbt,
        use_zarr3=meta.use_zarr3,
        ts_context=context,
    )
    spec = ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=ocdbt)
    return ts.open(ts.Spec(spec), open=True, context=context).result()


def read_leaf(path, leaf_path: LeafPath | str, index: int | None = None) -> np.ndarray:
    """Reads one leaf, or its slice `leaf[index]`, reading only the chunks it needs.

    Args:
        path: Checkpoint directory.
        leaf_path: Keys of the leaf, as a tuple or "layers/mlp/gate_proj/kernel".
        index: Layer index into axis 0, or None for the whole leaf.
    """
    t = _open_leaf(path, leaf_path)
    if index is None:
        return t.read().result()
    if not t.shape or not -t.shape[0] <= index < t.shape[0]:
        raise CheckpointError(f"{path}: index {index} out of range for leaf shape {t.shape}")
    return t[index % t.shape[0]].read().result()


def iter_leaf_slices(path, leaf_path: LeafPath | str) -> Iterator[np.ndarray]:
    """Yields `leaf[0]`, `leaf[1]`, ... of a stacked leaf, one slice in memory at a time."""
    t = _open_leaf(path, leaf_path)
    for index in range(t.shape[0]):
        x = t[index].read().result()
        _malloc_trim()  # return the decode buffers before the caller holds on to `x`
        yield x
