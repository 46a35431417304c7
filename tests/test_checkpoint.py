"""Params checkpoints: exact round trips, streaming save, sharded restore, slice reads, errors."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from nemotron_jax import checkpoint
from nemotron_jax.errors import CheckpointError

BF16 = ml_dtypes.bfloat16
CONFIG = {"hidden_size": 8, "num_layers": 4, "name": "tiny"}


def _params(dtype=np.float32) -> dict:
    """A small tree: stacked leaves under "layers" plus unstacked ones, all distinct values."""
    rng = np.random.default_rng(0)
    leaf = lambda *shape: rng.standard_normal(shape).astype(dtype)
    return {
        "embed": {"embedding": leaf(32, 8)},
        "layers": {
            "mlp": {"kernel": leaf(4, 8, 16)},
            "norm": {"scale": leaf(4, 8)},
        },
        "final_norm": {"scale": leaf(8)},
    }


def _abstract(params) -> dict:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)


def _fill_from(params, calls=None):
    def fill(leaf_path, index):
        if calls is not None:
            calls.append((leaf_path, index))
        x = params
        for key in leaf_path:
            x = x[key]
        return x if index is None else x[index]

    return fill


def _assert_bitwise_equal(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        g, w = np.asarray(g), np.asarray(w)
        assert g.dtype == w.dtype and g.shape == w.shape
        assert g.tobytes() == w.tobytes()


@pytest.mark.parametrize("dtype", [np.float32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("leaf_type", ["jax", "numpy"])
def test_round_trip_is_exact(tmp_path, dtype, leaf_type):
    params = _params(dtype)
    saved = jax.tree.map(jnp.asarray, params) if leaf_type == "jax" else params
    checkpoint.save_params(tmp_path / "ckpt", saved, metadata=CONFIG)

    restored = checkpoint.restore_params(tmp_path / "ckpt")
    _assert_bitwise_equal(restored, params)
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(restored))
    _assert_bitwise_equal(checkpoint.restore_params(tmp_path / "ckpt", _abstract(params)), params)
    assert checkpoint.read_metadata(tmp_path / "ckpt") == CONFIG


def test_streaming_save_equals_in_memory_save(tmp_path):
    params = _params(np.float32)
    params["layers"]["norm"]["scale"] = params["layers"]["norm"]["scale"].astype(BF16)
    checkpoint.save_params(tmp_path / "mem", jax.tree.map(jnp.asarray, params), metadata=CONFIG)
    calls = []
    checkpoint.save_params_streaming(
        tmp_path / "stream", _abstract(params), _fill_from(params, calls), metadata=CONFIG
    )

    # Stacked leaves are requested layer by layer in order, the others whole, each once.
    assert sorted(calls, key=str) == sorted(
        [(("layers", "mlp", "kernel"), i) for i in range(4)]
        + [(("layers", "norm", "scale"), i) for i in range(4)]
        + [(("embed", "embedding"), None), (("final_norm", "scale"), None)],
        key=str,
    )
    kernel_calls = [i for p, i in calls if p == ("layers", "mlp", "kernel")]
    assert kernel_calls == [0, 1, 2, 3]

    mem, stream = (checkpoint.restore_params(tmp_path / d) for d in ("mem", "stream"))
    _assert_bitwise_equal(stream, mem)
    _assert_bitwise_equal(stream, params)
    assert checkpoint.read_metadata(tmp_path / "stream") == CONFIG
    # Same on-disk layout: stacked leaves chunked one layer at a time in both.
    layouts = [
        jax.tree.map(
            lambda m: m.storage.chunk_shape,
            ocp.PyTreeCheckpointHandler().metadata(tmp_path / d / "params").tree,
            is_leaf=lambda x: hasattr(x, "storage"),
        )
        for d in ("mem", "stream")
    ]
    assert layouts[0] == layouts[1]
    assert layouts[0]["layers"]["mlp"]["kernel"][0] == 1


def test_restore_onto_mesh_shards_every_leaf(tmp_path):
    params = _params(BF16)
    checkpoint.save_params(tmp_path / "ckpt", params)
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"))
    specs = {
        "embed": {"embedding": P("tensor", "fsdp")},
        "layers": {"mlp": {"kernel": P(None, "fsdp", "tensor")}, "norm": {"scale": P()}},
        "final_norm": {"scale": P()},
    }
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
    abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        _abstract(params),
        shardings,
    )

    for restored in (
        checkpoint.restore_params(tmp_path / "ckpt", abstract),
        checkpoint.restore_params(tmp_path / "ckpt", _abstract(params), shardings=shardings),
    ):
        _assert_bitwise_equal(restored, params)
        kernel = restored["layers"]["mlp"]["kernel"]
        assert kernel.sharding == shardings["layers"]["mlp"]["kernel"]
        assert kernel.addressable_shards[0].data.shape == (4, 4, 8)
        assert restored["embed"]["embedding"].addressable_shards[0].data.shape == (16, 4)

    # Sharded jax.Arrays save (each shard written once) and round-trip too.
    checkpoint.save_params(tmp_path / "resaved", restored)
    _assert_bitwise_equal(checkpoint.restore_params(tmp_path / "resaved", abstract), params)

    # One sharding for every leaf.
    replicated = NamedSharding(mesh, P())
    restored = checkpoint.restore_params(tmp_path / "ckpt", shardings=replicated)
    assert all(x.sharding == replicated for x in jax.tree.leaves(restored))


def test_ordinary_orbax_checkpoint(tmp_path):
    """Readable by plain orbax, and as step 0 of a CheckpointManager."""
    params = _params(BF16)
    checkpoint.save_params(tmp_path / "0", params, metadata=CONFIG)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), _abstract(params)
    )

    _assert_bitwise_equal(
        ocp.StandardCheckpointer().restore(tmp_path / "0" / "params", abstract), params
    )
    with ocp.CheckpointManager(tmp_path) as mngr:
        assert mngr.all_steps() == [0]
        out = mngr.restore(
            0,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(abstract), metadata=ocp.args.JsonRestore()
            ),
        )
    _assert_bitwise_equal(out.params, params)
    assert out.metadata == CONFIG


def test_restore_subset_of_leaves(tmp_path):
    params = _params()
    checkpoint.save_params(tmp_path / "ckpt", params)
    restored = checkpoint.restore_params(tmp_path / "ckpt", {"layers": _abstract(params)["layers"]})
    _assert_bitwise_equal(restored, {"layers": params["layers"]})


def test_read_leaf_and_slices(tmp_path):
    params = _params(BF16)
    checkpoint.save_params_streaming(
        tmp_path / "ckpt", _abstract(params), _fill_from(params), progress=False
    )
    kernel = params["layers"]["mlp"]["kernel"]

    got = checkpoint.read_leaf(tmp_path / "ckpt", ("layers", "mlp", "kernel"), 2)
    assert isinstance(got, np.ndarray) and got.dtype == BF16 and got.shape == (8, 16)
    assert got.tobytes() == kernel[2].tobytes()
    assert checkpoint.read_leaf(tmp_path / "ckpt", "layers/mlp/kernel", -1).tobytes() == (
        kernel[3].tobytes()
    )
    whole = checkpoint.read_leaf(tmp_path / "ckpt", "embed/embedding")
    assert whole.tobytes() == params["embed"]["embedding"].tobytes()
    slices = list(checkpoint.iter_leaf_slices(tmp_path / "ckpt", "layers/mlp/kernel"))
    assert np.stack(slices).tobytes() == kernel.tobytes()

    with pytest.raises(CheckpointError, match="index 4 out of range"):
        checkpoint.read_leaf(tmp_path / "ckpt", "layers/mlp/kernel", 4)
    with pytest.raises(CheckpointError, match="leaf layers/mlp/bias is not in the checkpoint"):
        checkpoint.read_leaf(tmp_path / "ckpt", "layers/mlp/bias", 0)


def test_errors_name_what_is_wrong(tmp_path):
    params = _params()
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=f"no checkpoint at {missing}"):
        checkpoint.restore_params(missing)
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        checkpoint.read_leaf(missing, "embed/embedding")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="is not a params checkpoint"):
        checkpoint.read_metadata(tmp_path / "empty")

    checkpoint.save_params(tmp_path / "ckpt", params)
    with pytest.raises(CheckpointError, match="already exists"):
        checkpoint.save_params(tmp_path / "ckpt", params)

    abstract = _abstract(params)
    abstract["layers"]["mlp"]["kernel"] = jax.ShapeDtypeStruct((4, 8, 32), np.float32)
    with pytest.raises(
        CheckpointError,
        match=r"leaf layers/mlp/kernel: expected shape \(4, 8, 32\) dtype float32, "
        r"got shape \(4, 8, 16\) dtype float32",
    ):
        checkpoint.restore_params(tmp_path / "ckpt", abstract)

    abstract = _abstract(params)
    abstract["final_norm"]["scale"] = jax.ShapeDtypeStruct((8,), BF16)
    with pytest.raises(CheckpointError, match="leaf final_norm/scale: expected .* dtype bfloat16"):
        checkpoint.restore_params(tmp_path / "ckpt", abstract)

    abstract = _abstract(params)
    abstract["head"] = {"kernel": jax.ShapeDtypeStruct((8, 1), np.float32)}
    with pytest.raises(CheckpointError, match="leaf head/kernel is not in the checkpoint"):
        checkpoint.restore_params(tmp_path / "ckpt", abstract)


def test_interrupted_streaming_save_leaves_no_checkpoint(tmp_path):
    params = _params()
    fill = _fill_from(params)

    def failing(leaf_path, index):
        if index == 2:
            raise RuntimeError("source went away")
        return fill(leaf_path, index)

    with pytest.raises(RuntimeError, match="source went away"):
        checkpoint.save_params_streaming(tmp_path / "ckpt", _abstract(params), failing)
    assert list(tmp_path.iterdir()) == []  # neither the checkpoint nor orbax's temporary dir
    with pytest.raises(FileNotFoundError):
        checkpoint.restore_params(tmp_path / "ckpt")

    wrong = lambda p, i: np.zeros((3,), np.float32) if p[0] == "layers" else fill(p, i)
    with pytest.raises(CheckpointError, match=r"fill_fn\(layers/\w+/\w+\[0\]\): expected shape"):
        checkpoint.save_params_streaming(tmp_path / "ckpt", _abstract(params), wrong)
    assert list(tmp_path.iterdir()) == []

    # The same path can then be written normally.
    checkpoint.save_params_streaming(tmp_path / "ckpt", _abstract(params), fill, progress=False)
    _assert_bitwise_equal(checkpoint.restore_params(tmp_path / "ckpt"), params)


def test_a_model_saved_with_a_retired_field_still_loads(tmp_path):
    """Models saved before oneDNN was removed record model_config.matmul_impl; it changes no
    parameter, so the artifact reads them."""
    from nemotron_jax import artifact
    from nemotron_jax.models.llama import LlamaConfig, init_params

    config = LlamaConfig.preset("tiny")
    saved = {**config.to_dict(), "matmul_impl": "xla"}
    params = init_params(config, jax.random.PRNGKey(0))
    checkpoint.save_params(
        tmp_path / "m", params, metadata={"model_config": saved, "kind": "causal_lm"}
    )
    model = artifact.load(tmp_path / "m", restore=False)
    assert model.config == config and model.kind == "causal_lm"
