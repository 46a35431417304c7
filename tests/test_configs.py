"""Every experiment config builds in smoke and full form, and its state eval_shapes."""

import importlib
from pathlib import Path

import jax
import pytest

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
            assert config.model.param_dtype == "bfloat16"


def test_unknown_arg_is_rejected():
    with pytest.raises(ValueError, match="unknown config arg 'lr'"):
        _configs("rm_bt", "lr=3")
