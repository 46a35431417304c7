"""Reward models to and from HF: `LlamaForSequenceClassification` and the Nemotron layout
(`LlamaForCausalLM`, reward = logit of token 0), checked against transformers' own forward."""

import json

import jax
import numpy as np
import pytest

from nemotron_jax.checkpoint import read_metadata, restore_params, save_params
from nemotron_jax.convert import load_hf, read_reward_head_info, save_hf
from nemotron_jax.convert.hf_llama import HFCheckpoint
from nemotron_jax.errors import CheckpointError, ConfigError
from nemotron_jax.models.llama import LlamaConfig, init_params
from nemotron_jax.models.reward import (
    RewardModel,
    init_reward_params,
    last_token_index,
    scalar_reward,
)
from tests import tolerances
from tests.test_tools import run_tool

pytestmark = pytest.mark.hf

PAD = 0
LENGTHS = [12, 7, 3, 9]
# Non-trivial merge weights over the 9 head outputs.
WEIGHTS = [0.0, 0.5, -1.0, 0.0, 1.0, 0.25, 0.0, 2.0, -0.5]


def _config(**changes) -> LlamaConfig:
    base = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=96,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        rope_original_max_position_embeddings=32,
        bos_token_id=1,
        eos_token_id=(2,),
        pad_token_id=PAD,
    )
    return base.replace(**changes)


