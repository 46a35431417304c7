"""ExPO: exact extrapolation leaf by leaf, head handling, mismatch errors, and the alpha sweep."""

import functools
import json
import os
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import pytest

from nemotron_jax import checkpoint, expo
from nemotron_jax.data.helpsteer2 import RewardBenchRow
from nemotron_jax.data.tokenizer import SentencePieceTokenizer, format_nemo_chat
from nemotron_jax.errors import CheckpointError
from nemotron_jax.eval.rewardbench import encode_pairs, load_reward_model
from nemotron_jax.models.llama import LlamaConfig
from nemotron_jax.models.reward import RewardModel, abstract_reward_params, last_token_index
from tests.conftest import REPO

CONFIG = LlamaConfig.preset("tiny")
FOODS = ["apples", "bread", "cheese", "dates", "eggs", "figs", "grapes", "honey"]
ROWS = [
    RewardBenchRow(
        prompt=f"Which food goes with {food} number {i}?",
        chosen=f"Try {food} with {FOODS[(i + 1) % 8]} and a little salt.",
        rejected=f"No idea about {food}, sorry.",
        subset="synthetic-val",
        id=i,
    )
    for i, food in enumerate(FOODS * 2)
]


def _metadata():
    return {
        "model_config": CONFIG.to_dict(),
        "kind": "reward_model",
        "num_attributes": 9,
        "objective": "scaled_bt",
        "tokenizer": "sentencepiece",
        "template": "nemo",
        "max_len": 96,
    }


def _save(path, params, tokenizer):
    checkpoint.save_params(path, params, metadata=_metadata())
    tokenizer.save(path / "tokenizer.model")
    return path


def _leaves(path):
    return {lp: checkpoint.read_leaf(path, lp) for lp in checkpoint.saved_leaves(path)}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("expo")
    # Trained on the rendered validation chats, so each side fits in ~70 tokens.
    chats = [
        format_nemo_chat(
            [{"role": "user", "content": r.prompt}, {"role": "assistant", "content": x}]
        )
        for r in ROWS
        for x in (r.chosen, r.rejected)
    ]
    tokenizer = SentencePieceTokenizer.train(chats * 3, 500)
    # Random float32 params of the tiny model's shapes (numpy: no model init to compile).
    rng = np.random.default_rng(0)
    shapes = abstract_reward_params(CONFIG)
    base = jax.tree.map(lambda a: rng.normal(0, 0.1, a.shape).astype(np.float32), shapes)
    tuned = jax.tree.map(lambda b: b + rng.normal(0, 0.01, b.shape).astype(np.float32), base)
    return {
        "root": root,
        "tokenizer": tokenizer,
        "base": _save(root / "base", base, tokenizer),
        "tuned": _save(root / "tuned", tuned, tokenizer),
    }


def test_alpha_zero_is_tuned_exactly(models, tmp_path):
    meta = expo.extrapolate(
        models["base"], models["tuned"], tmp_path / "o", alpha=0, progress=False
    )
    got, want = _leaves(tmp_path / "o"), _leaves(models["tuned"])
    assert got.keys() == want.keys()
    for lp in want:
        assert got[lp].dtype == want[lp].dtype and np.array_equal(got[lp], want[lp]), lp
    assert checkpoint.read_metadata(tmp_path / "o") == meta
    assert meta["expo"]["alpha"] == 0.0 and meta["expo"]["include_head"] is True
    assert meta["kind"] == "reward_model" and meta["template"] == "nemo"
    tok = (tmp_path / "o" / "tokenizer.model").read_bytes()
    assert tok == (models["tuned"] / "tokenizer.model").read_bytes()


def test_alpha_one_is_two_tuned_minus_base(models, tmp_path):
    expo.extrapolate(models["base"], models["tuned"], tmp_path / "o", alpha=1.0, progress=False)
    got, t, b = _leaves(tmp_path / "o"), _leaves(models["tuned"]), _leaves(models["base"])
    for lp in t:
        assert got[lp].dtype == np.float32
        # Bit-exact against the formula in float32 (alpha * d == d exactly for alpha = 1) ...
        np.testing.assert_array_equal(got[lp], t[lp] + (t[lp] - b[lp]), err_msg=str(lp))
        # ... which is 2 tuned - base up to float32 rounding of the two forms.
        np.testing.assert_allclose(got[lp], 2 * t[lp] - b[lp], rtol=1e-6, atol=1e-7)


def test_no_head_keeps_the_tuned_head(models, tmp_path):
    out = tmp_path / "o"
    meta = expo.extrapolate(
        models["base"], models["tuned"], out, alpha=0.5, include_head=False, progress=False
    )
    assert meta["expo"]["include_head"] is False
    got, t, b = _leaves(out), _leaves(models["tuned"]), _leaves(models["base"])
    for lp in t:
        if lp[0] == "reward_head":
            np.testing.assert_array_equal(got[lp], t[lp])
        else:
            want = t[lp] + np.float32(0.5) * (t[lp] - b[lp])
            np.testing.assert_array_equal(got[lp], want, err_msg=str(lp))
            assert not np.array_equal(got[lp], t[lp])


def test_stored_dtype_is_kept(tmp_path):
    bf16 = ml_dtypes.bfloat16
    rng = np.random.default_rng(0)
    base = {"layers": {"w": rng.normal(size=(3, 4, 5)).astype(bf16)}, "norm": np.ones(5, bf16)}
    tuned = {"layers": {"w": rng.normal(size=(3, 4, 5)).astype(bf16)}, "norm": np.ones(5, bf16)}
    checkpoint.save_params(tmp_path / "b", base)
    checkpoint.save_params(tmp_path / "t", tuned)
    expo.extrapolate(tmp_path / "b", tmp_path / "t", tmp_path / "o", alpha=0.3, progress=False)
    got = checkpoint.read_leaf(tmp_path / "o", "layers/w")
    t, b = (x["layers"]["w"].astype(np.float32) for x in (tuned, base))
    assert got.dtype == bf16
    np.testing.assert_array_equal(got, (t + np.float32(0.3) * (t - b)).astype(bf16))


