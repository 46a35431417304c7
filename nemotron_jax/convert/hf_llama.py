"""Llama checkpoints to and from Hugging Face safetensors, through one mapping table.

`TABLE` lists, for every parameter, our path, the HF tensor name (with `{layer}` for the
per-layer tensors that we stack on a leading axis) and the layout transform. `load_hf` reads it
one way and `save_hf` the other, so the two directions cannot drift apart.

Both directions work tensor by tensor: `iter_hf_tensors` / `read_hf_tensor` never hold more
than one HF tensor, and `save_hf` accepts a `reader(path, layer)` instead of a params tree, so a
70B checkpoint converts with host memory of about one shard (see tools/convert_*_hf.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from nemotron_jax.errors import CheckpointError, ConfigError
from nemotron_jax.models.llama import DTYPES, LlamaConfig, abstract_params

# The layout of our kernels against torch's Linear weight [out, in]:
#   "copy"        same array (embedding [V, D], norm scales [D])
#   "linear_in"   kernel [in, *out] (q/k/v [D, heads, H], gate/up [D, F], down [F, D],
#                 lm_head [D, V])          -> HF [prod(out), in]
#   "linear_out"  kernel [*in, out] (o_proj [N, H, D]) -> HF [out, prod(in)]
TRANSFORMS = ("copy", "linear_in", "linear_out")


@dataclasses.dataclass(frozen=True)
class Entry:
    path: tuple[str, ...]  # our path in the params tree
    hf_name: str  # HF tensor name; "{layer}" marks a per-layer tensor stacked on axis 0 here
    transform: str

    @property
    def stacked(self) -> bool:
        return "{layer}" in self.hf_name

    def hf_names(self, config: LlamaConfig) -> list[str]:
        if not self.stacked:
            return [self.hf_name]
        return [self.hf_name.format(layer=i) for i in range(config.num_layers)]


def _layer(module: str, name: str, transform: str, leaf: str | None = None) -> Entry:
    path = ("layers", module, name) + ((leaf,) if leaf else ())
    return Entry(path, f"model.layers.{{layer}}.{module}.{name}.weight", transform)


BACKBONE = (
    Entry(("embed_tokens",), "model.embed_tokens.weight", "copy"),
    Entry(
        ("layers", "input_layernorm", "scale"),
        "model.layers.{layer}.input_layernorm.weight",
        "copy",
    ),
    _layer("self_attn", "q_proj", "linear_in"),
    _layer("self_attn", "k_proj", "linear_in"),
    _layer("self_attn", "v_proj", "linear_in"),
    _layer("self_attn", "o_proj", "linear_out"),
    Entry(
        ("layers", "post_attention_layernorm", "scale"),
        "model.layers.{layer}.post_attention_layernorm.weight",
        "copy",
    ),
    _layer("mlp", "gate_proj", "linear_in"),
    _layer("mlp", "up_proj", "linear_in"),
    _layer("mlp", "down_proj", "linear_in"),
    Entry(("norm", "scale"), "model.norm.weight", "copy"),
)
LM_HEAD = Entry(("lm_head",), "lm_head.weight", "linear_in")

# Output kinds of `save_hf`: HF architecture name and the head entries after the backbone.
# The reward kinds (`sequence_classification` with `score.weight`, `nemotron_reward` with the
# reward in lm_head row 0) join this table with the reward heads.
KINDS: dict[str, tuple[str, tuple[Entry, ...]]] = {
    "causal_lm": ("LlamaForCausalLM", (LM_HEAD,)),
}


def table(config: LlamaConfig, kind: str = "causal_lm") -> tuple[Entry, ...]:
    if kind not in KINDS:
        raise ConfigError(f"unknown checkpoint kind {kind!r}; supported: {sorted(KINDS)}")
    heads = KINDS[kind][1]
    if config.tie_word_embeddings:
        heads = tuple(e for e in heads if e is not LM_HEAD)
    return BACKBONE + heads


def to_hf_layout(x: np.ndarray, transform: str) -> np.ndarray:
    """One (per-layer) array in our layout -> the HF tensor."""
    if transform == "copy":
        return x
    if transform == "linear_in":
        return x.reshape(x.shape[0], -1).T
    return x.reshape(-1, x.shape[-1]).T


def from_hf_layout(w: np.ndarray, transform: str, shape: tuple[int, ...]) -> np.ndarray:
    """The HF tensor -> one (per-layer) array of our `shape`."""
    if transform == "copy":
        return w.reshape(shape)
    return w.T.reshape(shape)


def _get(tree: dict, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


# --- reading ---------------------------------------------------------------------------------

_SUPPORTED_FILE_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


class HFCheckpoint:
    """A HF model directory opened for tensor-by-tensor reading (single file or sharded)."""

    def __init__(self, hf_dir: str | os.PathLike):
        from safetensors import safe_open

        self.dir = Path(hf_dir)
        if not self.dir.exists():
            raise FileNotFoundError(f"{self.dir}: no such directory")
        if not self.dir.is_dir():
            raise NotADirectoryError(f"{self.dir}: not a directory")
        config_path = self.dir / "config.json"
        if not config_path.exists():
            raise CheckpointError(f"{config_path}: missing (not a Hugging Face model directory?)")
        try:
            self.hf_config = json.loads(config_path.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{config_path}: invalid JSON ({e})") from None
        index = self.dir / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: invalid index ({e!r})") from None
        elif (self.dir / "model.safetensors").exists():
            weight_map = None
        else:
            bins = sorted(p.name for p in self.dir.glob("*.bin"))
            hint = f" (found {bins[0]}: convert it to safetensors first)" if bins else ""
            raise CheckpointError(f"{self.dir}: no model.safetensors or index{hint}")
        files = sorted(set(weight_map.values())) if weight_map else ["model.safetensors"]
        self._handles = {}
        self.names: dict[str, str] = {}
        for fname in files:
            path = self.dir / fname
            if not path.exists():
                raise CheckpointError(f"{path}: listed in the index but missing")
            handle = safe_open(str(path), framework="numpy")
            self._handles[fname] = handle
            for name in handle.keys():
                self.names[name] = fname
        if weight_map:
            absent = sorted(n for n, f in weight_map.items() if self.names.get(n) != f)
            if absent:
                raise CheckpointError(f"{index}: tensors not in their listed shard: {absent[:5]}")

    def info(self, name: str) -> tuple[str, tuple[int, ...]]:
        """(safetensors dtype code, shape) of a tensor, without reading it."""
        sl = self._handles[self.names[name]].get_slice(name)
        return sl.get_dtype(), tuple(sl.get_shape())

    def read(self, name: str) -> np.ndarray:
        dtype, _ = self.info(name)
        if dtype not in _SUPPORTED_FILE_DTYPES:
            raise CheckpointError(
                f"{self.dir / self.names[name]}: tensor {name} has unsupported dtype {dtype}; "
                f"supported: {sorted(_SUPPORTED_FILE_DTYPES)}"
            )
        return self._handles[self.names[name]].get_tensor(name)

    def file_dtype(self) -> str:
        return _SUPPORTED_FILE_DTYPES.get(self.info("model.embed_tokens.weight")[0], "float32")


def open_hf(hf_dir: str | os.PathLike, **overrides: Any) -> tuple[LlamaConfig, HFCheckpoint]:
    """Opens an HF dir and checks every tensor the table needs is present with the right shape.

    The config's `param_dtype`/`dtype` default to the dtype stored in the files.
    """
    ckpt = HFCheckpoint(hf_dir)
    if "model.embed_tokens.weight" not in ckpt.names:
        raise CheckpointError(f"{ckpt.dir}: missing tensors ['model.embed_tokens.weight']")
    file_dtype = ckpt.file_dtype()
    config = LlamaConfig.from_hf(
        ckpt.hf_config, **{"param_dtype": file_dtype, "dtype": file_dtype, **overrides}
    )
    # Checkpoints saved with tied embeddings may still carry an lm_head copy: ignore it then.
    expected = _expected_hf_shapes(config)
    missing = [n for n in expected if n not in ckpt.names]
    if missing:
        more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        raise CheckpointError(f"{ckpt.dir}: missing tensors {missing[:8]}{more}")
    wrong = []
    for name, shape in expected.items():
        got = ckpt.info(name)[1]
        if got != shape:
            wrong.append(f"{name} has shape {list(got)}, config.json implies {list(shape)}")
    if wrong:
        raise CheckpointError(f"{ckpt.dir}: " + "; ".join(wrong[:4]))
    return config, ckpt


def _expected_hf_shapes(config: LlamaConfig, kind: str = "causal_lm") -> dict[str, tuple]:
    abstract = abstract_params(config)
    shapes = {}
    for entry in table(config, kind):
        leaf_shape = _get(abstract, entry.path).shape
        per_layer = leaf_shape[1:] if entry.stacked else leaf_shape
        hf_shape = to_hf_layout(np.empty(per_layer, np.int8), entry.transform).shape
        for name in entry.hf_names(config):
            shapes[name] = tuple(hf_shape)
    return shapes


def make_reader(
    config: LlamaConfig, ckpt: HFCheckpoint
) -> Callable[[tuple[str, ...], int | None], np.ndarray]:
    """`reader(path, layer)`: one of our arrays (one layer slice for stacked leaves), read from
    its single HF tensor and cast to `config.param_dtype`."""
    abstract = abstract_params(config)
    by_path = {e.path: e for e in table(config)}
    dtype = DTYPES[config.param_dtype]

    def reader(path: tuple[str, ...], layer: int | None) -> np.ndarray:
        entry = by_path[tuple(path)]
        shape = _get(abstract, entry.path).shape
        if entry.stacked:
            name, shape = entry.hf_name.format(layer=layer), shape[1:]
        else:
            name = entry.hf_name
        return from_hf_layout(ckpt.read(name), entry.transform, shape).astype(dtype)

    return reader


def load_hf(hf_dir: str | os.PathLike, **overrides: Any) -> tuple[LlamaConfig, dict]:
    """Reads an HF Llama directory into (config, params) held in host memory (numpy)."""
    config, ckpt = open_hf(hf_dir, **overrides)
    reader = make_reader(config, ckpt)
    abstract = abstract_params(config)
    params: dict = {}
    for entry in table(config):
        leaf = _get(abstract, entry.path)
        if entry.stacked:
            value = np.empty(leaf.shape, leaf.dtype)
            for layer in range(config.num_layers):
                value[layer] = reader(entry.path, layer)
        else:
            value = reader(entry.path, None)
        _set(params, entry.path, value)
    return config, params


# --- writing ---------------------------------------------------------------------------------

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
)
DEFAULT_SHARD_BYTES = 5 * 10**9


def copy_tokenizer_files(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Copies whichever tokenizer files exist in `src`; returns their names."""
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src) / name).exists():
            shutil.copy2(Path(src) / name, Path(dst) / name)
            copied.append(name)
    return copied


