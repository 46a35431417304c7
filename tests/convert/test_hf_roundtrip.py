"""HF -> nemotron_jax -> HF is bit-exact per tensor; exports reload in transformers."""

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from nemotron_jax.convert import load_hf, save_hf
from nemotron_jax.convert.hf_llama import HFCheckpoint
from nemotron_jax.errors import CheckpointError, ConfigError
from tests import tolerances
from tests.hf_utils import hf_logits, make_hf_llama, padded_batch

pytestmark = pytest.mark.hf


def _tensors(d):
    ckpt = HFCheckpoint(d)
    return {name: ckpt.read(name) for name in ckpt.names}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("tie", [False, True])
def test_round_trip_bit_exact(tmp_path, dtype, tie):
    torch = pytest.importorskip("torch")
    model = make_hf_llama(num_kv_heads=2, tie=tie).to(getattr(torch, dtype))
    model.save_pretrained(tmp_path / "src")
    config, params = load_hf(tmp_path / "src")
    assert config.param_dtype == dtype
    save_hf(tmp_path / "out", config, params)
    src, out = _tensors(tmp_path / "src"), _tensors(tmp_path / "out")
    if tie:  # transformers may or may not serialise the tied head; we never write it
        src.pop("lm_head.weight", None)
    assert sorted(src) == sorted(out)
    for name in src:
        assert src[name].dtype == out[name].dtype, name
        assert src[name].shape == out[name].shape, name
        assert np.array_equal(src[name].view(np.uint8), out[name].view(np.uint8)), name


def test_export_reloads_in_transformers_with_same_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = make_hf_llama(num_kv_heads=4)
    model.save_pretrained(tmp_path / "src")
    config, params = load_hf(tmp_path / "src")
    # Small shards force the sharded layout with its index.
    save_hf(tmp_path / "out", config, params, max_shard_bytes=200_000)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    total = sum(v.nbytes for s in shards for v in load_file(tmp_path / "out" / s).values())
    assert index["metadata"]["total_size"] == total
    hf_config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert hf_config["rope_scaling"]["rope_type"] == "llama3" and "rope_theta" in hf_config

    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    tokens, mask = padded_batch(config.vocab_size, [30, 12])
    want, got = hf_logits(model, tokens, mask), hf_logits(reloaded, tokens, mask)
    assert np.abs(want - got)[mask.astype(bool)].max() <= tolerances.LOGITS_F32
    # And reading the sharded export back gives the same params.
    config2, params2 = load_hf(tmp_path / "out")
    assert config2 == config
    assert all(np.array_equal(a, b) for a, b in zip(_leaves(params), _leaves(params2), strict=True))


def _leaves(tree):
    import jax

    return jax.tree.leaves(tree)


def test_fp16_checkpoint_loads(tmp_path):
    torch = pytest.importorskip("torch")
    make_hf_llama().to(torch.float16).save_pretrained(tmp_path)
    config, params = load_hf(tmp_path)
    assert config.param_dtype == "float16"
    assert params["embed_tokens"].dtype == np.float16


def test_tokenizer_files_are_copied(tmp_path):
    model = make_hf_llama()
    model.save_pretrained(tmp_path / "src")
    (tmp_path / "src" / "tokenizer_config.json").write_text("{}")
    config, params = load_hf(tmp_path / "src")
    save_hf(tmp_path / "out", config, params, tokenizer_dir=tmp_path / "src")
    assert (tmp_path / "out" / "tokenizer_config.json").read_text() == "{}"


# --- bad input ---------------------------------------------------------------------------


@pytest.fixture
def hf_dir(tmp_path):
    make_hf_llama().save_pretrained(tmp_path / "m")
    return tmp_path / "m"


def _rewrite(d, drop=(), reshape=None):
    from safetensors.numpy import save_file

    tensors = load_file(d / "model.safetensors")
    for name in drop:
        tensors.pop(name)
    if reshape:
        tensors[reshape] = tensors[reshape][:-1]
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})


def test_missing_tensors_are_named(hf_dir):
    _rewrite(hf_dir, drop=["model.layers.1.mlp.up_proj.weight"])
    with pytest.raises(CheckpointError, match=r"missing tensors \['model.layers.1.mlp.up_proj"):
        load_hf(hf_dir)


def test_wrong_shape_is_named(hf_dir):
    _rewrite(hf_dir, reshape="model.layers.0.self_attn.k_proj.weight")
    with pytest.raises(CheckpointError, match=r"model.layers.0.self_attn.k_proj.weight has shape"):
        load_hf(hf_dir)


def test_nonexistent_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        load_hf(tmp_path / "nope")


def test_not_a_model_dir(tmp_path):
    with pytest.raises(CheckpointError, match="config.json: missing"):
        load_hf(tmp_path)


def test_unsupported_rope_type(hf_dir):
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    cfg.pop("rope_scaling", None)
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="unsupported rope type 'yarn'"):
        load_hf(hf_dir)


def test_unsupported_field(hf_dir):
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg["attention_bias"] = True
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="attention_bias=True"):
        load_hf(hf_dir)


def test_unsupported_dtype(hf_dir):
    from safetensors.numpy import save_file

    tensors = load_file(hf_dir / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"].astype(np.float64)
    save_file(tensors, hf_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="model.norm.weight has unsupported dtype F64"):
        load_hf(hf_dir)


def test_refuses_to_overwrite(tmp_path, hf_dir):
    config, params = load_hf(hf_dir)
    with pytest.raises(CheckpointError, match="not empty"):
        save_hf(hf_dir, config, params)
