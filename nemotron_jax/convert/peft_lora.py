"""LoRA adapters to and from PEFT's format, for the HF export of the base model.

A PEFT adapter directory holds `adapter_config.json` and `adapter_model.safetensors` with, per
layer i and adapted projection,

    base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight   [R, in]
    base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight   [out, R]

(`in`, `out`: the torch Linear's features; PEFT computes x A^T B^T * lora_alpha / r, which is
our (x @ A) @ B * alpha / R). Ours are `<proj>_lora_a` [L, *in, R] and `<proj>_lora_b`
[L, R, *out] in the layout of the weight they adapt (`models.llama.projection`), so each maps by
a reshape and a transpose, exactly.

A reward model's head travels in `modules_to_save` as `base_model.model.score.weight` [1, D],
the bias-free reward direction of `hf_llama.reward_direction` (what a
`LlamaForSequenceClassification` base reads). HF heads hold one output and no bias, so the whole
head (kernel [D, A], bias [A]) is also written beside the adapter, in `nemotron_head.safetensors`,
which PEFT ignores and `read_adapter` prefers: the round trip is bit-exact.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nemotron_jax.convert.hf_llama import REWARD_BIAS, REWARD_KERNEL, reward_direction
from nemotron_jax.errors import CheckpointError, ConfigError
from nemotron_jax.models.llama import LlamaConfig, abstract_params
from nemotron_jax.models.reward import HELPFULNESS_SLOT, NUM_ATTRIBUTES

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
HEAD_FILE = "nemotron_head.safetensors"
MODULE_OF = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}
SCORE = "base_model.model.score.weight"

Reader = Callable[[tuple[str, ...], int | None], np.ndarray]


def _names(target: str, layer: int) -> tuple[str, str]:
    prefix = f"base_model.model.model.layers.{layer}.{MODULE_OF[target]}.{target}"
    return f"{prefix}.lora_A.weight", f"{prefix}.lora_B.weight"


def _paths(target: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    module = ("layers", MODULE_OF[target])
    return module + (target + "_lora_a",), module + (target + "_lora_b",)


def adapter_config(
    config: LlamaConfig, *, reward: bool, base_model: str | None = None
) -> dict[str, Any]:
    """PEFT's `LoraConfig` fields for `config`'s adapters."""
    return {
        "peft_type": "LORA",
        "task_type": "SEQ_CLS" if reward else "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": config.lora_rank,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout,
        "target_modules": list(config.lora_targets),
        "modules_to_save": ["score"] if reward else None,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "layers_to_transform": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def save_adapter(
    out_dir: str | os.PathLike,
    config: LlamaConfig,
    reader: Reader,
    *,
    reward: bool = False,
    reward_slot: int = HELPFULNESS_SLOT,
    reward_weights: Sequence[float] | None = None,
    dtype: str = "float32",
    base_model: str | None = None,
) -> Path:
    """Writes `config`'s adapters, read with `reader(path, layer)` (e.g.
    `checkpoint.read_leaf` of a LoRA run's params), as a PEFT adapter directory; with
    `reward`, the head too (see the module docstring). Returns `out_dir`."""
    from safetensors.numpy import save_file

    if not config.lora_rank:
        raise ConfigError("the model has no LoRA adapters (lora_rank 0): export it as plain HF")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise CheckpointError(f"{out_dir}: exists and is not empty; choose a new directory")
    np_dtype = np.dtype(dtype if dtype != "bfloat16" else "float32")
    if dtype == "bfloat16":
        import ml_dtypes

        np_dtype = np.dtype(ml_dtypes.bfloat16)
    tensors = {}
    rank = config.lora_rank
    for target in config.lora_targets:
        a_path, b_path = _paths(target)
        for layer in range(config.num_layers):
            a, b = reader(a_path, layer), reader(b_path, layer)
            a_name, b_name = _names(target, layer)
            tensors[a_name] = np.ascontiguousarray(a.reshape(-1, rank).T.astype(np_dtype))
            tensors[b_name] = np.ascontiguousarray(b.reshape(rank, -1).T.astype(np_dtype))
    head = {}
    if reward:
        kernel, bias = reader(REWARD_KERNEL, None), reader(REWARD_BIAS, None)
        direction, _ = reward_direction(kernel, bias, slot=reward_slot, weights=reward_weights)
        tensors[SCORE] = np.ascontiguousarray(direction.reshape(1, -1).astype(np_dtype))
        head = {"kernel": np.asarray(kernel), "bias": np.asarray(bias)}
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        if head:
            save_file(head, str(tmp / HEAD_FILE))
        settings = adapter_config(config, reward=reward, base_model=base_model)
        (tmp / CONFIG_FILE).write_text(json.dumps(settings, indent=2) + "\n")
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def read_adapter_config(adapter_dir: str | os.PathLike) -> tuple[dict[str, Any], str]:
    """(the LlamaConfig LoRA fields, PEFT's task_type) of a PEFT adapter directory; one-line
    errors for what our adapters cannot represent."""
    path = Path(adapter_dir) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{adapter_dir}: no {CONFIG_FILE}; not a PEFT adapter directory")
    c = json.loads(path.read_text())
    if c.get("peft_type") != "LORA":
        raise CheckpointError(f"{path}: peft_type {c.get('peft_type')!r}; only LORA is read")
    for key, plain in (("use_dora", False), ("use_rslora", False), ("fan_in_fan_out", False)):
        if bool(c.get(key)) != plain:
            raise CheckpointError(f"{path}: {key} is {c.get(key)!r}; only {plain} is supported")
    for key in ("rank_pattern", "alpha_pattern"):
        if c.get(key):
            raise CheckpointError(f"{path}: per-module {key} is not supported")
    if c.get("bias", "none") != "none" or c.get("layers_to_transform") is not None:
        raise CheckpointError(f"{path}: adapter biases and layer subsets are not supported")
    targets = c.get("target_modules")
    if isinstance(targets, str) or not targets:
        raise CheckpointError(f"{path}: target_modules {targets!r}; expected a list of names")
    unknown = sorted(set(targets) - set(MODULE_OF))
    if unknown:
        raise CheckpointError(f"{path}: target_modules {unknown} are not Llama projections")
    order = [t for t in MODULE_OF if t in targets]  # a set in PEFT: any order
    fields = {
        "lora_rank": int(c["r"]),
        "lora_alpha": float(c["lora_alpha"]),
        "lora_targets": tuple(order),
        "lora_dropout": float(c.get("lora_dropout") or 0.0),
    }
    return fields, c.get("task_type") or "CAUSAL_LM"


def adapter_reader(config: LlamaConfig, adapter_dir: str | os.PathLike) -> Reader:
    """`reader(path, layer)` of our adapter leaves (and the reward head, when the directory
    has one) from a PEFT adapter directory, for `config` (with its LoRA fields)."""
    from safetensors import safe_open

    weights = Path(adapter_dir) / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{adapter_dir}: no {WEIGHTS_FILE}")
    shapes = _leaf_shapes(config)
    handle = safe_open(str(weights), framework="numpy")
    names = set(handle.keys())
    expected = {
        n for t in config.lora_targets for i in range(config.num_layers) for n in _names(t, i)
    }
    missing, extra = sorted(expected - names), sorted(names - expected - {SCORE})
    if missing or extra:
        raise CheckpointError(
            f"{weights}: " + (f"lacks {missing[:3]}" if missing else f"has unexpected {extra[:3]}")
        )
    head_file = Path(adapter_dir) / HEAD_FILE
    by_path = {}
    for target in config.lora_targets:
        a_path, b_path = _paths(target)
        by_path[a_path] = (target, 0)
        by_path[b_path] = (target, 1)

    def reader(path: tuple[str, ...], layer: int | None) -> np.ndarray:
        if path in by_path:
            target, which = by_path[path]
            tensor = handle.get_tensor(_names(target, layer)[which]).astype(np.float32)
            shape = shapes[path][1:]
            return tensor.T.reshape(shape)
        if path in (REWARD_KERNEL, REWARD_BIAS):
            if head_file.is_file():
                from safetensors.numpy import load_file

                return load_file(str(head_file))[path[-1]]
            if SCORE not in names:
                raise CheckpointError(
                    f"{weights}: no {SCORE} (modules_to_save) for the reward head"
                )
            # A PEFT head from elsewhere: its one row into slot 4 of a 9-slot head, as
            # `hf_llama.from_hf_layout` reads HF reward heads.
            score = handle.get_tensor(SCORE).astype(np.float32)
            if path == REWARD_BIAS:
                return np.zeros(NUM_ATTRIBUTES, np.float32)
            kernel = np.zeros((score.shape[1], NUM_ATTRIBUTES), np.float32)
            kernel[:, HELPFULNESS_SLOT] = score[0]
            return kernel
        raise KeyError(path)

    return reader


def _leaf_shapes(config: LlamaConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    import jax

    flat = jax.tree_util.tree_flatten_with_path(abstract_params(config))[0]
    return {tuple(k.key for k in p): tuple(v.shape) for p, v in flat}
