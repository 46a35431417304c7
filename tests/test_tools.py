"""The command-line tools end to end: HF -> orbax -> HF, parity check, one-line errors."""

import os
import subprocess
import sys

import numpy as np
import pytest

from nemotron_jax import artifact
from nemotron_jax.checkpoint import read_metadata
from nemotron_jax.convert import load_hf
from nemotron_jax.convert.hf_llama import HFCheckpoint
from tests.conftest import REPO
from tests.hf_utils import make_hf_llama

pytestmark = pytest.mark.hf


def run_tool(name, *args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    return subprocess.run(
        [sys.executable, str(REPO / "tools" / name), *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_hf_to_orbax_to_hf_bit_exact(tmp_path):
    torch = pytest.importorskip("torch")
    make_hf_llama(num_kv_heads=4).to(torch.bfloat16).save_pretrained(tmp_path / "src")
    (tmp_path / "src" / "tokenizer_config.json").write_text('{"x": 1}')

    r = run_tool("convert_from_hf.py", "--hf-dir", tmp_path / "src", "--out", tmp_path / "ckpt")
    assert r.returncode == 0, r.stderr
    model = artifact.load(tmp_path / "ckpt")
    config, params = model.config, model.params
    # How the model reads text is recorded (defaults: the Llama-3.1 tokenizer and template).
    meta = read_metadata(tmp_path / "ckpt")
    assert (meta["kind"], meta["tokenizer"], meta["template"]) == ("causal_lm", "llama3", "llama3")
    ref_config, ref_params = load_hf(tmp_path / "src")
    assert config == ref_config
    got, want = params["layers"]["mlp"]["down_proj"], ref_params["layers"]["mlp"]["down_proj"]
    assert np.array_equal(np.asarray(got).view(np.uint16), want.view(np.uint16))

    r = run_tool(
        "convert_to_hf.py",
        "--ckpt",
        tmp_path / "ckpt",
        "--out",
        tmp_path / "out",
        "--max-shard-gb",
        "0.0001",
    )
    assert r.returncode == 0, r.stderr
    src, out = HFCheckpoint(tmp_path / "src"), HFCheckpoint(tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()
    assert set(src.names) == set(out.names)
    for name in src.names:
        a, b = src.read(name), out.read(name)
        assert a.dtype == b.dtype and np.array_equal(a.view(np.uint16), b.view(np.uint16)), name
    assert (tmp_path / "out" / "tokenizer_config.json").read_text() == '{"x": 1}'

    r = run_tool("check_logits_vs_hf.py", "--hf-dir", tmp_path / "out")
    assert r.returncode == 0 and "PASS" in r.stdout, r.stdout + r.stderr


@pytest.mark.parametrize(
    "tool,args,message",
    [
        ("convert_from_hf.py", ["--hf-dir", "{tmp}/nope", "--out", "{tmp}/c"], "no such directory"),
        ("convert_to_hf.py", ["--ckpt", "{tmp}/nope", "--out", "{tmp}/o"], "no checkpoint at"),
        # Reward kinds are exported (tests/convert/test_hf_reward.py), from a checkpoint.
        (
            "convert_to_hf.py",
            ["--ckpt", "{tmp}", "--out", "{tmp}/o", "--kind", "nemotron_reward"],
            "is not a params checkpoint",
        ),
        ("check_logits_vs_hf.py", ["--hf-dir", "{tmp}"], "config.json: missing"),
    ],
)
def test_bad_input_is_one_line(tmp_path, tool, args, message):
    r = run_tool(tool, *[a.format(tmp=tmp_path) for a in args])
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr


def test_convert_from_hf_refuses_unmapped_and_truncated_tensors(tmp_path):
    """A tensor no parameter reads is refused by name unless --allow-unused; a truncated
    safetensors file is one line naming it."""
    pytest.importorskip("torch")
    from safetensors.numpy import load_file, save_file

    src = tmp_path / "src"
    make_hf_llama().save_pretrained(src)
    tensors = load_file(src / "model.safetensors")
    tensors["model.layers.0.self_attn.q_proj.bias"] = np.zeros(64, np.float32)
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    r = run_tool("convert_from_hf.py", "--hf-dir", src, "--out", tmp_path / "a")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "model.layers.0.self_attn.q_proj.bias" in lines[0] and "--allow-unused" in lines[0]
    r = run_tool("convert_from_hf.py", "--hf-dir", src, "--out", tmp_path / "b", "--allow-unused")
    assert r.returncode == 0, r.stderr

    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) // 2])
    r = run_tool("convert_from_hf.py", "--hf-dir", src, "--out", tmp_path / "c")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "model.safetensors: not a readable safetensors file" in lines[0]


def test_tools_take_a_run_workdir(tmp_path):
    """convert_to_hf, expo and eval_rewardbench read a run's workdir as its params/."""
    import ml_collections

    from nemotron_jax.data.splits import data_dir
    from nemotron_jax.train.objectives.reinforce import write_random_models

    data = ml_collections.ConfigDict(
        {"source": "synthetic", "synthetic_prompts": 200, "synthetic_seed": 0, "tokenizer": "",
         "template": "nemo", "max_len": 64}
    )  # fmt: skip
    model = {"preset": "tiny", "dtype": "float32", "param_dtype": "float32", "remat": "none",
             "num_attributes": 9, "attention_impl": "auto", "overrides": {}}  # fmt: skip
    lora = {"rank": 0, "alpha": 16.0, "targets": ("q_proj",), "dropout": 0.0}
    workdirs = []
    for seed in (0, 1):
        config = ml_collections.ConfigDict(
            {
                "model": model,
                "lora": lora,
                "data": data,
                "seed": seed,
                "init_from": "",
                "rm_from": "random",
            }
        )
        workdir = tmp_path / f"run{seed}"
        path = write_random_models(config, workdir)["rm_from"]
        os.replace(path, workdir / "params")  # where a run leaves its trained model
        workdirs.append(workdir)
    r = run_tool("convert_to_hf.py", "--ckpt", workdirs[0], "--out", tmp_path / "hf",
                 "--kind", "nemotron_reward")  # fmt: skip
    assert r.returncode == 0, r.stderr
    r = run_tool("expo.py", "--base", workdirs[0], "--tuned", workdirs[1], "--alpha", "0.5",
                 "--out", tmp_path / "expo")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "expo" / "tokenizer.model").exists()  # the tuned run's, carried over
    rows = data_dir(data) / "rewardbench" / "filtered.jsonl"
    r = run_tool("eval_rewardbench.py", "--ckpt", workdirs[1], "--data", rows, "--no-progress",
                 "--max-len", "40")  # fmt: skip
    assert r.returncode == 0, r.stderr
    unscored = [x for x in r.stdout.splitlines() if x.startswith("200 rows unscored")]
    assert len(unscored) == 1 and "--max-len 40; --max-len 62 scores them" in unscored[0], r.stdout
