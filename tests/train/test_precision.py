"""The precision policy: float32 master parameters and Adam moments with bf16 compute train like
a float32 run at NeMo's learning rate; pure-bf16 parameters lose most updates and say so."""

import flax.linen as nn
import jax
import numpy as np

from experiments.configs import rm_bt
from nemotron_jax.experiment import run_experiment
from nemotron_jax.optim import make_optimizer
from nemotron_jax.train import objectives
from nemotron_jax.train.steps import finish_metrics, make_train_step
from tests import tolerances

STEPS = 20
LR = 1e-6  # NeMo's reward-model rate (stage 2 of the recipe)


def _train(dtype: str, param_dtype: str):
    """20 Scaled-BT steps of the tiny model from one initialisation on one batch: the start and
    end parameters (as float32) and the per-step metrics."""
    config = rm_bt.get_config("smoke")
    config.model.dtype, config.model.param_dtype = dtype, param_dtype
    config.optim.lr, config.optim.warmup_steps = LR, 0
    objective = objectives.build(config)
    batch = objective.make_data(None, None).train.produce(None, 0)[0][0]
    tx = make_optimizer(config.optim, STEPS)
    # One float32 initialisation for every run, cast to the run's parameter dtype.
    init = rm_bt.get_config("smoke")
    params32 = nn.unbox(objectives.build(init).init(jax.random.PRNGKey(0)))
    params = jax.tree.map(lambda x: x.astype(param_dtype), params32)
    state = {"step": np.int32(0), "params": params, "opt_state": tx.init(params)}
    step = jax.jit(make_train_step(objective.apply, objective.loss, tx))
    history = []
    for _ in range(STEPS):
        state, metrics = step(state, batch)
        history.append(finish_metrics(jax.device_get(metrics)))
    start = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
    end = jax.tree.map(lambda x: np.asarray(x, np.float32), state["params"])
    return start, end, history


def _flat(tree):
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


def test_fp32_master_weights_with_bf16_compute_train_like_float32():
    start, end32, hist32 = _train("float32", "float32")
    _, end_mixed, hist_mixed = _train("bfloat16", "float32")
    delta32, delta_mixed = _flat(end32) - _flat(start), _flat(end_mixed) - _flat(start)
    # Every weight moves in both runs (Adam's first steps move each by about lr), by the same
    # amount up to the bf16 noise in the gradients.
    assert np.mean(delta32 != 0) > 0.99 and np.mean(delta_mixed != 0) > 0.99
    cosine = delta32 @ delta_mixed / (np.linalg.norm(delta32) * np.linalg.norm(delta_mixed))
    assert cosine >= 1 - tolerances.MIXED_PRECISION_UPDATE_COSINE, cosine
    ratio = np.linalg.norm(delta_mixed) / np.linalg.norm(delta32)
    assert abs(ratio - 1) <= tolerances.MIXED_PRECISION_UPDATE_NORM, ratio
    for a, b in zip(hist32, hist_mixed, strict=True):
        assert abs(a["loss"] - b["loss"]) <= tolerances.BF16 * max(1.0, abs(a["loss"]))
    assert "lost_update_fraction" not in hist_mixed[-1]  # float32 parameters lose nothing


def test_pure_bf16_parameters_lose_most_updates_and_report_it():
    """At lr 1e-6 most updates are below a bf16 weight's resolution (2^-9 of it): each step
    reports them lost, and what does land is not the float32 run's update."""
    start, end32, _ = _train("float32", "float32")
    _, end, hist = _train("bfloat16", "bfloat16")
    assert all(h["lost_update_fraction"] > 0.9 for h in hist[1:]), hist  # step 1: lr 0, no update
    delta32, delta = _flat(end32) - _flat(start), _flat(end) - _flat(start)
    cosine = delta32 @ delta / (np.linalg.norm(delta32) * np.linalg.norm(delta))
    assert cosine < 0.5, cosine


def test_the_loop_warns_about_pure_bf16_and_lost_updates(tmp_path, capsys):
    config = rm_bt.get_config("smoke")
    config.progress = False
    config.model.dtype, config.model.param_dtype = "bfloat16", "bfloat16"
    config.optim.lr = LR
    run_experiment(config, str(tmp_path / "run"))
    err = capsys.readouterr().err
    assert "warning: config.model.param_dtype is bfloat16" in err
    assert "parameter updates were below the parameters' resolution and lost" in err


def test_real_size_configs_keep_float32_master_weights():
    for model in ("llama3.1-8b", "llama3.1-70b"):
        config = rm_bt.get_config(f"model={model}")
        assert (config.model.dtype, config.model.param_dtype) == ("bfloat16", "float32")
        assert config.micro_batch_size == 1
