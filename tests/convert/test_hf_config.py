"""The HF config.json <-> LlamaConfig field mapping (no transformers needed)."""

from nemotron_jax.convert import config_from_hf, config_to_hf
from nemotron_jax.models import LlamaConfig

HUB_FORM = {
    "model_type": "llama",
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 131072,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009],
    "torch_dtype": "bfloat16",
    "hidden_act": "silu",
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
}


def test_hub_and_v5_forms_agree():
    v5 = {k: v for k, v in HUB_FORM.items() if k not in ("rope_theta", "rope_scaling")}
    v5["rope_parameters"] = {**HUB_FORM["rope_scaling"], "rope_theta": 500000.0}
    hub, new = config_from_hf(HUB_FORM), config_from_hf(v5)
    assert hub == new
    assert hub == LlamaConfig.preset("llama3.1-8b", dtype="bfloat16", param_dtype="bfloat16")
    assert config_from_hf(config_to_hf(hub)) == hub
