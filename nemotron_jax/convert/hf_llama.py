"""Llama checkpoints to and from Hugging Face safetensors, through one mapping table.

`table(config, kind)` lists, for every parameter, our path, the HF tensor name (with `{layer}`
for the per-layer tensors that we stack on a leading axis) and the layout transform. `load_hf`
reads it one way and `save_hf` the other, so the two directions cannot drift apart.

Both directions work tensor by tensor: `iter_hf_tensors` / `make_reader` never hold more
than one HF tensor, and `save_hf` accepts a `reader(path, layer)` instead of a params tree, so a
70B checkpoint converts with host memory of about one shard (see tools/convert_*_hf.py).

Three kinds of HF model (`KINDS`) share the backbone rows and differ in the head:

- `causal_lm`: `LlamaForCausalLM`, our `lm_head` [D, V] as `lm_head.weight` [V, D].
- `sequence_classification`: `LlamaForSequenceClassification`, the reward as
  `score.weight` [1, D]; HF reads it at the last token that is not `pad_token_id`.
- `nemotron_reward`: `LlamaForCausalLM` laid out like NVIDIA's
  `Llama-3.1-Nemotron-70B-Reward-HF`: `lm_head.weight` [V, D] whose row 0 is the reward
  direction and whose other rows are zero, so the reward of a sequence is the logit of token 0
  at its last real position (the model card's `generate(max_new_tokens=1, output_scores=True)`
  then `scores[0][b][0]`).

Our reward model (`nemotron_jax.models.reward.RewardModel`) has a head
`reward_head: {kernel [D, A], bias [A]}` and a scalar reward `outputs[..., slot]` or
`outputs @ weights`. HF's heads have one output and no bias, so an export writes the direction
`w = kernel @ v` (v: the one-hot slot, or the merge weights) and drops `b = bias @ v`, which is
the same constant in every reward: HF rewards are ours minus `b`, rankings and Bradley-Terry
accuracies are unchanged. `b` is recorded in the export's `reward_head.json`. Reading an HF
reward model back gives a 9-slot head with the HF row in slot 4 (helpfulness, the slot our BT
losses read), the other slots zero and a zero bias.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from nemotron_jax.convert.hf_config import config_from_hf, config_to_hf
from nemotron_jax.errors import CheckpointError, ConfigError
from nemotron_jax.models.llama import DTYPES, LlamaConfig, abstract_params
from nemotron_jax.models.reward import HELPFULNESS_SLOT, NUM_ATTRIBUTES, abstract_reward_params

# The layout of our kernels against torch's Linear weight [out, in]:
#   "copy"            same array (embedding [V, D], norm scales [D])
#   "linear_in"       kernel [in, *out] (q/k/v [D, heads, H], gate/up [D, F], down [F, D],
#                     lm_head [D, V])          -> HF [prod(out), in]
#   "linear_out"      kernel [*in, out] (o_proj [N, H, D]) -> HF [out, prod(in)]
#   "reward_score"    reward direction [D] -> HF score.weight [1, D]
#   "reward_lm_head"  reward direction [D] -> HF lm_head.weight [V, D], row 0, other rows zero
# For the two reward transforms the export side takes the direction `kernel @ v` (see
# `reward_direction`), and the import side fills slot `HELPFULNESS_SLOT` of the kernel.
REWARD_TRANSFORMS = ("reward_score", "reward_lm_head")
TRANSFORMS = ("copy", "linear_in", "linear_out") + REWARD_TRANSFORMS


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


EMBED = Entry(("embed_tokens",), "model.embed_tokens.weight", "copy")
BACKBONE = (
    EMBED,
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
REWARD_KERNEL = ("reward_head", "kernel")
REWARD_BIAS = ("reward_head", "bias")  # no HF tensor: dropped on export, zero on import
SCORE = Entry(REWARD_KERNEL, "score.weight", "reward_score")
NEMOTRON_LM_HEAD = Entry(REWARD_KERNEL, "lm_head.weight", "reward_lm_head")

# Output kinds of `save_hf`: HF architecture name and the head entries after the backbone.
KINDS: dict[str, tuple[str, tuple[Entry, ...]]] = {
    "causal_lm": ("LlamaForCausalLM", (LM_HEAD,)),
    "sequence_classification": ("LlamaForSequenceClassification", (SCORE,)),
    "nemotron_reward": ("LlamaForCausalLM", (NEMOTRON_LM_HEAD,)),
}
REWARD_KINDS = ("sequence_classification", "nemotron_reward")

# HF's sequence classifier finds each row's last token as the rightmost id != pad_token_id, so
# the pad id must never end a real sequence. Llama-3.x has no pad token; Meta fine-tunes with
# <|finetune_right_pad_id|>, which text never encodes to (and which our Llama-3 tokenizer pads
# with), so it is the default for the Llama-3 vocabulary when the config names no pad id.
LLAMA3_VOCAB_SIZE = 128256
LLAMA3_PAD_TOKEN_ID = 128004


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ConfigError(f"unknown checkpoint kind {kind!r}; supported: {sorted(KINDS)}")


def table(config: LlamaConfig, kind: str = "causal_lm") -> tuple[Entry, ...]:
    _check_kind(kind)
    heads = KINDS[kind][1]
    if config.tie_word_embeddings:
        heads = tuple(e for e in heads if e is not LM_HEAD)
        # A tied causal LM read as a nemotron reward model: its lm_head is the embedding.
        # (Exports of that kind are always untied, see `save_hf`.)
        heads = tuple(
            dataclasses.replace(e, hf_name=EMBED.hf_name) if e is NEMOTRON_LM_HEAD else e
            for e in heads
        )
    return BACKBONE + heads


def abstract_params_for(
    config: LlamaConfig, kind: str = "causal_lm", num_attributes: int = NUM_ATTRIBUTES
) -> Any:
    """Our parameter shapes for an HF kind: Llama params for `causal_lm`, reward-model params
    (`{embed_tokens, layers, norm, reward_head: {kernel [D, A], bias [A]}}`) otherwise."""
    _check_kind(kind)
    if kind in REWARD_KINDS:
        return abstract_reward_params(config, num_attributes)
    return abstract_params(config)


def _hf_shape(entry: Entry, config: LlamaConfig, abstract: Any) -> tuple[int, ...]:
    """The HF tensor shape of one (per-layer) entry; `abstract` holds the backbone shapes."""
    if entry.transform == "reward_score":
        return (1, config.hidden_size)
    if entry.transform == "reward_lm_head":
        return (config.vocab_size, config.hidden_size)
    shape = _get(abstract, entry.path).shape
    per_layer = shape[1:] if entry.stacked else shape
    return tuple(to_hf_layout(np.empty(per_layer, np.int8), entry.transform).shape)


def to_hf_layout(x: np.ndarray, transform: str, vocab_size: int | None = None) -> np.ndarray:
    """One (per-layer) array in our layout -> the HF tensor.

    For the reward transforms `x` is the reward direction [D] (`reward_direction`), not the
    kernel, and `reward_lm_head` needs `vocab_size`.
    """
    if transform == "copy":
        return x
    if transform == "linear_in":
        return x.reshape(x.shape[0], -1).T
    if transform == "linear_out":
        return x.reshape(-1, x.shape[-1]).T
    if transform == "reward_score":
        return x.reshape(1, -1)
    if transform == "reward_lm_head":
        head = np.zeros((vocab_size, x.shape[-1]), x.dtype)
        head[0] = x
        return head
    raise ValueError(f"unknown transform {transform!r}")


def from_hf_layout(w: np.ndarray, transform: str, shape: tuple[int, ...]) -> np.ndarray:
    """The HF tensor -> one (per-layer) array of our `shape`.

    The reward transforms take HF row 0 (`w` may hold only that row) into slot
    `HELPFULNESS_SLOT` of a kernel of `shape` [D, A] whose other slots are zero.
    """
    if transform == "copy":
        return w.reshape(shape)
    if transform in REWARD_TRANSFORMS:
        kernel = np.zeros(shape, w.dtype)
        kernel[:, HELPFULNESS_SLOT] = w[0]
        return kernel
    return w.T.reshape(shape)


def reward_direction(
    kernel: np.ndarray,
    bias: np.ndarray,
    *,
    slot: int = HELPFULNESS_SLOT,
    weights: Sequence[float] | None = None,
) -> tuple[np.ndarray, float]:
    """The single, bias-free HF reward head equivalent to `scalar_reward(outputs, slot, weights)`.

    With `v` the one-hot vector of `slot`, or `weights`, our scalar reward is
    `h . (kernel @ v) + bias . v`. HF heads have no bias, so the export keeps the direction and
    drops the offset, which is the same for every input.

    Args:
        kernel: head kernel [D, A].
        bias: head bias [A].
        slot: the attribute exported when `weights` is None (4 = helpfulness).
        weights: [A] merge weights (reward = outputs . weights); override `slot`.

    Returns:
        (w float32 [D], b): HF reward `h . w` equals our scalar reward minus `b`. Computed in
        float64, so a one-hot slot is copied exactly.
    """
    kernel = np.asarray(kernel, np.float64)
    bias = np.asarray(bias, np.float64)
    if kernel.ndim != 2 or bias.shape != kernel.shape[1:]:
        raise ConfigError(
            f"reward head must be {{kernel [D, A], bias [A]}}, got kernel {list(kernel.shape)} "
            f"and bias {list(bias.shape)}"
        )
    a = kernel.shape[1]
    if weights is None:
        if not isinstance(slot, int | np.integer) or not 0 <= slot < a:
            raise ConfigError(f"reward slot {slot!r} out of range for a head of {a} outputs")
        v = np.zeros(a)
        v[slot] = 1.0
    else:
        v = np.asarray(weights, np.float64)
        if v.shape != (a,):
            raise ConfigError(f"merge weights must be {a} numbers (one per head output), got {v}")
    return (kernel @ v).astype(np.float32), float(bias @ v)


def reward_pad_token_id(config: LlamaConfig, pad_token_id: int | None = None) -> int | None:
    """The pad id written into a reward export: `pad_token_id` if given, else the config's, else
    `LLAMA3_PAD_TOKEN_ID` for the Llama-3 vocabulary, else None."""
    if pad_token_id is not None:
        pad = pad_token_id
    elif config.pad_token_id is not None:
        pad = config.pad_token_id
    elif config.vocab_size == LLAMA3_VOCAB_SIZE:
        pad = LLAMA3_PAD_TOKEN_ID
    else:
        return None
    if not isinstance(pad, int | np.integer) or not 0 <= pad < config.vocab_size:
        raise ConfigError(f"pad_token_id {pad!r} is not a token id of a {config.vocab_size} vocab")
    return int(pad)


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


@dataclasses.dataclass(frozen=True)
class HFKind:
    """How an HF directory is read: its `KINDS` key and what our params will be.

    Attributes:
        kind: "causal_lm", "sequence_classification" or "nemotron_reward".
        num_attributes: outputs of the reward head we build (9), or None for a causal LM.
    """

    kind: str
    num_attributes: int | None

    @property
    def is_reward(self) -> bool:
        return self.kind in REWARD_KINDS

    def metadata(self) -> dict[str, Any]:
        """The params-checkpoint metadata fields (`kind`, `num_attributes`) for these params."""
        if not self.is_reward:
            return {"kind": "causal_lm"}
        return {"kind": "reward_model", "num_attributes": self.num_attributes}


def detect_kind(hf_config: dict[str, Any], *, as_reward_model: bool = False) -> HFKind:
    """The kind of an HF directory from its config.json `architectures`.

    `LlamaForSequenceClassification` is a reward model. A `LlamaForCausalLM` is an LM unless
    `as_reward_model`, which reads it as a nemotron reward model (reward = lm_head row 0); no
    file says which one it is.
    """
    architectures = hf_config.get("architectures") or ["LlamaForCausalLM"]
    if KINDS["sequence_classification"][0] in architectures:
        return HFKind("sequence_classification", NUM_ATTRIBUTES)
    if as_reward_model:
        return HFKind("nemotron_reward", NUM_ATTRIBUTES)
    return HFKind("causal_lm", None)


class HFCheckpoint:
    """A HF model directory opened for tensor-by-tensor reading (single file or sharded).

    `kind` (an `HFKind`) is set by `open_hf`; it defaults to the config's architecture.
    """

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
        self.kind = detect_kind(self.hf_config)
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
            try:
                handle = safe_open(str(path), framework="numpy")
            except Exception as e:  # noqa: BLE001 - safetensors' errors are not exported types
                detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise CheckpointError(
                    f"{path}: not a readable safetensors file, truncated or corrupt ({detail})"
                ) from None
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

    def read(self, name: str, rows: int | None = None) -> np.ndarray:
        """A tensor, or only its first `rows` rows (e.g. lm_head row 0 without the [V, D])."""
        dtype, _ = self.info(name)
        if dtype not in _SUPPORTED_FILE_DTYPES:
            raise CheckpointError(
                f"{self.dir / self.names[name]}: tensor {name} has unsupported dtype {dtype}; "
                f"supported: {sorted(_SUPPORTED_FILE_DTYPES)}"
            )
        handle = self._handles[self.names[name]]
        if rows is None:
            return handle.get_tensor(name)
        return handle.get_slice(name)[:rows]

    def file_dtype(self) -> str:
        return _SUPPORTED_FILE_DTYPES.get(self.info("model.embed_tokens.weight")[0], "float32")


# Tensors an HF directory may hold that no parameter reads: rotary buffers older
# transformers versions saved, and the lm_head copy of a checkpoint with tied embeddings.
_IGNORED_HF_TENSORS = re.compile(r"(.*\.rotary_emb\.inv_freq|lm_head\.weight)$")


def open_hf(
    hf_dir: str | os.PathLike,
    *,
    as_reward_model: bool = False,
    allow_unused: bool = False,
    **overrides: Any,
) -> tuple[LlamaConfig, HFCheckpoint]:
    """Opens an HF dir and checks every tensor the table needs is present with the right shape.

    A tensor that no parameter reads (e.g. a `q_proj.bias`, which Llama-3.1 has not) is refused
    by name, since dropping it would change the model, unless `allow_unused`.

    The kind comes from config.json `architectures` (see `detect_kind`; `as_reward_model` reads
    a `LlamaForCausalLM` as a nemotron reward model) and is left in `ckpt.kind`. The config's
    `param_dtype`/`dtype` default to the dtype stored in the files.
    """
    ckpt = HFCheckpoint(hf_dir)
    ckpt.kind = detect_kind(ckpt.hf_config, as_reward_model=as_reward_model)
    if "model.embed_tokens.weight" not in ckpt.names:
        raise CheckpointError(f"{ckpt.dir}: missing tensors ['model.embed_tokens.weight']")
    file_dtype = ckpt.file_dtype()
    config = config_from_hf(
        ckpt.hf_config, **{"param_dtype": file_dtype, "dtype": file_dtype, **overrides}
    )
    # Checkpoints saved with tied embeddings may still carry an lm_head copy: ignore it then.
    expected = _expected_hf_shapes(config, ckpt.kind.kind)
    missing = [n for n in expected if n not in ckpt.names]
    if missing:
        more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        raise CheckpointError(f"{ckpt.dir}: missing tensors {missing[:8]}{more}")
    if ckpt.kind.kind == "sequence_classification":
        labels = ckpt.info(SCORE.hf_name)[1][0]
        if labels != 1:
            raise CheckpointError(
                f"{ckpt.dir}: score.weight has {labels} outputs; only single-score classifiers "
                f"(num_labels=1) read as a reward model"
            )
    unused = sorted(n for n in ckpt.names if n not in expected and not _IGNORED_HF_TENSORS.match(n))
    if unused and not allow_unused:
        more = f" and {len(unused) - 6} more" if len(unused) > 6 else ""
        raise CheckpointError(
            f"{ckpt.dir}: tensors this Llama has no parameter for: {unused[:6]}{more}; "
            f"--allow-unused converts without them"
        )
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
        for name in entry.hf_names(config):
            shapes[name] = _hf_shape(entry, config, abstract)
    return shapes


def make_reader(
    config: LlamaConfig, ckpt: HFCheckpoint
) -> Callable[[tuple[str, ...], int | None], np.ndarray]:
    """`reader(path, layer)`: one of our arrays (one layer slice for stacked leaves), read from
    its single HF tensor and cast to the leaf's dtype (`config.param_dtype`; float32 for a
    reward head). The params are those of `ckpt.kind` (see `abstract_params_for`)."""
    kind = ckpt.kind
    abstract = abstract_params_for(config, kind.kind, kind.num_attributes or NUM_ATTRIBUTES)
    by_path = {e.path: e for e in table(config, kind.kind)}

    def reader(path: tuple[str, ...], layer: int | None) -> np.ndarray:
        path = tuple(path)
        leaf = _get(abstract, path)
        if kind.is_reward and path == REWARD_BIAS:
            return np.zeros(leaf.shape, leaf.dtype)  # HF reward heads have no bias
        entry = by_path[path]
        shape = leaf.shape
        if entry.stacked:
            name, shape = entry.hf_name.format(layer=layer), shape[1:]
        else:
            name = entry.hf_name
        # A reward head needs one row; lm_head row 0 is read without the other V - 1.
        rows = 1 if entry.transform in REWARD_TRANSFORMS else None
        return from_hf_layout(ckpt.read(name, rows), entry.transform, shape).astype(leaf.dtype)

    return reader


def load_hf(
    hf_dir: str | os.PathLike,
    *,
    as_reward_model: bool = False,
    return_kind: bool = False,
    **overrides: Any,
) -> tuple[LlamaConfig, dict] | tuple[LlamaConfig, dict, HFKind]:
    """Reads an HF Llama directory into (config, params) held in host memory (numpy).

    A `LlamaForSequenceClassification` directory, or a `LlamaForCausalLM` one with
    `as_reward_model=True` (NVIDIA's Nemotron reward layout, reward = lm_head row 0), gives
    reward-model params `{embed_tokens, layers, norm, reward_head: {kernel [D, 9], bias [9]}}`
    with the HF row in kernel slot 4, zeros elsewhere and a zero bias, so
    `RewardModel(config).apply(...)[..., 4]` is the HF reward.

    Args:
        hf_dir: the HF model directory.
        as_reward_model: read a causal LM as a nemotron reward model.
        return_kind: also return the `HFKind` it was read as.
        **overrides: `LlamaConfig` fields to override (e.g. `param_dtype`).

    Returns:
        (config, params), or (config, params, kind) with `return_kind`.
    """
    config, ckpt = open_hf(hf_dir, as_reward_model=as_reward_model, **overrides)
    reader = make_reader(config, ckpt)
    abstract = abstract_params_for(
        config, ckpt.kind.kind, ckpt.kind.num_attributes or NUM_ATTRIBUTES
    )
    stacked = {e.path: e.stacked for e in table(config, ckpt.kind.kind)}
    params: dict = {}
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
        path = tuple(k.key for k in key_path)
        if stacked.get(path, False):
            value = np.empty(leaf.shape, leaf.dtype)
            for layer in range(config.num_layers):
                value[layer] = reader(path, layer)
        else:
            value = reader(path, None)
        _set(params, path, value)
    return (config, params, ckpt.kind) if return_kind else (config, params)


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
    reward_head: np.ndarray | None = None,
) -> Iterator[tuple[str, Callable[[], np.ndarray], tuple[int, ...]]]:
    """(HF name, thunk producing the tensor, HF shape) in HF order: embeddings, then layer by
    layer, then the final norm and head, so each shard holds whole layers.

    The reward kinds take the head as `reward_head`, the direction [D] from `reward_direction`.
    """
    abstract = abstract_params(config)
    entries = table(config, kind)
    if kind in REWARD_KINDS and reward_head is None:
        raise ValueError(f"kind {kind!r} needs reward_head (see reward_direction)")

    def item(entry, layer):
        name = entry.hf_name.format(layer=layer) if entry.stacked else entry.hf_name

        def make():
            if entry.transform in REWARD_TRANSFORMS:
                return to_hf_layout(reward_head, entry.transform, config.vocab_size)
            return to_hf_layout(np.asarray(reader(entry.path, layer)), entry.transform)

        return name, make, _hf_shape(entry, config, abstract)

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


def _check_params_match_kind(params: dict, kind: str) -> None:
    """One-line errors for LM params exported as a reward kind and the other way round."""
    if kind in REWARD_KINDS and "reward_head" not in params:
        raise ConfigError(
            f"kind {kind!r} exports a reward model: params need a 'reward_head' "
            f"(got keys {sorted(params)}); export an LM with kind='causal_lm'"
        )
    if kind == "causal_lm" and "reward_head" in params:
        raise ConfigError(
            "kind 'causal_lm' exports an LM: these are reward-model params (a 'reward_head', "
            "no 'lm_head'); use kind='sequence_classification' or 'nemotron_reward'"
        )


REWARD_HEAD_FILE = "reward_head.json"


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
    reward_slot: int = HELPFULNESS_SLOT,
    reward_weights: Sequence[float] | None = None,
    pad_token_id: int | None = None,
) -> Path:
    """Writes an HF model directory: config.json, generation_config.json, safetensors shards of
    about `max_shard_bytes` (plus `model.safetensors.index.json` when there is more than one)
    and any tokenizer files found in `tokenizer_dir`.

    `params` is a params tree or a `reader(path, layer)` (see `make_reader`, or
    `nemotron_jax.checkpoint.read_leaf` for a streamed export). Tensors are written in `dtype`
    (default `config.param_dtype`). The directory appears only once complete.

    The reward kinds take reward-model params (`reward_head: {kernel [D, A], bias [A]}`, no
    `lm_head`) and export the scalar reward `scalar_reward(outputs, slot=reward_slot,
    weights=reward_weights)` as one bias-free row (`reward_direction`). The dropped bias `b`
    and the export settings go to `reward_head.json`: HF rewards are ours minus `b`.

    - `sequence_classification` writes `score.weight` [1, D], `num_labels` 1 and a
      `pad_token_id` (`reward_pad_token_id`): HF reads each row at its rightmost token that is
      not the pad id, i.e. our last real token when rows are right-padded with that id and
      do not end with it.
    - `nemotron_reward` writes an untied `lm_head.weight` [V, D] with the direction in row 0 and
      zeros elsewhere: the reward is `logits[b, last real position, 0]`.

    Args:
        out_dir: directory to create (must not exist or be empty).
        config: the backbone architecture.
        params: params tree or reader, as above.
        kind: a `KINDS` key.
        dtype: tensor dtype in the files (default `config.param_dtype`).
        max_shard_bytes: target shard size.
        tokenizer_dir: copy the tokenizer files found there.
        progress: show a progress bar.
        reward_slot: head output exported by the reward kinds (default 4, helpfulness).
        reward_weights: [A] merge weights exported instead of one slot.
        pad_token_id: pad id of a reward export (default: see `reward_pad_token_id`).

    Returns:
        `out_dir`.
    """
    from safetensors.numpy import save_file

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise CheckpointError(f"{out_dir}: exists and is not empty; choose a new directory")
    _check_kind(kind)
    dtype = dtype or config.param_dtype
    if dtype not in DTYPES:
        raise ConfigError(f"unsupported dtype {dtype!r}; choose from {list(DTYPES)}")
    np_dtype = np.dtype(DTYPES[dtype])
    if isinstance(params, dict):
        _check_params_match_kind(params, kind)
    reader = tree_reader(params) if isinstance(params, dict) else params

    head, head_info = None, None
    if kind in REWARD_KINDS:
        kernel = np.asarray(reader(REWARD_KERNEL, None))
        bias = np.asarray(reader(REWARD_BIAS, None))
        head, dropped = reward_direction(kernel, bias, slot=reward_slot, weights=reward_weights)
        pad = reward_pad_token_id(config, pad_token_id)
        if kind == "sequence_classification":
            if pad is None:
                raise ConfigError(
                    "sequence_classification needs a pad_token_id (HF finds each row's last "
                    "token as the rightmost non-pad id); the config has none: pass one"
                )
            if pad in config.eos_token_id:
                import warnings

                warnings.warn(
                    f"pad_token_id {pad} is also an end-of-sequence id: HF reads a sequence "
                    f"that ends with it at the token before; pass another pad_token_id",
                    stacklevel=2,
                )
        # The nemotron layout needs its own lm_head, so that export is never tied.
        tie = config.tie_word_embeddings and kind != "nemotron_reward"
        config = config.replace(pad_token_id=pad, tie_word_embeddings=tie)
        head_info = {
            "kind": kind,
            "num_attributes": int(kernel.shape[1]),
            "reward_slot": None if reward_weights is not None else int(reward_slot),
            "reward_weights": None
            if reward_weights is None
            else [float(w) for w in reward_weights],
            "dropped_bias": dropped,
            "pad_token_id": pad,
            "note": (
                "HF reward = nemotron_jax reward - dropped_bias (the head bias, which HF heads "
                "cannot hold); rankings and pairwise accuracies are unchanged"
            ),
        }

    # Plan the shards from shapes alone, so file names are known before writing.
    tensors = list(iter_hf_tensors(config, reader, kind, head))
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
        hf_config = config_to_hf(config, KINDS[kind][0])
        hf_config["torch_dtype"] = dtype
        if kind == "sequence_classification":
            # One output: without the label maps transformers would build num_labels=2.
            hf_config.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        if kind != "sequence_classification":  # a classifier does not generate
            (tmp / "generation_config.json").write_text(
                json.dumps(generation_config(config), indent=2) + "\n"
            )
        if head_info is not None:
            (tmp / REWARD_HEAD_FILE).write_text(json.dumps(head_info, indent=2) + "\n")
        if tokenizer_dir is not None:
            copy_tokenizer_files(tokenizer_dir, tmp)
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def read_reward_head_info(hf_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The `reward_head.json` a reward export wrote (slot or weights, `dropped_bias`, pad id),
    or None when the directory has none (not one of our reward exports)."""
    path = Path(hf_dir) / REWARD_HEAD_FILE
    return json.loads(path.read_text()) if path.exists() else None


def generation_config(config: LlamaConfig) -> dict[str, Any]:
    # Greedy and with no sampling settings, so generate's `scores` are the raw logits (the
    # nemotron reward is read from them).
    eos = config.eos_token_id[0] if len(config.eos_token_id) == 1 else list(config.eos_token_id)
    gen = {"bos_token_id": config.bos_token_id, "eos_token_id": eos}
    if config.pad_token_id is not None:
        gen["pad_token_id"] = config.pad_token_id
    return gen


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", disable=not enabled)