def _reward_params(config, seed=0):
    """Random reward-model params with weights of std 0.1 (std 0.02 would make attention nearly
    uniform), non-unit norms, a head of std 1 and a nonzero bias, so rewards are O(10)."""
    rng = np.random.default_rng(seed)
    params = init_reward_params(config, jax.random.PRNGKey(seed))

    def perturb(path, x):
        name = jax.tree_util.keystr(path)
        if "scale" in name:
            return (1.0 + 0.2 * rng.standard_normal(x.shape)).astype(np.float32)
        if "bias" in name:  # clearly nonzero, so a bias not accounted for fails the checks
            return (1.0 + rng.standard_normal(x.shape)).astype(np.float32)
        std = 1.0 if "reward_head" in name else 0.1
        return (std * rng.standard_normal(x.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(perturb, params)


def _batch(vocab):
    """Right-padded with PAD; row 0 holds PAD inside its text (HF skips only trailing pads)."""
    rng = np.random.default_rng(1)
    t = max(LENGTHS)
    tokens = rng.integers(3, vocab, size=(len(LENGTHS), t))
    tokens[0, 4] = PAD
    mask = (np.arange(t)[None, :] < np.asarray(LENGTHS)[:, None]).astype(np.int32)
    return np.where(mask, tokens, PAD), mask


def _ours(config, params, tokens, mask, **reward_args):
    outputs = RewardModel(config).apply({"params": params}, tokens, attention_mask=mask)
    return np.asarray(scalar_reward(outputs, **reward_args))


def _hf_forward(model, tokens, mask):
    import torch

    with torch.no_grad():
        out = model(
            input_ids=torch.as_tensor(tokens, dtype=torch.long),
            attention_mask=torch.as_tensor(mask, dtype=torch.long),
        )
    return out.logits.float().numpy()


def _hf_seqcls_reward(hf_dir, tokens, mask):
    import transformers

    model = transformers.LlamaForSequenceClassification.from_pretrained(hf_dir).eval()
    return _hf_forward(model, tokens, mask)[:, 0]


def _hf_nemotron_reward(model, tokens, mask):
    """The logit of token 0 at each row's last real position."""
    logits = _hf_forward(model, tokens, mask)
    return logits[np.arange(len(tokens)), mask.sum(-1) - 1, 0]


@pytest.fixture(scope="module")
def rm(tmp_path_factory):
    """A tiny reward model, its batch and rewards, and its exports to both HF kinds."""
    config = _config()
    params = _reward_params(config)
    tokens, mask = _batch(config.vocab_size)
    d = tmp_path_factory.mktemp("rm")
    save_hf(d / "seqcls", config, params, kind="sequence_classification")
    save_hf(d / "nemotron", config, params, kind="nemotron_reward")
    return {
        "config": config,
        "params": params,
        "tokens": tokens,
        "mask": mask,
        "ours": _ours(config, params, tokens, mask),
        "bias": float(params["reward_head"]["bias"][4]),
        "dir": d,
    }


# --- export ------------------------------------------------------------------------------


def test_sequence_classification_export_matches_transformers(rm):
    d = rm["dir"] / "seqcls"
    hf_config = json.loads((d / "config.json").read_text())
    assert hf_config["architectures"] == ["LlamaForSequenceClassification"]
    assert hf_config["num_labels"] == 1 and hf_config["pad_token_id"] == PAD
    ckpt = HFCheckpoint(d)
    assert "lm_head.weight" not in ckpt.names and ckpt.info("score.weight")[1] == (1, 64)
    info = read_reward_head_info(d)
    assert info["dropped_bias"] == rm["bias"] and info["reward_slot"] == 4

    # HF pools at the rightmost id != pad_token_id: our last real token for these rows.
    tokens, mask = rm["tokens"], rm["mask"]
    hf_index = (np.arange(tokens.shape[1]) * (tokens != PAD)).argmax(-1)
    assert np.array_equal(hf_index, np.asarray(last_token_index(mask)))
    hf = _hf_seqcls_reward(d, tokens, mask)
    assert np.abs(hf - (rm["ours"] - rm["bias"])).max() <= tolerances.LOGITS_F32
    assert np.abs(rm["ours"]).max() > 1.0  # rewards are not trivially small


def test_merge_weights_export(rm, tmp_path):
    params, config = rm["params"], rm["config"]
    save_hf(tmp_path / "hf", config, params, kind="sequence_classification", reward_weights=WEIGHTS)
    dropped = float(np.asarray(params["reward_head"]["bias"], np.float64) @ WEIGHTS)
    info = read_reward_head_info(tmp_path / "hf")
    assert info["reward_slot"] is None and info["reward_weights"] == WEIGHTS
    assert info["dropped_bias"] == pytest.approx(dropped, abs=1e-12)
    ours = _ours(config, params, rm["tokens"], rm["mask"], weights=WEIGHTS)
    hf = _hf_seqcls_reward(tmp_path / "hf", rm["tokens"], rm["mask"])
    assert np.abs(hf - (ours - dropped)).max() <= tolerances.LOGITS_F32


def test_nemotron_reward_export_matches_transformers(rm):
    import torch
    import transformers

    d = rm["dir"] / "nemotron"
    hf_config = json.loads((d / "config.json").read_text())
    assert hf_config["architectures"] == ["LlamaForCausalLM"]
    assert hf_config["tie_word_embeddings"] is False
    lm_head = HFCheckpoint(d).read("lm_head.weight")
    assert lm_head.shape == (256, 64) and not lm_head[1:].any()
    want = rm["ours"] - rm["bias"]
    tokens, mask = rm["tokens"], rm["mask"]

    model = transformers.LlamaForCausalLM.from_pretrained(d).eval()
    # Right-padded batch: the logit of token 0 at the last real position.
    assert np.abs(_hf_nemotron_reward(model, tokens, mask) - want).max() <= tolerances.LOGITS_F32
    # NVIDIA's model card: generate one token, reward = scores[0][0][0], one unpadded row...
    n = LENGTHS[1]
    out = model.generate(
        torch.as_tensor(tokens[1:2, :n]),
        attention_mask=torch.ones(1, n, dtype=torch.long),
        max_new_tokens=1,
        return_dict_in_generate=True,
        output_scores=True,
    )
    assert abs(out["scores"][0][0][0].item() - want[1]) <= tolerances.LOGITS_F32
    # ...and a left-padded batch (generate's padding side), every row at once.
    t = tokens.shape[1]
    left = np.full_like(tokens, PAD)
    left_mask = np.zeros_like(mask)
    for i, n in enumerate(LENGTHS):
        left[i, t - n :], left_mask[i, t - n :] = tokens[i, :n], 1
    out = model.generate(
        torch.as_tensor(left),
        attention_mask=torch.as_tensor(left_mask),
        max_new_tokens=1,
        return_dict_in_generate=True,
        output_scores=True,
    )
    assert np.abs(out["scores"][0][:, 0].numpy() - want).max() <= tolerances.LOGITS_F32


def test_tied_reward_model_exports_untied_nemotron_head(rm, tmp_path):
    config = rm["config"].replace(tie_word_embeddings=True)
    save_hf(tmp_path / "hf", config, rm["params"], kind="nemotron_reward")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["tie_word_embeddings"] is False
    lm_head = HFCheckpoint(tmp_path / "hf").read("lm_head.weight")
    assert np.array_equal(lm_head[0], rm["params"]["reward_head"]["kernel"][:, 4])


# --- import ------------------------------------------------------------------------------


def _check_imported(config, params, kind, rm, hf_reward):
    assert kind.is_reward and kind.num_attributes == 9
    assert kind.metadata() == {"kind": "reward_model", "num_attributes": 9}
    assert set(params) == {"embed_tokens", "layers", "norm", "reward_head"}
    kernel, bias = params["reward_head"]["kernel"], params["reward_head"]["bias"]
    assert kernel.shape == (64, 9) and kernel.dtype == np.float32
    assert not np.delete(kernel, 4, axis=1).any() and not bias.any()
    assert np.array_equal(kernel[:, 4], rm["params"]["reward_head"]["kernel"][:, 4])
    outputs = RewardModel(config).apply({"params": params}, rm["tokens"], attention_mask=rm["mask"])
    assert np.abs(np.asarray(outputs)[:, 4] - hf_reward).max() <= tolerances.LOGITS_F32


def test_sequence_classification_imports_as_reward_model(rm):
    d = rm["dir"] / "seqcls"
    config, params, kind = load_hf(d, return_kind=True)
    assert kind.kind == "sequence_classification" and config.pad_token_id == PAD
    _check_imported(config, params, kind, rm, _hf_seqcls_reward(d, rm["tokens"], rm["mask"]))


def test_nemotron_reward_imports_as_reward_model_on_request(rm):
    import transformers

    d = rm["dir"] / "nemotron"
    config, params, kind = load_hf(d, as_reward_model=True, return_kind=True)
    assert kind.kind == "nemotron_reward"
    model = transformers.LlamaForCausalLM.from_pretrained(d).eval()
    _check_imported(config, params, kind, rm, _hf_nemotron_reward(model, rm["tokens"], rm["mask"]))
    # Without the flag it is what its config says: a causal LM, lm_head included.
    config, params, kind = load_hf(d, return_kind=True)
    assert kind.kind == "causal_lm" and kind.metadata() == {"kind": "causal_lm"}
    assert params["lm_head"].shape == (64, 256) and "reward_head" not in params


def test_tied_causal_lm_as_reward_model_reads_embedding_row_0(tmp_path):
    from tests.hf_utils import hf_logits, make_hf_llama, padded_batch

    model = make_hf_llama(tie=True)
    model.save_pretrained(tmp_path)
    config, params = load_hf(tmp_path, as_reward_model=True)
    embed = model.model.embed_tokens.weight.detach().numpy()
    assert np.array_equal(params["reward_head"]["kernel"][:, 4], embed[0])
    tokens, mask = padded_batch(config.vocab_size, [10, 4])
    want = hf_logits(model, tokens, mask)[np.arange(2), mask.sum(-1) - 1, 0]
    outputs = RewardModel(config).apply({"params": params}, tokens, attention_mask=mask)
    assert np.abs(np.asarray(outputs)[:, 4] - want).max() <= tolerances.LOGITS_F32


# --- bad input ---------------------------------------------------------------------------


def test_lm_params_as_reward_kind_and_reward_params_as_lm(rm, tmp_path):
    config = rm["config"]
    lm_params = init_params(config, jax.random.PRNGKey(0))
    with pytest.raises(ConfigError, match="exports a reward model: params need a 'reward_head'"):
        save_hf(tmp_path / "a", config, lm_params, kind="sequence_classification")
    with pytest.raises(ConfigError, match="these are reward-model params"):
        save_hf(tmp_path / "b", config, rm["params"], kind="causal_lm")


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"reward_slot": 9}, "reward slot 9 out of range for a head of 9 outputs"),
        ({"reward_weights": [1.0, 2.0]}, "merge weights must be 9 numbers"),
        ({"pad_token_id": 256}, "pad_token_id 256 is not a token id"),
    ],
)
def test_bad_reward_export_arguments(rm, tmp_path, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        save_hf(tmp_path / "o", rm["config"], rm["params"], kind="nemotron_reward", **kwargs)
    assert not (tmp_path / "o").exists()


def test_sequence_classification_needs_a_pad_id(rm, tmp_path):
    config = rm["config"].replace(pad_token_id=None)
    with pytest.raises(ConfigError, match="sequence_classification needs a pad_token_id"):
        save_hf(tmp_path / "o", config, rm["params"], kind="sequence_classification")
    # The Llama-3 vocabulary has a default: <|finetune_right_pad_id|>.
    from nemotron_jax.convert.hf_llama import reward_pad_token_id

    assert reward_pad_token_id(config.replace(vocab_size=128256)) == 128004


def test_pad_id_that_is_an_end_token_warns(rm, tmp_path):
    with pytest.warns(UserWarning, match="also an end-of-sequence id"):
        save_hf(
            tmp_path / "o",
            rm["config"],
            rm["params"],
            kind="sequence_classification",
            pad_token_id=2,
        )


def test_multi_label_classifier_is_refused(rm, tmp_path):
    from safetensors.numpy import load_file, save_file

    d = tmp_path / "hf"
    save_hf(d, rm["config"], rm["params"], kind="sequence_classification")
    tensors = load_file(d / "model.safetensors")
    tensors["score.weight"] = np.concatenate([tensors["score.weight"]] * 2)
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="score.weight has 2 outputs"):
        load_hf(d)