def iter_hf_tensors(
    config: LlamaConfig,
    reader: Callable[[tuple[str, ...], int | None], np.ndarray],
    kind: str = "causal_lm",
) -> Iterator[tuple[str, Callable[[], np.ndarray], tuple[int, ...]]]:
    """(HF name, thunk producing the tensor, HF shape) in HF order: embeddings, then layer by
    layer, then the final norm and head, so each shard holds whole layers."""
    abstract = abstract_params(config)
    entries = table(config, kind)

    def item(entry, layer):
        shape = _get(abstract, entry.path).shape
        per_layer = shape[1:] if entry.stacked else shape
        hf_shape = to_hf_layout(np.empty(per_layer, np.int8), entry.transform).shape
        name = entry.hf_name.format(layer=layer) if entry.stacked else entry.hf_name
        return (
            name,
            lambda: to_hf_layout(np.asarray(reader(entry.path, layer)), entry.transform),
            tuple(hf_shape),
        )

    for entry in entries:
        if not entry.stacked and entry.path[0] == "embed_tokens":
            yield item(entry, None)
    for layer in range(config.num_layers):
        for entry in entries:
            if entry.stacked:
                yield item(entry, layer)
    for entry in entries:
        if not entry.stacked and entry.path[0] != "embed_tokens":
            yield item(entry, None)


