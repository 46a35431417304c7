"""A trained model on disk: one params checkpoint plus what reading text with it takes.

    <path>/params/, <path>/metadata/   the params checkpoint (`nemotron_jax.checkpoint`)
    <path>/tokenizer.model             a SentencePiece model, when the model reads with one
    <path>/tokenizer/                  HF tokenizer files kept by `tools/convert_from_hf.py`

The metadata records the model config, the kind ("causal_lm" or "reward_model"), the reward
head's number of slots, the tokenizer ("llama3" | "sentencepiece"), the chat template and the
max length trained with; other keys (objective, source, expo) travel along untouched.

    save("runs/rm/params", params, config=config, kind="reward_model", num_attributes=9,
         tokenizer=tokenizer, template="nemo", max_len=128)
    rm = load("runs/rm/params", mesh=mesh)          # params restored, sharded on the mesh
    card = load("runs/rm/params", restore=False)    # everything but the params
"""

from __future__ import annotations

import dataclasses
import functools
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from nemotron_jax import checkpoint
from nemotron_jax.errors import CheckpointError, ConfigError
from nemotron_jax.models import lora
from nemotron_jax.models.llama import LlamaConfig

KINDS = ("causal_lm", "reward_model")
MODEL_CONFIG = "model_config"
TOKENIZER_FILE = "tokenizer.model"
# The parameters a causal LM and a reward model share; each adds its own head.
BACKBONE_KEYS = ("embed_tokens", "layers", "norm")
HEAD_KEY = {"causal_lm": "lm_head", "reward_model": "reward_head"}
# LlamaConfig fields that may differ between a saved model and the one reading it: numerics and
# implementation choices, none of which changes a parameter.
# Implementation choices that models saved by earlier versions record and LlamaConfig no longer
# has (matmul_impl: the removed oneDNN products); like NUMERIC_FIELDS they change no parameter.
RETIRED_FIELDS = frozenset({"matmul_impl"})
NUMERIC_FIELDS = frozenset(
    {"dtype", "param_dtype", "logits_dtype", "remat", "scan_unroll", "attention_impl"}
)


