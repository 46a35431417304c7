"""LoRA adapters: a fresh adapter computes the base exactly, merging equals the unmerged
forward, adapters off is the base, a step changes only adapters and heads, the PEFT export
loads in `peft` with equal logits and imports back bit-exactly, and bad settings fail at start
naming the key."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import rm_regression, sft
from nemotron_jax.errors import ConfigError
from nemotron_jax.models import lora
from nemotron_jax.models.llama import LORA_TARGETS, Llama, LlamaConfig, init_params
from nemotron_jax.optim import make_optimizer
from nemotron_jax.train import objectives, settings
from nemotron_jax.train.steps import make_train_step
from tests import tolerances
from tests.train.test_loop import _smoke

BASE = LlamaConfig.preset("tiny")
ADAPTED = BASE.replace(lora_rank=4, lora_targets=LORA_TARGETS)
TOKENS = jax.random.randint(jax.random.PRNGKey(1), (2, 8), 0, BASE.vocab_size)


def _trained(params):
    """`params` with every adapter leaf moved off its init (B no longer zero)."""
    key = jax.random.PRNGKey(3)
    return jax.tree_util.tree_map_with_path(
        lambda p, v: v + 0.05 * jax.random.normal(key, v.shape) if lora.is_adapter(p) else v,
        params,
    )


def test_fresh_adapters_compute_the_base_exactly():
    params = init_params(ADAPTED, jax.random.PRNGKey(0))
    trainable, frozen = lora.split(params)
    paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(trainable)[0]]
    assert len(paths) == 2 * len(LORA_TARGETS) and all(lora.is_adapter(p) for p in paths)
    got = Llama(ADAPTED).apply({"params": params}, TOKENS)
    want = Llama(BASE).apply({"params": frozen}, TOKENS)
    assert np.array_equal(np.asarray(got), np.asarray(want))


def test_merge_equals_unmerged_and_adapters_off_is_the_base():
    params = _trained(init_params(ADAPTED, jax.random.PRNGKey(0)))
    unmerged = Llama(ADAPTED).apply({"params": params}, TOKENS)
    merged = Llama(BASE).apply({"params": lora.merge(params, ADAPTED)}, TOKENS)
    base = Llama(BASE).apply({"params": lora.split(params)[1]}, TOKENS)
    off = Llama(ADAPTED).apply({"params": lora.adapters_off(params)}, TOKENS)
    assert float(jnp.abs(unmerged - base).max()) > 0.1  # the adapters do something
    assert float(jnp.abs(unmerged - merged).max()) <= tolerances.LORA_MERGE_F32
    assert np.array_equal(np.asarray(off), np.asarray(base))


def test_dropout_only_with_a_dropout_key():
    cfg = ADAPTED.replace(lora_dropout=0.5)
    params = _trained(init_params(cfg, jax.random.PRNGKey(0)))
    plain = Llama(cfg).apply({"params": params}, TOKENS)
    no_dropout = Llama(ADAPTED).apply({"params": params}, TOKENS)
    dropped = Llama(cfg).apply({"params": params}, TOKENS, rngs={"dropout": jax.random.key(0)})
    assert np.array_equal(np.asarray(plain), np.asarray(no_dropout))
    assert float(jnp.abs(dropped - plain).max()) > 0


def test_a_step_changes_only_adapters_and_the_head():
    config = _smoke(rm_regression, "lora=4")
    objective = objectives.build(config)
    data = objective.make_data(None, None)
    tx = make_optimizer(config.optim, config.num_steps)
    params = nn.unbox(objective.init(jax.random.PRNGKey(0)))
    trainable = lora.split(params)[0]
    state = {"step": np.int32(0), "params": params, "opt_state": tx.init(trainable)}
    step = jax.jit(make_train_step(objective.apply, objective.loss, tx, adapters_only=True))
    batch = data.train.produce(params, 0)[0][0]
    new, _ = step(state, batch)
    new, _ = step(new, batch)  # A moves from the second step (B is 0 at the first)
    flat_old = jax.tree_util.tree_flatten_with_path(params)[0]
    flat_new = jax.tree.leaves(new["params"])
    for (path, old), value in zip(flat_old, flat_new, strict=True):
        changed = not np.array_equal(np.asarray(old), np.asarray(value))
        assert changed == lora.is_trainable(path), path
    # Adam moments exist for the trainable leaves alone.
    sizes = sum(x.size for x in jax.tree.leaves(new["opt_state"]))
    assert sizes <= 2 * sum(x.size for x in jax.tree.leaves(trainable)) + 8


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"lora.rank": 4, "lora.targets": ("q_proj", "qkv")}, r"config.lora.targets .*'qkv'"),
        ({"lora.rank": -1}, r"config.lora.rank is -1; it must be > 0"),
        ({"lora.targets": ("q_proj",)}, r"config.lora.targets is set but config.lora.rank is 0"),
        ({"lora.rank": 4, "lora.dropout": 1.0}, r"config.lora.dropout is 1.0; it must be < 1"),
    ],
)
def test_bad_settings_fail_at_start(changes, message):
    with pytest.raises(ConfigError, match=message):
        settings.check(_smoke(sft, **changes))


def test_a_checkpoint_of_another_base_fails_naming_the_key(tmp_path):
    from nemotron_jax import artifact
    from nemotron_jax.experiment import run_experiment

    other = BASE.replace(num_layers=1)
    artifact.save(
        tmp_path / "other", init_params(other, jax.random.PRNGKey(0)), config=other,
        kind="causal_lm",
    )  # fmt: skip
    config = _smoke(sft, "lora=4", init_from=str(tmp_path / "other"))
    with pytest.raises(
        ConfigError, match=r"init_from .*base model differs .*num_layers \(1 vs 2\)"
    ):
        run_experiment(config, str(tmp_path / "run"))


def test_fingerprint_sees_every_bit_and_not_the_mesh():
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    rng = np.random.default_rng(0)
    tree = {
        "b": rng.standard_normal(4).astype(jnp.bfloat16),
        "w": rng.standard_normal((2, 4)).astype(np.float32),
    }
    original = int(lora.fingerprint(tree))
    for name, x in tree.items():
        bits = x.view(np.uint32 if x.itemsize == 4 else np.uint16)
        for i in range(bits.size):
            for k in range(8 * x.itemsize):
                flipped = bits.copy()
                flipped.flat[i] ^= 1 << k
                changed = {**tree, name: flipped.view(x.dtype)}
                assert int(lora.fingerprint(changed)) != original, (name, i, k)
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("a", "b"))
    sharded = {
        "b": jax.device_put(tree["b"], NamedSharding(mesh, P("a"))),
        "w": jax.device_put(tree["w"], NamedSharding(mesh, P("b", "a"))),
    }
    assert int(lora.fingerprint(sharded)) == original