def tree_reader(params: dict) -> Callable[[tuple[str, ...], int | None], np.ndarray]:
    """`reader(path, layer)` over an in-memory params tree (jax or numpy leaves)."""

    def reader(path, layer):
        leaf = _get(params, path)
        return np.asarray(leaf if layer is None else leaf[layer])

    return reader


def save_hf(
    out_dir: str | os.PathLike,
    config: LlamaConfig,
    params: dict | Callable[[tuple[str, ...], int | None], np.ndarray],
    *,
    kind: str = "causal_lm",
    dtype: str | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    tokenizer_dir: str | os.PathLike | None = None,
    progress: bool = False,
) -> Path:
    """Writes an HF model directory: config.json, generation_config.json, safetensors shards of
    about `max_shard_bytes` (plus `model.safetensors.index.json` when there is more than one)
    and any tokenizer files found in `tokenizer_dir`.

    `params` is a params tree or a `reader(path, layer)` (see `make_reader`, or
    `nemotron_jax.checkpoint.read_leaf` for a streamed export). Tensors are written in `dtype`
    (default `config.param_dtype`). The directory appears only once complete.
    """
    from safetensors.numpy import save_file

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise CheckpointError(f"{out_dir}: exists and is not empty; choose a new directory")
    if kind not in KINDS:
        raise ConfigError(f"unknown checkpoint kind {kind!r}; supported: {sorted(KINDS)}")
    dtype = dtype or config.param_dtype
    if dtype not in DTYPES:
        raise ConfigError(f"unsupported dtype {dtype!r}; choose from {list(DTYPES)}")
    np_dtype = np.dtype(DTYPES[dtype])
    reader = tree_reader(params) if isinstance(params, dict) else params

    # Plan the shards from shapes alone, so file names are known before writing.
    tensors = list(iter_hf_tensors(config, reader, kind))
    shards: list[list[int]] = [[]]
    size = 0
    for i, (_, _, shape) in enumerate(tensors):
        nbytes = int(np.prod(shape)) * np_dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += nbytes
    n = len(shards)
    names = (
        ["model.safetensors"]
        if n == 1
        else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
    )

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        weight_map, total = {}, 0
        bar = _progress(len(tensors), "writing HF tensors", progress)
        for fname, members in zip(names, shards, strict=True):
            shard = {}
            for i in members:
                name, make, shape = tensors[i]
                value = np.ascontiguousarray(make().astype(np_dtype))
                if value.shape != shape:
                    raise CheckpointError(f"{name}: got shape {value.shape}, expected {shape}")
                shard[name] = value
                weight_map[name] = fname
                total += value.nbytes
                bar.update(1)
            save_file(shard, str(tmp / fname), metadata={"format": "pt"})
            del shard
        bar.close()
        if n > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        hf_config = config.to_hf(KINDS[kind][0])
        hf_config["torch_dtype"] = dtype
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(
            json.dumps(generation_config(config), indent=2) + "\n"
        )
        if tokenizer_dir is not None:
            copy_tokenizer_files(tokenizer_dir, tmp)
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def generation_config(config: LlamaConfig) -> dict[str, Any]:
    eos = config.eos_token_id[0] if len(config.eos_token_id) == 1 else list(config.eos_token_id)
    gen = {"bos_token_id": config.bos_token_id, "eos_token_id": eos}
    if config.pad_token_id is not None:
        gen["pad_token_id"] = config.pad_token_id
    return gen


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", disable=not enabled)