@dataclasses.dataclass(frozen=True)
class ModelArtifact:
    """A trained model as `load` returns it.

    Attributes:
        path: the params checkpoint directory.
        config: the backbone `LlamaConfig`.
        kind: "causal_lm" or "reward_model".
        num_attributes: A, the reward head's slots; None for a causal LM.
        tokenizer_name: "llama3" or "sentencepiece"; None when not recorded.
        template: "nemo" or "llama3"; None when not recorded.
        max_len: the training max_len; None when not recorded.
        params: the params tree (sharded on the mesh given to `load`), or None.
        metadata: everything the checkpoint records.
    """

    path: str
    config: LlamaConfig
    kind: str
    num_attributes: int | None
    tokenizer_name: str | None
    template: str | None
    max_len: int | None
    params: Any = None
    metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def is_reward(self) -> bool:
        return self.kind == "reward_model"

    @functools.cached_property
    def tokenizer(self):
        """The tokenizer the model was trained with (loaded on first use)."""
        from nemotron_jax.data.tokenizer import Llama3Tokenizer, SentencePieceTokenizer

        spm_file = Path(self.path) / TOKENIZER_FILE
        if self.tokenizer_name == "llama3":
            return Llama3Tokenizer()
        if self.tokenizer_name == "sentencepiece" and spm_file.exists():
            return SentencePieceTokenizer.load(spm_file)
        raise ConfigError(
            f"{self.path}: records no usable tokenizer (metadata tokenizer="
            f"{self.tokenizer_name!r}); pass one explicitly"
        )

    def abstract_params(self, *, boxed: bool = False):
        """The params' shapes and dtypes (logically annotated with `boxed`)."""
        if self.is_reward:
            from nemotron_jax.models.reward import abstract_reward_params

            return abstract_reward_params(self.config, self.num_attributes, boxed=boxed)
        from nemotron_jax.models.llama import abstract_params

        return abstract_params(self.config, boxed=boxed)

    def saved_leaves(self) -> dict[tuple[str, ...], tuple[tuple[int, ...], Any]]:
        return checkpoint.saved_leaves(self.path)

    def check_architecture(self, config: LlamaConfig, what: str) -> None:
        """Fails unless the saved model has the base architecture of `config` (numerics and
        LoRA adapters may differ: saved adapters are merged on restore, see `restore`)."""
        theirs, ours = self.config.to_dict(), config.to_dict()
        free = NUMERIC_FIELDS | lora.ADAPTER_FIELDS
        diff = sorted(k for k in ours if k not in free and ours[k] != theirs[k])
        if diff:
            raise ConfigError(
                f"{what} {self.path}: base model differs from config.model in "
                + ", ".join(f"{k} ({theirs[k]} vs {ours[k]})" for k in diff)
            )

    def restore(self, target, shardings):
        """The leaves of `target` (arrays or `ShapeDtypeStruct`s, possibly a subset of the saved
        ones, and no adapter leaves), restored in their saved dtype with `shardings`, then cast
        to the target's. A weight that the saved model adapts with LoRA comes back merged,
        W + (alpha / R) A @ B: the plain weights of the model the checkpoint computes."""
        saved = self.saved_leaves()
        leaf = lambda p: tuple(str(getattr(k, "key", k)) for k in p)  # noqa: E731
        paths = [leaf(p) for p, _ in jax.tree_util.tree_flatten_with_path(target)[0]]
        missing = ["/".join(p) for p in paths if p not in saved]
        if missing:
            raise CheckpointError(f"{self.path}: checkpoint lacks {missing[:4]}")
        abstract = jax.tree_util.tree_map_with_path(
            lambda p, x: jax.ShapeDtypeStruct(x.shape, saved[leaf(p)][1]), target
        )
        restored = checkpoint.restore_params(self.path, abstract, shardings=shardings)
        adapted = [p for p in paths if p[:-1] + (p[-1] + "_lora_a",) in saved]
        if adapted:
            restored = self._merge_adapters(restored, adapted, saved)
        dtypes = jax.tree.map(lambda x: x.dtype, target)
        return jax.jit(lambda r: jax.tree.map(lambda a, d: a.astype(d), r, dtypes))(restored)

    def _merge_adapters(self, restored, adapted, saved):
        """`restored` with each weight in `adapted` merged with its saved adapter (restored
        replicated: adapters are small), on the weight's own sharding."""
        from flax import traverse_util
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        flat = traverse_util.flatten_dict(restored)
        mesh = flat[adapted[0]].sharding.mesh
        names = [p[:-1] + (p[-1] + suffix,) for p in adapted for suffix in lora.ADAPTER_ENDINGS]
        abstract = traverse_util.unflatten_dict({n: jax.ShapeDtypeStruct(*saved[n]) for n in names})
        replicated = jax.tree.map(lambda _: NamedSharding(mesh, P()), abstract)
        adapters = traverse_util.flatten_dict(
            checkpoint.restore_params(self.path, abstract, shardings=replicated)
        )
        scale = lora.adapter_scale(self.config)
        for p in adapted:
            w = flat[p]
            a, b = (adapters[p[:-1] + (p[-1] + suffix,)] for suffix in lora.ADAPTER_ENDINGS)
            flat[p] = jax.jit(lora.merged_weight, static_argnums=3, out_shardings=w.sharding)(
                w, a, b, scale
            )
        return traverse_util.unflatten_dict(flat)


def check_vocabulary(tokenizer, config: LlamaConfig, where: str = "") -> None:
    """A tokenizer's ids must all have an embedding row."""
    if tokenizer.vocab_size > config.vocab_size:
        raise ConfigError(
            f"{where}tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
            f"{config.vocab_size}"
        )


def _resolve(path) -> Path:
    """A run's workdir is accepted for its `<workdir>/params` checkpoint."""
    return Path(os.fspath(checkpoint.params_path(path)))


