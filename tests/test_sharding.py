"""Logical annotations, rules, and the forward on a (data, fsdp, tensor) = (2, 2, 2) mesh."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from nemotron_jax import sharding
from nemotron_jax.models import Llama, LlamaConfig, init_params
from nemotron_jax.models.llama import abstract_params
from tests import tolerances


def _config():
    # 4 kv heads so the tensor axis (2) really splits K/V heads.
    return LlamaConfig.preset("tiny", num_heads=8, num_kv_heads=4, head_dim=8)


def test_every_param_annotated_and_every_name_ruled():
    boxed = abstract_params(LlamaConfig.preset("tiny"), boxed=True)
    assert sharding.unannotated_leaves(boxed) == []
    ruled = {name for name, _ in sharding.DEFAULT_RULES}
    used = {
        n
        for spec in jax.tree.leaves(
            sharding.logical_specs(boxed),
            is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec),
        )
        for n in spec
        if n is not None
    }
    assert used and used <= ruled, used - ruled
    activation_names = {"act_batch", "act_seq", "act_embed", "act_heads", "act_mlp", "act_vocab"}
    assert activation_names <= ruled


def test_rules_are_unique_and_valid():
    sharding.validate_rules(sharding.DEFAULT_RULES)
    with pytest.raises(ValueError, match="more than one sharding rule"):
        sharding.validate_rules(sharding.DEFAULT_RULES + (("embed", None),))
    with pytest.raises(ValueError, match="no mesh axis 'model'"):
        sharding.validate_rules((("embed", "model"),))


def test_make_mesh():
    mesh = sharding.make_mesh((2, -1, 2))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    with pytest.raises(ValueError, match="needs 27 devices"):
        sharding.make_mesh((3, 3, 3))


def test_sharded_forward_equals_single_device():
    cfg = _config()
    params = init_params(cfg, jax.random.PRNGKey(0))
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (4, 16))
    mask = (np.arange(16)[None] < np.array([[16], [9], [3], [12]])).astype(np.int32)
    want = Llama(cfg).apply({"params": params}, tokens, attention_mask=mask)

    mesh = sharding.make_mesh((2, 2, 2))
    param_sharding = sharding.shardings_for(abstract_params(cfg, boxed=True), mesh)
    # Weights really are split: q_proj [L, D, N, H] over fsdp (D) and tensor (N).
    assert tuple(param_sharding["layers"]["self_attn"]["q_proj"].spec) == (
        None,
        "fsdp",
        "tensor",
        None,
    )
    sharded_params = jax.device_put(params, param_sharding)
    batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))

    @jax.jit
    def forward(p, t, m):
        return Llama(cfg).apply({"params": p}, t, attention_mask=m)

    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
        got = forward(
            sharded_params,
            jax.device_put(tokens, batch_sharding),
            jax.device_put(mask, batch_sharding),
        )
    assert len(got.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=tolerances.SHARDED_F32)


def test_non_divisible_axes_fall_back_to_replication():
    cfg = LlamaConfig.preset("tiny", num_kv_heads=1)
    mesh = sharding.make_mesh((1, 2, 4))
    shardings = sharding.shardings_for(abstract_params(cfg, boxed=True), mesh)
    assert tuple(shardings["layers"]["self_attn"]["k_proj"].spec) == (None, "fsdp", None, None)


def test_pallas_attention_runs_per_shard_under_the_mesh():
    cfg = _config().replace(attention_impl="pallas_interpret")
    params = init_params(cfg, jax.random.PRNGKey(0))
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (4, 16))
    mask = (np.arange(16)[None] < np.array([[16], [9], [3], [12]])).astype(np.int32)
    want = Llama(cfg.replace(attention_impl="xla")).apply(
        {"params": params}, tokens, attention_mask=mask
    )
    mesh = sharding.make_mesh((2, 2, 2))
    param_sharding = sharding.shardings_for(abstract_params(cfg, boxed=True), mesh)
    batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))

    @jax.jit
    def forward(p, t, m):
        return Llama(cfg).apply({"params": p}, t, attention_mask=m)

    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
        text = forward.lower(jax.device_put(params, param_sharding), tokens, mask).as_text()
        got = forward(
            jax.device_put(params, param_sharding),
            jax.device_put(tokens, batch),
            jax.device_put(mask, batch),
        )
    assert "shard_map" in text or "manual" in text.lower()
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=1e-5)
