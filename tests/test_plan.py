"""The ahead-of-time plan (`nemotron_jax/train/plan.py`, `tools/plan.py`): its state bytes
equal a real sharded state's, its abstract batches equal the data pipeline's, the 8B configs as
shipped fit 8 x 80 GiB, and bad input is one error line."""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from experiments.configs import reinforce, rm_bt, rm_regression, sft
from nemotron_jax import sharding
from nemotron_jax.models import lora
from nemotron_jax.train import objectives
from nemotron_jax.train.loop import build_training
from nemotron_jax.train.plan import GiB, hlo_summary, levers, parse_bytes, plan
from tests.conftest import REPO

MESHES = [(1, 8, 1), (2, 2, 2)]


def _device0_bytes(tree) -> int:
    """What device 0 actually holds of a tree of arrays."""
    device = jax.devices()[0]
    total = 0
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            if shard.device == device:
                total += shard.data.nbytes
    return total


@pytest.mark.parametrize("rank", [0, 4])
@pytest.mark.parametrize("mesh_shape", MESHES)
def test_state_bytes_equal_the_real_sharded_state(mesh_shape, rank):
    config = rm_bt.get_config(f"smoke,lora={rank}")
    figures = plan(config, mesh_shape, 80 * GiB)

    mesh = sharding.make_mesh(mesh_shape)
    rules = tuple(tuple(rule) for rule in config.sharding_rules)
    training = build_training(config, objectives.build(config), mesh, rules, 10)
    init_state = training.init_state
    state = jax.jit(lambda: nn.unbox(init_state()), out_shardings=training.state_sharding)()
    real_params = jax.device_put(
        jax.device_get(state["params"]), training.state_sharding["params"]
    )  # placed from the host, as a checkpoint restore places them
    assert figures["per_device"]["params"] == _device0_bytes(real_params)
    assert figures["per_device"]["params"] == _device0_bytes(state["params"])
    assert figures["per_device"]["optimizer"] == _device0_bytes(state["opt_state"])
    # Gradients of what trains: every leaf, or with LoRA the adapters and the reward head.
    trainable = lora.split(state["params"])[0] if rank else state["params"]
    assert figures["per_device"]["gradients"] == _device0_bytes(trainable)
    if rank:
        a = figures["lora"]
        assert a["rank"] == rank
        assert (a["trainable_params"], a["total_params"]) == lora.count(state["params"])
        assert figures["per_device"]["optimizer"] < figures["per_device"]["params"] / 4
    # The compiled program's arguments are this state plus the batch; its total holds them.
    assert figures["per_device"]["total"] >= _device0_bytes(state)
    assert figures["fits"] and figures["levers"] == []


@pytest.mark.parametrize(
    "module, arg",
    [(rm_bt, "smoke"), (rm_regression, "smoke"), (sft, "smoke")],
)
def test_batch_spec_equals_the_data_pipeline(module, arg):
    config = module.get_config(arg)
    objective = objectives.build(config)
    batch = next(iter(objective.make_data(None, None).train.produce(None, 0)[0]))
    spec = objective.batch_spec(config.batch_size, objective.seq_len)
    assert {k: (v.shape, np.dtype(v.dtype)) for k, v in spec.items()} == {
        k: (np.shape(v), np.asarray(v).dtype) for k, v in batch.items()
    }