# --- command-line tools ------------------------------------------------------------------


def _save_reward_ckpt(path, config, params):
    metadata = {"model_config": config.to_dict(), "kind": "reward_model", "num_attributes": 9}
    save_params(path, params, metadata=metadata)


def test_cli_round_trip(rm, tmp_path):
    config, params = rm["config"], rm["params"]
    _save_reward_ckpt(tmp_path / "ckpt", config, params)
    (tmp_path / "ckpt" / "tokenizer").mkdir()
    (tmp_path / "ckpt" / "tokenizer" / "tokenizer_config.json").write_text('{"x": 1}')

    for kind in ("sequence_classification", "nemotron_reward"):
        out = tmp_path / kind
        r = run_tool("convert_to_hf.py", "--ckpt", tmp_path / "ckpt", "--out", out, "--kind", kind)
        assert r.returncode == 0, r.stderr
        assert f"dropped head bias {rm['bias']:.9g}" in r.stdout, r.stdout
        # The streamed export is the in-memory one, tensor for tensor.
        want, got = HFCheckpoint(rm["dir"] / _fixture_name(kind)), HFCheckpoint(out)
        assert set(want.names) == set(got.names)
        assert all(np.array_equal(want.read(n), got.read(n)) for n in want.names)
        assert (out / "tokenizer_config.json").read_text() == '{"x": 1}'

    hf_reward = _hf_seqcls_reward(tmp_path / "sequence_classification", rm["tokens"], rm["mask"])
    assert np.abs(hf_reward - (rm["ours"] - rm["bias"])).max() <= tolerances.LOGITS_F32

    for kind, flags in (
        ("sequence_classification", []),
        ("nemotron_reward", ["--as-reward-model"]),
    ):
        back = tmp_path / f"back_{kind}"
        r = run_tool("convert_from_hf.py", "--hf-dir", tmp_path / kind, "--out", back, *flags)
        assert r.returncode == 0, r.stderr
        metadata = read_metadata(back)
        assert metadata["kind"] == "reward_model" and metadata["num_attributes"] == 9
        assert LlamaConfig.from_dict(metadata["model_config"]) == config
        restored = jax.tree.map(np.asarray, restore_params(back))
        kernel = restored["reward_head"]["kernel"]
        assert np.array_equal(kernel[:, 4], params["reward_head"]["kernel"][:, 4])
        assert not restored["reward_head"]["bias"].any()
        outputs = RewardModel(config).apply(
            {"params": restored}, rm["tokens"], attention_mask=rm["mask"]
        )
        assert np.abs(np.asarray(outputs)[:, 4] - hf_reward).max() <= tolerances.LOGITS_F32
        assert (back / "tokenizer" / "tokenizer_config.json").read_text() == '{"x": 1}'


def _fixture_name(kind):
    return {"sequence_classification": "seqcls", "nemotron_reward": "nemotron"}[kind]


def test_cli_kind_mismatch_is_one_line(rm, tmp_path):
    config = rm["config"]
    _save_reward_ckpt(tmp_path / "rm", config, rm["params"])
    lm_params = init_params(config, jax.random.PRNGKey(0))
    save_params(tmp_path / "lm", lm_params, metadata={"model_config": config.to_dict()})
    cases = [
        ("rm", "causal_lm", "is a reward model (metadata kind 'reward_model')"),
        ("lm", "nemotron_reward", "needs a reward-model checkpoint"),
    ]
    for ckpt, kind, message in cases:
        r = run_tool(
            "convert_to_hf.py", "--ckpt", tmp_path / ckpt, "--out", tmp_path / "o", "--kind", kind
        )
        assert r.returncode == 2
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr
        assert not (tmp_path / "o").exists()