def test_mismatched_checkpoints_name_the_leaf(tmp_path):
    w = np.zeros((2, 3, 4), np.float32)
    checkpoint.save_params(tmp_path / "a", {"layers": {"w": w}, "head": np.zeros(3, np.float32)})
    checkpoint.save_params(tmp_path / "b", {"layers": {"w": w[:, :2]}, "head": np.zeros(3)})
    checkpoint.save_params(tmp_path / "c", {"layers": {"w": w}})
    with pytest.raises(CheckpointError, match=r"leaf layers/w: shape \(2, 3, 4\)"):
        expo.extrapolate(tmp_path / "a", tmp_path / "b", tmp_path / "o", alpha=1, progress=False)
    with pytest.raises(CheckpointError, match="leaf head is in base"):
        expo.extrapolate(tmp_path / "a", tmp_path / "c", tmp_path / "o", alpha=1, progress=False)
    assert not (tmp_path / "o").exists()


def _feature_differences(models) -> np.ndarray:
    """h(chosen) - h(rejected) [N, D]: final-norm hidden states at each side's last token."""
    bundle = load_reward_model(models["tuned"])
    encoded = encode_pairs(bundle, ROWS)
    assert len(encoded) == len(ROWS)
    tokens = np.stack([encoded[i]["tokens"] for i in range(len(encoded))])  # [N, 2, T]
    mask = np.stack([encoded[i]["attention_mask"] for i in range(len(encoded))])
    n, _, t = tokens.shape
    params = jax.device_get(bundle.params)
    apply = jax.jit(functools.partial(RewardModel(CONFIG, 9).apply, method="hidden_states"))
    hidden = apply(
        {"params": params}, tokens.reshape(2 * n, t), attention_mask=mask.reshape(2 * n, t)
    )
    last = (
        np.take_along_axis(
            np.asarray(hidden),
            np.asarray(last_token_index(mask.reshape(2 * n, t)))[:, None, None],
            1,
        )[:, 0]
        .reshape(n, 2, -1)
        .astype(np.float64)
    )
    return last[:, 0] - last[:, 1]


def test_sweep_picks_the_best_validation_accuracy(models, tmp_path):
    """Heads are built so that the slot-4 reward gap of row i at alpha is p_i + alpha q_i:
    the first 8 rows are right for alpha < 1.5, the last 8 for alpha > 0.3, so accuracy is 1/2
    at alpha 0, 0.2 and 2 and 1 at 0.5 and 1, where the larger mean gap picks alpha 1."""
    d = _feature_differences(models)  # [16, 64]
    p = np.array([1.5] * 8 + [-0.6] * 8)
    q = np.array([-1.0] * 8 + [2.0] * 8)
    k_tuned = np.linalg.lstsq(d, p, rcond=None)[0]
    k_delta = np.linalg.lstsq(d, q, rcond=None)[0]  # tuned - base
    np.testing.assert_allclose(d @ k_tuned, p, atol=1e-6)

    params = jax.device_get(checkpoint.restore_params(models["tuned"]))
    heads = {"tuned": k_tuned, "base": k_tuned - k_delta}
    for name, k in heads.items():
        kernel = np.array(params["reward_head"]["kernel"])
        kernel[:, 4] = k
        head = {**params["reward_head"], "kernel": kernel}
        _save(tmp_path / name, {**params, "reward_head": head}, models["tokenizer"])

    best, table = expo.sweep(
        tmp_path / "base",
        tmp_path / "tuned",
        [0, 0.5, 1, 2],
        eval_rows=ROWS,
        out_root=tmp_path / "sweep",
    )
    assert [e["accuracy"] for e in table] == [0.5, 1.0, 1.0, 0.5]
    gaps = [e["mean_gap"] for e in table]
    np.testing.assert_allclose(gaps, [0.45, 0.7, 0.95, 1.45], atol=1e-3)
    # alpha 2 has the largest gap but not the best accuracy; the gap only breaks the tie.
    assert best == 1.0
    # keep="best": only the winner's checkpoint is left, and it carries its alpha.
    assert sorted(os.listdir(tmp_path / "sweep")) == ["alpha_1"]
    assert checkpoint.read_metadata(table[2]["path"])["expo"]["alpha"] == 1.0
    assert table[0]["path"] == str(tmp_path / "tuned")

    # The tool's sweep mode writes the same winner to --out.
    val = tmp_path / "val.jsonl"
    val.write_text("".join(json.dumps(r.__dict__) + "\n" for r in ROWS))
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    r = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "expo.py"),
            "--base",
            tmp_path / "base",
            "--tuned",
            tmp_path / "tuned",
            "--alphas",
            "0,1",
            "--val",
            val,
            "--out",
            tmp_path / "best",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "best alpha=1" in r.stdout
    assert checkpoint.read_metadata(tmp_path / "best")["expo"]["alpha"] == 1.0
    assert not (tmp_path / "best.expo-sweep").exists()


def test_pick_best_prefers_accuracy_then_gap():
    table = [
        {"alpha": 0.0, "accuracy": 0.6, "mean_gap": 5.0},
        {"alpha": 0.5, "accuracy": 0.7, "mean_gap": 0.1},
        {"alpha": 1.0, "accuracy": 0.7, "mean_gap": 0.2},
        {"alpha": 2.0, "accuracy": 0.7, "mean_gap": float("nan")},
    ]
    assert expo.pick_best(table)["alpha"] == 1.0