def test_reinforce_batch_spec_equals_the_rollout_minibatch():
    """The keys `RolloutSource.produce` puts in a minibatch, from the functions that make them
    (the sampler's sequences and end flags, the reference log-probs, the advantages)."""
    from nemotron_jax.losses.reinforce import reinforce_advantages
    from nemotron_jax.models.llama import Llama
    from nemotron_jax.sampling import Rollout, response_sequences
    from nemotron_jax.train.rollouts import sequence_logprobs

    config = reinforce.get_config("smoke")
    objective = objectives.build(config)
    rl, b = config.rl, config.batch_size
    p, n = rl.max_prompt_len, rl.max_new_tokens
    f32, i32 = np.float32, np.int32

    def shape(*dims, dtype=i32):
        return jax.ShapeDtypeStruct(dims, dtype)

    rollout = Rollout(shape(b, n), shape(b, n, dtype=f32), shape(b), shape(b, dtype=bool))
    seqs = jax.eval_shape(
        lambda t, m, r: response_sequences(t, m, r, 0), shape(b, p), shape(b, p), rollout
    )
    model = Llama(objective.model_config)
    params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), np.zeros((1, 1), i32)))
    ref = jax.eval_shape(
        lambda v, t, m: sequence_logprobs(model, v["params"], t, m, "chunked"),
        params,
        seqs["tokens"],
        seqs["attention_mask"],
    )
    adv = jax.eval_shape(
        lambda r: reinforce_advantages(r, r, r > 0, beta=0.1, eos_only=True)["advantage"],
        shape(b // rl.num_rollouts_per_prompt, rl.num_rollouts_per_prompt, dtype=f32),
    )
    produced = {
        "tokens": seqs["tokens"],
        "attention_mask": seqs["attention_mask"],
        "response_mask": seqs["response_mask"],
        "advantage": jax.ShapeDtypeStruct((b,), adv.dtype),
        "is_end": rollout.is_end,
        "ref_logprobs": ref,
        "old_logprobs": seqs["logprobs"],  # the sampler's (or recomputed, of ref's shape)
    }
    assert seqs["logprobs"].shape == ref.shape and seqs["logprobs"].dtype == ref.dtype
    spec = objective.batch_spec(b, objective.seq_len)
    assert {k: (v.shape, v.dtype) for k, v in spec.items()} == {
        k: (v.shape, v.dtype) for k, v in produced.items()
    }


def test_reinforce_plan_adds_the_frozen_models_and_the_cache():
    config = reinforce.get_config("smoke")
    figures = plan(config, (1, 8, 1), 80 * GiB)
    d = figures["per_device"]
    # Reference policy: the policy's architecture and dtypes, sharded alike.
    assert d["reference"] == d["params"]
    assert d["kv_cache"] > 0 and d["reward_model"] > 0
    assert d["total"] == max(figures["phases"].values())
    assert figures["phases"]["update"] >= d["reference"] + d["reward_model"] + d["params"]


def test_reinforce_plan_with_lora_has_no_reference_copy():
    full = plan(reinforce.get_config("smoke"), (1, 8, 1), 80 * GiB)["per_device"]
    figures = plan(reinforce.get_config("smoke,lora=4"), (1, 8, 1), 80 * GiB)
    d = figures["per_device"]
    assert d["reference"] == 0  # the policy's base with its adapters off
    assert d["reward_model"] == full["reward_model"]  # a plain reward model, as it is loaded
    assert d["params"] > full["params"] and d["optimizer"] < full["optimizer"] / 4
    assert figures["phases"]["rollout"] == (
        d["params"] + d["optimizer"] + d["reward_model"] + d["kv_cache"] + d["sampler_weights"]
    )


def test_hlo_summary_counts_loop_bodies_by_trip_count():
    hlo = """HloModule m

%body (p: (s32[], f32[8,16])) -> (s32[], f32[8,16]) {
  %p = (s32[], f32[8,16]{1,0}) parameter(0)
  %x = f32[8,16]{1,0} get-tuple-element(%p), index=1
  %w = f32[16,16]{1,0} constant({...})
  %d = f32[8,16]{1,0} dot(%x, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %g = f32[8,64]{1,0} all-gather(%d), replica_groups={{0,1,2,3}}, dimensions={1}
  ROOT %t = (s32[], f32[8,16]{1,0}) tuple(%i, %d)
}

ENTRY %main (a: f32[8,16]) -> f32[8,16] {
  %a = f32[8,16]{1,0} parameter(0)
  %w = (s32[], f32[8,16]{1,0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"5"}}
  ROOT %r = f32[8,16]{1,0} all-reduce(%a), replica_groups={{0,1,2,3}}, to_apply=%add
}
"""  # noqa: E501
    flops, collectives = hlo_summary(hlo)
    assert flops == 5 * 2 * 8 * 16 * 16
    assert collectives["all-gather"] == {"ops": 1, "runs": 5.0, "bytes": 5.0 * 8 * 64 * 4}
    assert collectives["all-reduce"] == {"ops": 1, "runs": 1.0, "bytes": 8.0 * 16 * 4}


def test_parse_bytes():
    assert parse_bytes("80GiB") == 80 * GiB
    assert parse_bytes("141GB") == 141 * GiB
    assert parse_bytes("1.5 TiB") == int(1.5 * 1024) * GiB


@pytest.mark.slow
@pytest.mark.parametrize("module", [rm_bt, rm_regression, sft, reinforce])
def test_8b_configs_as_shipped_fit_8_x_80gib(module):
    figures = plan(module.get_config("model=llama3.1-8b"), (1, 8, 1), 80 * GiB)
    d = figures["per_device"]
    assert figures["fits"], figures
    # Float32 master weights and two Adam moments (plus step counters), sharded 8 ways.
    assert abs(d["optimizer"] - 2 * d["params"]) < 1024
    assert 3.4 * GiB < d["params"] < 3.8 * GiB
    assert figures["flops_per_step"] > 1e15  # REINFORCE: per update of a 32-sequence minibatch
    assert {"all-gather", "all-reduce"} <= set(figures["collectives"])
    if module is reinforce:  # the frozen reference and reward model, cache and sampler weights
        assert d["total"] > d["params"] + d["optimizer"] + d["reference"] + d["reward_model"]
        assert d["kv_cache"] > 0 and d["sampler_weights"] > 10 * GiB  # the gathered bf16 policy


def test_per_step_sampler_weights_hold_about_two_layers():
    config = reinforce.get_config("model=llama3.1-70b")
    assert config.rl.sampler_weights == "per_step"
    mcfg = objectives.build(config).model_config
    from nemotron_jax.train.plan import sampler_weight_bytes

    mesh = sharding.make_mesh((1, 4, 2))
    layers = {"w": jax.ShapeDtypeStruct((mcfg.num_layers, 1000), np.float32)}
    gathered = sampler_weight_bytes(layers, mcfg, mesh, "gathered")
    assert gathered == mcfg.num_layers * 1000 * 2 // 2  # bf16, split over tensor only
    assert sampler_weight_bytes(layers, mcfg, mesh, "per_step") == 2 * gathered // 80


def _plan_tool(*args):
    env = {**os.environ, "XLA_FLAGS": ""}
    return subprocess.run(
        [sys.executable, str(REPO / "tools" / "plan.py"), *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_tool_writes_json(tmp_path):
    out = tmp_path / "plan.json"
    r = _plan_tool(
        "--config", "experiments/configs/sft.py:smoke", "--devices", "4", "--mesh", "1,2,2",
        "--hbm", "16GiB", "--json", out,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "verdict: fits" in r.stdout
    figures = json.loads(out.read_text())
    assert set(figures["per_device"]) >= {"params", "optimizer", "gradients", "temporary", "total"}
    assert figures["devices"] == 4 and figures["mesh"] == {"data": 1, "fsdp": 2, "tensor": 2}
    assert figures["hbm"] == 16 * GiB and figures["fits"] is True
    assert figures["flops_per_step"] > 0 and "collectives" in figures


def _figures(params, temporary, **changes):
    per_device = {
        "params": params,
        "optimizer": 2 * params,
        "gradients": params,
        "temporary": temporary,
        "total": 3 * params + temporary,
    }
    figures = {
        "per_device": per_device,
        "hbm": 80 * GiB,
        "mesh": {"data": 1, "fsdp": 8, "tensor": 1},
        "remat": "none",
        "micro_batch_per_device": 4,
        "grad_accum": 1,
    }
    return {**figures, **changes}


def test_levers_name_the_larger_part_first():
    state_bound = levers(_figures(params=30 * GiB, temporary=40 * GiB))
    assert state_bound[0].startswith("more fsdp: fsdp 16 (16 devices)")
    activation_bound = levers(_figures(params=2 * GiB, temporary=90 * GiB))
    assert activation_bound[0].startswith("remat")
    assert "micro_batch_size=2" in activation_bound[1]
    # Already rematerialised, one example per device, and the rest alone over HBM.
    huge = levers(_figures(params=30 * GiB, temporary=200 * GiB, remat="full",
                           micro_batch_per_device=1))  # fmt: skip
    assert huge[0].startswith("shorter sequences")
    # LoRA drops the optimizer state and gradients: 30 + 40 - 60 - 30 GiB; not offered twice.
    assert state_bound[-1].startswith("LoRA: lora=16") and "about 40.0 GiB" in state_bound[-1]
    lora_run = levers(_figures(params=30 * GiB, temporary=40 * GiB, lora={"rank": 16}))
    assert not any(x.startswith("LoRA") for x in lora_run)


def test_tool_names_a_lever_when_it_does_not_fit():
    r = _plan_tool("--config", "experiments/configs/rm_bt.py:smoke", "--devices", "2", "--hbm",
                   "0.001GiB")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "does not fit" in r.stdout and "levers:" in r.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config.model.nope=1"], "--config.model.nope: the config has no such key"),
        (["--devices", "4", "--mesh", "1,8,1"], "needs 8 devices, have 4"),
        (["--hbm", "lots"], "--hbm 'lots'"),
        (["--mesh", "1,8"], "--mesh '1,8'"),
    ],
)
def test_tool_bad_input_is_one_error_line(args, message):
    r = _plan_tool("--config", "experiments/configs/rm_bt.py:smoke", *args)
    assert r.returncode == 2
    assert r.stderr.strip().startswith("error: ") and len(r.stderr.strip().splitlines()) == 1
    assert message in r.stderr
