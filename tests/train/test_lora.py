"""LoRA through the one loop: resume is exact, the adapters-off reference equals the base
loaded on its own, and the PEFT export loads in `peft` with equal logits and imports back
bit-exactly."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import sft
from nemotron_jax import artifact, checkpoint, sharding
from nemotron_jax.errors import ConfigError
from nemotron_jax.experiment import run_experiment
from nemotron_jax.models import lora
from nemotron_jax.models.llama import Llama
from nemotron_jax.train.rollouts import sequence_logprobs
from tests import tolerances
from tests.test_tools import run_tool
from tests.train.test_loop import _smoke, _train_losses

STEPS = dict(num_steps=4, log_every=1, eval_every=4, checkpoint_every=2)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    run_experiment(_smoke(sft), str(root / "base"))
    arg = "lora=4"
    changes = {**STEPS, "init_from": str(root / "base" / "params"), "optim.lr": 1e-2}
    run_experiment(_smoke(sft, arg, **changes), str(root / "lora"))
    return root, arg, changes


def test_resume_is_exact(runs, tmp_path):
    root, arg, changes = runs
    run_experiment(_smoke(sft, arg, **{**changes, "num_steps": 2}), str(tmp_path / "b"))
    run_experiment(_smoke(sft, arg, **changes), str(tmp_path / "b"))
    a, b = _train_losses(root / "lora"), _train_losses(tmp_path / "b")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    assert all(a[s] == b[s] for s in a), (a, b)


def test_checkpoints_hold_no_frozen_base(runs):
    import orbax.checkpoint as ocp
    from flax import traverse_util

    root, _, _ = runs
    step = root / "lora" / "checkpoints" / "4"
    saved = ocp.StandardCheckpointer().restore(step / "state")["params"]
    paths = list(traverse_util.flatten_dict(saved))
    assert paths and all(lora.is_trainable(p) for p in paths), paths
    assert any(lora.is_adapter(p) for p in paths)
    frozen = lora.split(artifact.load(root / "lora" / "params").params)[1]
    fingerprint = json.loads((step / "base" / "metadata").read_text())["fingerprint"]
    assert fingerprint == int(lora.fingerprint(frozen))


def test_resume_on_another_base_fails_naming_the_key(runs, tmp_path):
    root, arg, changes = runs
    shutil.copytree(root / "base" / "params", tmp_path / "base")
    short = {**changes, "init_from": str(tmp_path / "base"), "num_steps": 2}
    run_experiment(_smoke(sft, arg, **short), str(tmp_path / "run"))
    run_experiment(_smoke(sft, seed=7), str(tmp_path / "other"))  # another base, same path
    shutil.rmtree(tmp_path / "base")
    shutil.copytree(tmp_path / "other" / "params", tmp_path / "base")
    with pytest.raises(ConfigError, match=r"config\.init_from .* the frozen base differs"):
        run_experiment(_smoke(sft, arg, **{**short, "num_steps": 4}), str(tmp_path / "run"))


def test_adapters_off_reference_equals_the_base_loaded_alone(runs):
    root, _, _ = runs
    trained = artifact.load(root / "lora" / "params")
    assert trained.config.lora_rank == 4
    mesh, rules = sharding.make_mesh((1, -1, 1)), sharding.DEFAULT_RULES
    base = artifact.load_frozen(root / "base" / "params", trained.config, mesh, rules, what="ref")
    tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 16), 4, 200)
    mask = jnp.ones_like(tokens)
    off = sequence_logprobs(
        Llama(trained.config), lora.adapters_off(trained.params), tokens, mask, "chunked"
    )
    alone = sequence_logprobs(
        Llama(lora.base_config(trained.config)), base, tokens, mask, "chunked"
    )
    on = sequence_logprobs(Llama(trained.config), trained.params, tokens, mask, "chunked")
    assert float(jnp.abs(on - alone).max()) > 1e-3  # the adapters trained
    assert float(jnp.abs(off - alone).max()) <= tolerances.SHARDED_F32


@pytest.mark.hf
def test_peft_export_loads_with_equal_logits_and_imports_back_exactly(runs, tmp_path):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from transformers import LlamaForCausalLM

    root, _, _ = runs
    ckpt = root / "lora" / "params"
    for flag, out in (("--base-only", "base"), ("--merge-lora", "merged")):
        r = run_tool("convert_to_hf.py", "--ckpt", ckpt, "--out", tmp_path / out, flag)
        assert r.returncode == 0, r.stderr
    r = run_tool(
        "convert_to_hf.py", "--ckpt", ckpt, "--out", tmp_path / "adapter", "--kind", "peft"
    )
    assert r.returncode == 0, r.stderr
    r = run_tool("convert_to_hf.py", "--ckpt", ckpt, "--out", tmp_path / "plain")
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "--merge-lora" in r.stderr

    trained = artifact.load(ckpt)
    tokens = np.random.default_rng(0).integers(4, 200, (2, 12))
    ours = np.asarray(Llama(trained.config).apply({"params": trained.params}, jnp.asarray(tokens)))
    base = LlamaForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, tmp_path / "adapter")
    keys = model.load_adapter(tmp_path / "adapter", adapter_name="again")
    assert not keys.unexpected_keys
    assert not [k for k in keys.missing_keys if "lora_" in k]
    model.set_adapter("default")
    merged = LlamaForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    with torch.no_grad():
        theirs = model(torch.tensor(tokens)).logits.numpy()
        merged_logits = merged(torch.tensor(tokens)).logits.numpy()
    assert np.abs(theirs - ours).max() <= tolerances.LOGITS_F32
    assert np.abs(merged_logits - ours).max() <= tolerances.LOGITS_F32

    r = run_tool(
        "convert_from_hf.py", "--hf-dir", tmp_path / "base", "--peft-adapter",
        tmp_path / "adapter", "--out", tmp_path / "back", "--tokenizer", "none",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    saved, back = checkpoint.saved_leaves(ckpt), checkpoint.saved_leaves(tmp_path / "back")
    assert set(saved) == set(back)
    for leaf in saved:
        a, b = checkpoint.read_leaf(ckpt, leaf), checkpoint.read_leaf(tmp_path / "back", leaf)
        assert a.dtype == b.dtype and np.array_equal(a, b), leaf