def load(
    path, *, kind: str | None = None, restore: bool = True, mesh=None, rules=None
) -> ModelArtifact:
    """Reads a trained model (a run's workdir also works, for its `params/`).

    Args:
        path: the params checkpoint.
        kind: the kind expected ("causal_lm" or "reward_model"); None accepts either.
        restore: also restore the params; False reads only what the metadata records.
        mesh: a (data, fsdp, tensor) mesh for the params; default all devices on fsdp.
        rules: logical sharding rules; default `sharding.DEFAULT_RULES`.

    Raises:
        CheckpointError: not a params checkpoint, not of the `kind` expected, no model config, or
            a reward head whose shape contradicts the recorded number of slots.
    """
    path = _resolve(path)
    metadata = checkpoint.read_metadata(path)
    head = checkpoint.saved_leaves(path).get(("reward_head", "kernel"))
    # Checkpoints converted before the kind was recorded: the leaves tell.
    saved_kind = metadata.get("kind") or ("reward_model" if head is not None else "causal_lm")
    if saved_kind not in KINDS:
        raise CheckpointError(f"{path}: metadata kind {saved_kind!r}; expected one of {KINDS}")
    if kind is not None and (saved_kind != kind or (kind == "reward_model" and head is None)):
        raise CheckpointError(
            f"{path}: not a {kind.replace('_', ' ')} checkpoint (metadata kind={saved_kind!r}, "
            f"{'no' if head is None else 'has a'} reward_head)"
        )
    if saved_kind == "reward_model" and head is None:
        raise CheckpointError(f"{path}: metadata kind 'reward_model' but no reward_head")
    if MODEL_CONFIG not in metadata:
        raise CheckpointError(f"{path}: metadata has no {MODEL_CONFIG!r}; not a model checkpoint")
    num_attributes = None
    if saved_kind == "reward_model":
        num_attributes = int(metadata.get("num_attributes") or head[0][1])
        if head[0][1] != num_attributes:
            raise CheckpointError(
                f"{path}: metadata num_attributes={num_attributes} but leaf reward_head/kernel "
                f"has shape {head[0]}"
            )
    artifact = ModelArtifact(
        path=os.fspath(path),
        config=LlamaConfig.from_dict(
            {k: v for k, v in metadata[MODEL_CONFIG].items() if k not in RETIRED_FIELDS}
        ),
        kind=saved_kind,
        num_attributes=num_attributes,
        tokenizer_name=metadata.get("tokenizer"),
        template=metadata.get("template"),
        max_len=metadata.get("max_len"),
        metadata=metadata,
    )
    if not restore:
        return artifact
    import flax.linen as nn

    from nemotron_jax import sharding

    mesh = sharding.make_mesh((1, -1, 1)) if mesh is None else mesh
    boxed = artifact.abstract_params(boxed=True)
    shardings = sharding.shardings_for(boxed, mesh, rules or sharding.DEFAULT_RULES)
    params = checkpoint.restore_params(path, nn.unbox(boxed), shardings=shardings)
    return dataclasses.replace(artifact, params=params)


def load_frozen(path, config: LlamaConfig, mesh, rules, *, what: str) -> Any:
    """The params of the causal LM at `path`, restored in `config`'s dtypes (whatever they were
    saved in) and sharded on `mesh` by `rules`: a frozen reference policy in the run's
    numerics. They are plain weights of `config`'s base (any saved adapters merged in).
    `what` names it in errors (a wrong kind or another architecture)."""
    import flax.linen as nn

    from nemotron_jax import sharding
    from nemotron_jax.models.llama import abstract_params

    try:
        model = load(path, kind="causal_lm", restore=False)
    except CheckpointError as e:
        raise CheckpointError(f"{what}: {e}") from None
    model.check_architecture(config, what)
    boxed = abstract_params(lora.base_config(config), boxed=True)
    return model.restore(nn.unbox(boxed), sharding.shardings_for(boxed, mesh, rules))


