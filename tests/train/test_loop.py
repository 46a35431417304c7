"""The training loop: sharded step parity, gradient accumulation, exact resume, init_from."""

import json

import flax.linen as nn
import jax
import numpy as np
import pytest

from experiments.configs import rm_bt, rm_regression
from nemotron_jax import sharding
from nemotron_jax.errors import ConfigError
from nemotron_jax.experiment import run_experiment
from nemotron_jax.metrics import read_metrics
from nemotron_jax.optim import make_optimizer
from nemotron_jax.train import objectives
from nemotron_jax.train.steps import finish_metrics, make_train_step
from tests import tolerances


def _smoke(module, arg="", **changes):
    c = module.get_config(f"smoke{',' + arg if arg else ''}")
    c.progress = False
    for k, v in changes.items():
        target = c
        *parents, leaf = k.split(".")
        for p in parents:
            target = target[p]
        target[leaf] = v
    return c


def _state_and_batch(config):
    objective = objectives.build(config)
    data = objective.make_data(None, None)
    tx = make_optimizer(config.optim, config.num_steps)
    params = nn.unbox(objective.init(jax.random.PRNGKey(0)))
    state = {"step": np.int32(0), "params": params, "opt_state": tx.init(params)}
    batches, _ = data.train.produce(params, 0)
    return objective, tx, state, batches[0]


@pytest.mark.parametrize("module,arg", [(rm_regression, ""), (rm_bt, "loss=scaled")])
def test_sharded_step_equals_single_device(module, arg):
    config = _smoke(module, arg)
    objective, tx, state, batch = _state_and_batch(config)
    step = make_train_step(objective.apply, objective.loss, tx)
    want_state, want_metrics = jax.jit(step)(state, batch)

    mesh = sharding.make_mesh((2, 2, 2))
    boxed = jax.eval_shape(lambda: {"params": objective.init(jax.random.PRNGKey(0))})
    param_sharding = sharding.shardings_for(boxed, mesh)["params"]
    batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
        sharded = {**state, "params": jax.device_put(state["params"], param_sharding)}
        got_state, got_metrics = jax.jit(step)(sharded, jax.device_put(batch, batch_sharding))
    assert got_state["params"]["layers"]["mlp"]["up_proj"].sharding.spec[1] == "fsdp"
    want, got = finish_metrics(jax.device_get(want_metrics)), finish_metrics(got_metrics)
    assert abs(want["loss"] - got["loss"]) <= tolerances.SHARDED_F32 * max(1, abs(want["loss"]))
    for a, b in zip(
        jax.tree.leaves(want_state["params"]), jax.tree.leaves(got_state["params"]), strict=True
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=tolerances.SHARDED_F32)


