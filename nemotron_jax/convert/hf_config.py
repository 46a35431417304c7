"""The HF `config.json` <-> `LlamaConfig` field mapping, beside the tensor table of
`hf_llama.py`: the hub form that real Llama-3.1 checkpoints use (`rope_scaling` + `rope_theta`)
and the transformers-v5 form (`rope_parameters`). Settings the model cannot honour raise.
"""

from __future__ import annotations

from typing import Any

from nemotron_jax.errors import ConfigError
from nemotron_jax.models.llama import DTYPES, ROPE_TYPES, LlamaConfig


def config_from_hf(hf: dict[str, Any], **overrides: Any) -> LlamaConfig:
    """The `LlamaConfig` of an HF `config.json` dict (either form), with field `overrides`."""
    return LlamaConfig(**{**_fields_from_hf(hf), **overrides})


def config_to_hf(config: LlamaConfig, architecture: str = "LlamaForCausalLM") -> dict[str, Any]:
    """The HF `config.json` dict in the hub form (transformers v4 and v5 both read it)."""
    rope_scaling = None
    if config.rope_type == "llama3":
        rope_scaling = {
            "rope_type": "llama3",
            "factor": config.rope_factor,
            "low_freq_factor": config.rope_low_freq_factor,
            "high_freq_factor": config.rope_high_freq_factor,
            "original_max_position_embeddings": config.rope_original_max_position_embeddings,
        }
    eos = config.eos_token_id[0] if len(config.eos_token_id) == 1 else list(config.eos_token_id)
    return {
        "architectures": [architecture],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": rope_scaling,
        "tie_word_embeddings": config.tie_word_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "initializer_range": 0.02,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": eos,
        "pad_token_id": config.pad_token_id,
        "torch_dtype": config.param_dtype,
        "use_cache": True,
    }


# HF config keys whose value must be exactly this for the model here to be the same model.
_HF_REQUIRED = {
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "pretraining_tp": 1,
}


def _fields_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    model_type = hf.get("model_type", "llama")
    if model_type != "llama":
        raise ConfigError(f"config.json model_type is {model_type!r}; only 'llama' is supported")
    for key, want in _HF_REQUIRED.items():
        if key in hf and hf[key] != want:
            raise ConfigError(f"unsupported config field {key}={hf[key]!r} (need {want!r})")
    for key in ("sliding_window", "layer_types", "quantization_config"):
        if hf.get(key) not in (None, [], {}) and not (
            key == "layer_types" and set(hf[key]) <= {"full_attention"}
        ):
            raise ConfigError(f"unsupported config field {key}={hf[key]!r}")
    try:
        heads = hf["num_attention_heads"]
        fields = {
            "vocab_size": hf["vocab_size"],
            "hidden_size": hf["hidden_size"],
            "intermediate_size": hf["intermediate_size"],
            "num_layers": hf["num_hidden_layers"],
            "num_heads": heads,
            "num_kv_heads": hf.get("num_key_value_heads") or heads,
        }
    except KeyError as e:
        raise ConfigError(f"config.json lacks required field {e.args[0]!r}") from None
    fields["head_dim"] = hf.get("head_dim") or fields["hidden_size"] // heads
    fields["rms_norm_eps"] = hf.get("rms_norm_eps", 1e-6)
    fields["max_position_embeddings"] = hf.get("max_position_embeddings", 2048)
    fields["tie_word_embeddings"] = bool(hf.get("tie_word_embeddings", False))
    if hf.get("bos_token_id") is not None:
        fields["bos_token_id"] = hf["bos_token_id"]
    if hf.get("eos_token_id") is not None:
        eos = hf["eos_token_id"]
        fields["eos_token_id"] = tuple(eos) if isinstance(eos, list | tuple) else (eos,)
    fields["pad_token_id"] = hf.get("pad_token_id")
    dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    if dtype not in DTYPES:
        raise ConfigError(f"unsupported config field torch_dtype={dtype!r}; use {list(DTYPES)}")
    fields["param_dtype"] = fields["dtype"] = dtype

    # transformers v5 nests everything, rope_theta included, under rope_parameters.
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    fields["rope_theta"] = float(theta)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ConfigError(
            f"unsupported rope type {rope_type!r} in config.json; supported: {list(ROPE_TYPES)}"
        )
    if rope.get("attention_factor") not in (None, 1, 1.0):
        raise ConfigError(f"unsupported rope attention_factor={rope['attention_factor']!r}")
    fields["rope_type"] = rope_type
    if rope_type == "llama3":
        try:
            fields["rope_factor"] = float(rope["factor"])
            fields["rope_low_freq_factor"] = float(rope["low_freq_factor"])
            fields["rope_high_freq_factor"] = float(rope["high_freq_factor"])
            fields["rope_original_max_position_embeddings"] = int(
                rope["original_max_position_embeddings"]
            )
        except KeyError as e:
            raise ConfigError(f"llama3 rope scaling lacks field {e.args[0]!r}") from None
    return fields