def _tokenizer_name(tokenizer) -> str | None:
    from nemotron_jax.data.tokenizer import Llama3Tokenizer, SentencePieceTokenizer

    if tokenizer is None or isinstance(tokenizer, str):
        return tokenizer
    if isinstance(tokenizer, Llama3Tokenizer):
        return "llama3"
    if isinstance(tokenizer, SentencePieceTokenizer):
        return "sentencepiece"
    raise TypeError(f"cannot record a tokenizer of type {type(tokenizer).__name__}")


def save(
    path,
    params,
    *,
    config: LlamaConfig,
    kind: str,
    num_attributes: int | None = None,
    tokenizer=None,
    template: str | None = None,
    max_len: int | None = None,
    extra: Mapping[str, Any] | None = None,
    fill_fn: Callable | None = None,
    progress: bool = True,
) -> None:
    """Writes a trained model to `path` (which must not exist).

    Args:
        params: the params tree; with `fill_fn`, its abstract tree (`ShapeDtypeStruct`s),
            streamed leaf by leaf as `checkpoint.save_params_streaming` does.
        config, kind, num_attributes, template, max_len: as `ModelArtifact`'s.
        tokenizer: a tokenizer object (a SentencePiece model is written beside the params; the
            Llama-3.1 one comes from the llama-models package and is only named), a recorded
            name ("llama3"), or None.
        extra: other metadata (objective, source, ...).
    """
    if kind not in KINDS:
        raise ConfigError(f"kind {kind!r}; expected one of {KINDS}")
    metadata = {
        **(extra or {}),
        MODEL_CONFIG: config.to_dict(),
        "kind": kind,
        "num_attributes": num_attributes,
        "tokenizer": _tokenizer_name(tokenizer),
        "template": template,
        "max_len": max_len,
    }
    metadata = {k: v for k, v in metadata.items() if v is not None}
    if fill_fn is None:
        checkpoint.save_params(path, params, metadata=metadata)
    else:
        checkpoint.save_params_streaming(
            path, params, fill_fn, metadata=metadata, progress=progress
        )
    if metadata.get("tokenizer") == "sentencepiece" and not isinstance(tokenizer, str):
        if jax.process_index() == 0:  # orbax wrote the params from every process
            tokenizer.save(Path(path) / TOKENIZER_FILE)


def copy_tokenizer(src, dst) -> None:
    """Copies the SentencePiece model of the model at `src`, if it has one, beside `dst`'s
    params (for params derived from it, e.g. by ExPO)."""
    if (Path(src) / TOKENIZER_FILE).exists():
        shutil.copyfile(Path(src) / TOKENIZER_FILE, Path(dst) / TOKENIZER_FILE)


@functools.lru_cache(maxsize=8)
def _saved_scale(ckpt_dir: str) -> float:
    config = load(ckpt_dir, restore=False).config
    return lora.adapter_scale(config) if config.lora_rank else 0.0


def read_merged_leaf(ckpt_dir, leaf_path: tuple[str, ...], index: int | None) -> np.ndarray:
    """One leaf, or layer slice `leaf[index]`, of the plain model a params checkpoint computes:
    a weight the checkpoint adapts comes merged (in float32, returned in its stored dtype).
    What streamed exports and ExPO read, one slice at a time."""
    w = checkpoint.read_leaf(ckpt_dir, leaf_path, index)
    a_path = leaf_path[:-1] + (leaf_path[-1] + "_lora_a",)
    if a_path not in checkpoint.saved_leaves(ckpt_dir):
        return w
    a = checkpoint.read_leaf(ckpt_dir, a_path, index)
    b = checkpoint.read_leaf(ckpt_dir, leaf_path[:-1] + (leaf_path[-1] + "_lora_b",), index)
    if index is not None:  # one layer's slice: give it the layer axis
        w, a, b = w[None], a[None], b[None]
    merged = np.asarray(lora.merged_weight(w, a, b, _saved_scale(os.fspath(ckpt_dir))))
    return merged[0] if index is not None else merged