def test_grad_accumulation_equals_full_batch():
    config = _smoke(rm_bt, "loss=scaled")
    objective, tx, state, batch = _state_and_batch(config)
    full = jax.jit(make_train_step(objective.apply, objective.loss, tx))(state, batch)
    accum = jax.jit(make_train_step(objective.apply, objective.loss, tx, grad_accum=4))(
        state, batch
    )
    assert abs(finish_metrics(full[1])["loss"] - finish_metrics(accum[1])["loss"]) < 1e-5
    for a, b in zip(
        jax.tree.leaves(full[0]["params"]), jax.tree.leaves(accum[0]["params"]), strict=True
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def _train_losses(workdir):
    return {r["step"]: r["loss"] for r in read_metrics(str(workdir), "train")}


def test_resume_is_exact_and_changes_mesh(tmp_path):
    # Uninterrupted: 6 steps on a (2, 2, 2) mesh, logging every step.
    base = dict(num_steps=6, log_every=1, eval_every=3, checkpoint_every=3, mesh=(2, 2, 2))
    run_experiment(_smoke(rm_bt, "loss=scaled", **base), str(tmp_path / "a"))
    # Interrupted after 3 steps, then resumed on a different mesh (1, 8, 1).
    run_experiment(_smoke(rm_bt, "loss=scaled", **{**base, "num_steps": 3}), str(tmp_path / "b"))
    run_experiment(
        _smoke(rm_bt, "loss=scaled", **{**base, "mesh": (1, -1, 1)}), str(tmp_path / "b")
    )
    a, b = _train_losses(tmp_path / "a"), _train_losses(tmp_path / "b")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    for step in a:
        assert abs(a[step] - b[step]) <= tolerances.SHARDED_F32 * max(1.0, abs(a[step])), step


def test_init_from_regression_keeps_head(tmp_path):
    run_experiment(_smoke(rm_regression), str(tmp_path / "reg"))
    config = _smoke(rm_bt, "loss=scaled", init_from=str(tmp_path / "reg" / "params"))
    objective = objectives.build(config)
    fresh = nn.unbox(jax.jit(objective.init)(jax.random.PRNGKey(1)))
    shardings = jax.tree.map(lambda x: x.sharding, fresh)
    loaded = objective.load_init(config.init_from, fresh, shardings)
    from nemotron_jax.checkpoint import read_leaf

    head = read_leaf(tmp_path / "reg" / "params", ("reward_head", "kernel"))
    np.testing.assert_array_equal(np.asarray(loaded["reward_head"]["kernel"]), head)
    emb = read_leaf(tmp_path / "reg" / "params", ("embed_tokens",))
    np.testing.assert_array_equal(np.asarray(loaded["embed_tokens"]), emb)
    no_head = objective.load_init(config.init_from, fresh, shardings, init_head=False)
    np.testing.assert_array_equal(no_head["reward_head"]["kernel"], fresh["reward_head"]["kernel"])


def test_run_writes_config_metrics_and_report(tmp_path):
    run_experiment(_smoke(rm_regression), str(tmp_path))
    report = json.loads((tmp_path / "data_report.json").read_text())
    assert report["train_examples"] > 0 and "truncated" in report["train_encoding"]
    evals = read_metrics(str(tmp_path), "eval")
    assert evals and "mse" in evals[-1] and "mae/0" not in evals[-1]  # unsupervised slots omitted
    assert (tmp_path / "params").is_dir()


@pytest.mark.parametrize(
    "changes,match",
    [
        (dict(batch_size=6), "not divisible by data-parallel size 8"),
        (dict(mesh=(3, 1, 1)), "needs 3 devices"),
        (dict(objective="hinge"), "config.objective is 'hinge'; choose from"),
        (dict(**{"model.preset": "llama4"}), "config.model.preset is 'llama4'; choose from"),
        (dict(**{"loss.tie_policy": "coin"}), "tie_policy"),
        (dict(**{"loss.slot": 12}), "outside the 9-slot head"),
    ],
)
def test_bad_config_fails_at_start(tmp_path, changes, match):
    config = _smoke(rm_bt, "loss=regular")
    with config.unlocked():
        for k, v in changes.items():
            target = config
            *parents, leaf = k.split(".")
            for p in parents:
                target = target[p]
            target[leaf] = v
    with pytest.raises((ConfigError, ValueError), match=match):
        run_experiment(config, str(tmp_path))


def test_unknown_attribute_fails(tmp_path):
    config = _smoke(rm_regression)
    config.data.attributes = "humour"
    with pytest.raises((ConfigError, ValueError), match="humour"):
        run_experiment(config, str(tmp_path))


def test_sft_smoke_runs(tmp_path):
    from experiments.configs import sft

    results = run_experiment(_smoke(sft), str(tmp_path))
    assert np.isfinite(results["loss"]) and abs(results["token_nll"] - results["loss"]) < 1e-4


def test_tfds_source_gives_the_same_run_as_files(tmp_path):
    from nemotron_jax.data import synthetic

    synthetic.generate(tmp_path / "data", num_prompts=200, seed=0)
    runs = {}
    for source in ("dir", "tfds"):
        config = _smoke(
            rm_regression,
            **{
                "data.source": source,
                "data.dir": str(tmp_path / "data"),
                "data.tokenizer": str(tmp_path / "data" / "tokenizer.model"),
            },
        )
        run_experiment(config, str(tmp_path / source))
        runs[source] = _train_losses(tmp_path / source)
    assert (tmp_path / "data" / "tfds").is_dir()
    assert runs["dir"] == runs["tfds"]


def test_attribute_weights_merge_slots():
    config = _smoke(rm_bt, "loss=regular")
    config.loss.attribute_weights = (0, 0, 0, 0, 0.5, 0.5, 0, 0, 0)
    objective = objectives.build(config)
    outputs = np.zeros((1, 2, 9), np.float32)
    outputs[0, 0, 5] = 2.0  # only the merged reward sees slot 5
    loss, weight, metrics = objective.loss(outputs, {"strength": np.array([-1])})
    assert float(metrics["reward_gap"][0][0]) == 1.0
    config.loss.attribute_weights = (1.0, 2.0)
    with pytest.raises(ConfigError, match="attribute_weights has 2 entries"):
        objectives.build(config)


def test_micro_batch_size_derives_grad_accum():
    from nemotron_jax.train.loop import grad_accum

    mesh = sharding.make_mesh((2, 4, 1))  # 8 data-parallel devices
    config = _smoke(rm_bt, "loss=scaled", batch_size=64, micro_batch_size=2)
    assert grad_accum(config, mesh) == 4  # 64 / (2 x 8)
    config.micro_batch_size = 0
    config.grad_accum = 2
    assert grad_accum(config, mesh) == 2
    config.micro_batch_size = 3
    with pytest.raises(ConfigError, match="set one"):
        grad_accum(config, mesh)
    config.grad_accum = 1
    with pytest.raises(ConfigError, match="not a multiple of micro_batch_size 3 x data-parallel"):
        grad_accum(config, mesh)
