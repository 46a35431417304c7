"""Every experiment config builds in smoke and full form, and its state eval_shapes; every knob
is reachable from `experiments/run.py`'s command line, and a bad value fails in one line."""

import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import pytest

from nemotron_jax import artifact, sharding
from nemotron_jax.optim import make_optimizer
from nemotron_jax.train import objectives

CONFIG_DIR = Path(__file__).resolve().parents[1] / "experiments" / "configs"
CONFIGS = sorted(p.stem for p in CONFIG_DIR.glob("*.py") if p.stem not in ("__init__", "common"))


def _configs(name, arg):
    c = importlib.import_module(f"experiments.configs.{name}").get_config(arg)
    return [c.stages[k] for k in sorted(c.stages)] if "stages" in c else [c]


def _eval_shape_state(config):
    objective = objectives.build(config)
    tx = make_optimizer(config.optim, config.num_steps)

    def init():
        params = objective.init(jax.random.PRNGKey(0))
        return {"params": params, "opt_state": tx.init(params)}

    return jax.eval_shape(init)


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("arg", ["smoke", "", "model=llama3.1-70b"])
def test_config_builds_and_state_eval_shapes(name, arg):
    for config in _configs(name, arg):
        assert config.num_steps > 0 and config.batch_size > 0
        state = _eval_shape_state(config)
        n = sum(x.size for x in jax.tree.leaves(state["params"]))
        if "70b" in arg:
            assert n > 69e9  # 70.6B less the LM head for reward models
            # float32 master weights and Adam moments, bf16 compute
            assert (config.model.dtype, config.model.param_dtype) == ("bfloat16", "float32")


@pytest.mark.parametrize("name", CONFIGS)
def test_lora_at_real_size_keeps_the_frozen_base_in_bf16_and_trains_float32_adapters(name):
    from flax import traverse_util

    for config in _configs(name, "model=llama3.1-70b,lora=16"):
        assert config.lora.rank == 16
        assert (config.model.dtype, config.model.param_dtype) == ("bfloat16", "bfloat16")
        params = nn.unbox(jax.eval_shape(objectives.build(config).init, jax.random.PRNGKey(0)))
        dtypes = {p[-1]: x.dtype for p, x in traverse_util.flatten_dict(params).items()}
        assert dtypes["q_proj_lora_a"] == dtypes["o_proj_lora_b"] == jax.numpy.float32
        assert dtypes["q_proj"] == jax.numpy.bfloat16
    for config in _configs(name, "smoke,lora=4"):  # smoke runs stay float32 throughout
        assert config.lora.rank == 4 and config.model.param_dtype == "float32"


def test_unknown_arg_is_rejected():
    with pytest.raises(ValueError, match="unknown config arg 'lr'"):
        _configs("rm_bt", "lr=3")


# --- every knob is reachable from the command line -------------------------------------------

SMOKE_RUN = [
    "--config",
    str(CONFIG_DIR / "rm_regression.py") + ":smoke",
    "--config.num_steps=2",
    "--config.log_every=1",
    "--config.eval_every=2",
    "--config.checkpoint_every=2",
    "--config.progress=False",
]


def _run(workdir, *flags):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    script = CONFIG_DIR.parents[0] / "run.py"
    args = [sys.executable, str(script), "--workdir", str(workdir), *SMOKE_RUN, *flags]
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)


def test_run_reaches_attention_impl_and_sharding_rules(tmp_path):
    rules = tuple(
        ("embed", None) if name == "embed" else (name, axes)
        for name, axes in sharding.DEFAULT_RULES
    )
    r = _run(
        tmp_path,
        "--config.model.attention_impl=xla",
        f"--config.sharding_rules={rules!r}",
    )
    assert r.returncode == 0, r.stderr
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model"]["attention_impl"] == "xla"
    assert ["embed", None] in saved["sharding_rules"]
    assert artifact.load(tmp_path / "params", restore=False).config.attention_impl == "xla"


@pytest.mark.parametrize(
    "flag,message",
    [
        ("--config.model.attention_impl=flash", "attention_impl is 'flash'; choose from"),
        ("--config.sharding_rules=(('embed', 'model'),)", "no mesh axis 'model'; choose from"),
    ],
)
def test_run_rejects_an_unknown_value_in_one_line(tmp_path, flag, message):
    r = _run(tmp_path, flag)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: config."), r.stderr
    assert message in lines[0], lines[0]


def test_no_config_field_is_read_with_a_hidden_default():
    """Every field is declared in experiments/configs/common.py, so none is read with .get."""
    package = CONFIG_DIR.parents[1] / "nemotron_jax"
    pattern = re.compile(r"\b(config|stage|stage_config|rl|optim)(\.\w+)*\.get\(")
    offenders = [
        f"{path.relative_to(package)}:{i}"
        for path in package.rglob("*.py")
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not offenders, offenders
