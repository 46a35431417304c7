"""KV-cache decoding and `nemotron_jax.sampling`: cache consistency, greedy parity with
transformers' `generate`, sampling filters, training-sequence layout, errors, and a mesh."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nemotron_jax import sharding
from nemotron_jax.errors import ConfigError
from nemotron_jax.models.llama import (
    Llama,
    LlamaConfig,
    abstract_params,
    init_cache,
    init_params,
    positions_from_mask,
)
from nemotron_jax.sampling import (
    Rollout,
    SamplingConfig,
    filter_logits,
    generate,
    make_generate_fn,
    response_sequences,
    sample_from_logits,
)
from tests import tolerances

# llama3 rope with a shrunken original context, so prompts + responses (up to 32 tokens) run past
# it; P = 12 prompt slots and rows of different lengths.
CONFIG = LlamaConfig.preset("tiny", rope_original_max_position_embeddings=16)
LENGTHS = [12, 7, 3, 9]
P = 12


def _sharp_params(config, seed=0):
    """init_params with weights x5 (std 0.1): logits spread wide enough that greedy argmaxes are
    separated by far more than float32 noise between frameworks."""
    params = init_params(config, jax.random.PRNGKey(seed))
    scale = lambda path, x: x if "norm" in jax.tree_util.keystr(path) else x * 5.0
    return jax.tree_util.tree_map_with_path(scale, params)


def _prompts(lengths=LENGTHS, width=P, vocab=CONFIG.vocab_size, seed=0):
    """Left-padded int32 prompts [B, width] (pad 0, tokens from 4 up) and their 0/1 mask."""
    lengths = np.asarray(lengths)
    mask = (np.arange(width)[None] >= (width - lengths)[:, None]).astype(np.int32)
    tokens = np.random.default_rng(seed).integers(4, vocab, size=(len(lengths), width))
    return np.where(mask, tokens, 0).astype(np.int32), mask


def _right_padded(tokens, mask):
    order = np.argsort(1 - mask, axis=-1, kind="stable")
    return np.take_along_axis(tokens, order, -1), np.take_along_axis(mask, order, -1)


@pytest.fixture(scope="module")
def params():
    return _sharp_params(CONFIG)


# --- 1. the cache ---------------------------------------------------------------------------


def test_cached_decoding_matches_full_forward(params):
    model = Llama(CONFIG)
    tokens, mask = _prompts()
    positions = positions_from_mask(mask)
    want = np.asarray(
        model.apply({"params": params}, tokens, positions=positions, attention_mask=mask)
    )

    decode = jax.jit(
        lambda p, t, pos, v, c: model.apply({"params": p}, t, pos, v, c, method="decode")
    )
    cache = init_cache(CONFIG, len(LENGTHS), P)
    assert len(cache["k"]) == CONFIG.num_layers
    assert cache["k"][0].shape == (4, CONFIG.num_kv_heads, P, CONFIG.head_dim)  # [B, K, S, H]
    # A 6-token prefill (row 2 is still all padding), a 2-token chunk, then single tokens.
    chunks = [(0, 6), (6, 8)] + [(t, t + 1) for t in range(8, P)]
    got = []
    for a, b in chunks:
        logits, cache = decode(params, tokens[:, a:b], positions[:, a:b], mask[:, a:b], cache)
        got.append(np.asarray(logits))
    got = np.concatenate(got, axis=1)
    assert int(cache["index"]) == P
    np.testing.assert_array_equal(np.asarray(cache["valid"]), mask.astype(bool))
    real = mask.astype(bool)
    diff = np.abs(got - want)[real].max()
    assert diff <= tolerances.KV_CACHE_F32, f"cached vs full logits differ by {diff:.3g}"


@pytest.mark.parametrize("implementation", ["auto", "xla", "pallas_interpret"])
def test_prefill_as_self_attention_matches_full_forward(params, implementation):
    """`decode(..., prefill=True)`: the prompt attends among itself through the self-attention
    path (flash kernels, block-causal XLA), then single-token steps read the cache it wrote; the
    real positions' logits equal the full forward's."""
    config = CONFIG.replace(attention_impl=implementation)
    model = Llama(config)
    tokens, mask = _prompts()
    positions = positions_from_mask(mask)
    want = np.asarray(
        Llama(CONFIG).apply({"params": params}, tokens, positions=positions, attention_mask=mask)
    )
    decode = jax.jit(
        lambda p, t, pos, v, c, prefill: model.apply(
            {"params": p}, t, pos, v, c, prefill=prefill, method="decode"
        ),
        static_argnums=5,
    )
    cache = init_cache(config, len(LENGTHS), P)
    got = []
    for a, b in [(0, 6)] + [(t, t + 1) for t in range(6, P)]:
        args = (tokens[:, a:b], positions[:, a:b], mask[:, a:b], cache)
        logits, cache = decode(params, *args, a == 0)
        got.append(np.asarray(logits))
    got = np.concatenate(got, axis=1)
    real = mask.astype(bool)
    diff = np.abs(got - want)[real].max()
    assert diff <= tolerances.KV_CACHE_F32, f"prefilled vs full logits differ by {diff:.3g}"


# --- 2. greedy parity with transformers ------------------------------------------------------


def _hf_generate(hf_model, tokens, mask, n, stop_tokens):
    import torch

    hf_model.generation_config.eos_token_id = list(stop_tokens) or None
    with torch.no_grad():
        out = hf_model.generate(
            torch.as_tensor(tokens, dtype=torch.long),
            attention_mask=torch.as_tensor(mask, dtype=torch.long),
            do_sample=False,
            max_new_tokens=n,
            pad_token_id=0,
            output_scores=True,
            return_dict_in_generate=True,
        )
    gen = out.sequences[:, tokens.shape[1] :].numpy()
    scores = torch.stack(out.scores, dim=1).float().numpy()  # [B, steps, V]
    return gen, scores


def _first_stop(row, stops):
    hits = [i for i, t in enumerate(row) if t in stops]
    return hits[0] + 1 if hits else len(row)


@pytest.mark.hf
def test_greedy_matches_transformers_generate(params, tmp_path):
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from nemotron_jax.convert.hf_llama import save_hf

    save_hf(tmp_path / "hf", CONFIG, params)
    hf_model = transformers.LlamaForCausalLM.from_pretrained(
        tmp_path / "hf", attn_implementation="eager"
    ).eval()
    model, n = Llama(CONFIG), 20
    tokens, mask = _prompts()

    # Unconstrained: every row runs all n steps.
    want, scores = _hf_generate(hf_model, tokens, mask, n, ())
    top2 = np.sort(scores, axis=-1)[..., -2:]
    # Only meaningful if no argmax is a float32 coin toss: every logit is within LOGITS_F32 of
    # HF's (tests/models/test_llama_vs_hf.py), so a top-2 gap over twice that cannot flip.
    assert (top2[..., 1] - top2[..., 0]).min() > 2 * tolerances.LOGITS_F32
    rollout = generate(model, params, tokens, mask, None, SamplingConfig(n, temperature=0.0))
    np.testing.assert_array_equal(np.asarray(rollout.tokens), want)
    np.testing.assert_array_equal(np.asarray(rollout.lengths), [n] * 4)
    assert not np.asarray(rollout.is_end).any()
    # Raw log-probs: log-softmax of HF's (unprocessed, greedy) scores at the chosen tokens.
    hf_logp = jax.nn.log_softmax(scores, axis=-1)
    hf_logp = np.take_along_axis(np.asarray(hf_logp), want[..., None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(rollout.logprobs), hf_logp, atol=tolerances.LOGITS_F32)

    # A stop token that some rows emit mid-sequence and others never: the smallest such id.
    free = want.tolist()
    candidates = [
        t
        for t in sorted(set(want.ravel().tolist()))
        if any(3 <= _first_stop(r, {t}) <= n - 3 for r in free) and any(t not in r for r in free)
    ]
    assert candidates, "no usable stop token in this greedy run"
    stops = (candidates[0], 1)  # 1 never appears: a second stop id that is not hit
    sampling = SamplingConfig(n, temperature=0.0, stop_tokens=stops, pad_id=0)
    rollout = generate(model, params, tokens, mask, None, sampling)
    hf_gen, _ = _hf_generate(hf_model, tokens, mask, n, stops)
    lengths = [_first_stop(r, set(stops)) for r in free]
    assert 0 < sum(ln < n for ln in lengths) < len(lengths), lengths  # some stop, some do not
    np.testing.assert_array_equal(np.asarray(rollout.lengths), lengths)
    np.testing.assert_array_equal(np.asarray(rollout.is_end), [ln < n for ln in lengths])
    got = np.asarray(rollout.tokens)
    for i, ln in enumerate(lengths):
        np.testing.assert_array_equal(got[i, :ln], hf_gen[i, :ln])
        np.testing.assert_array_equal(got[i, :ln], want[i, :ln])
        assert (got[i, ln:] == 0).all() and (np.asarray(rollout.logprobs)[i, ln:] == 0).all()
        assert (hf_gen[i, ln:] == 0).all()  # HF pads finished rows with pad_token_id too
    assert hf_gen.shape[1] == max(lengths)  # HF stopped when the last row ended; so did we

    # The same prompts right-padded give the identical rollout.
    right = generate(model, params, *_right_padded(tokens, mask), None, sampling)
    for a, b in zip(rollout, right, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# --- 3. sampling ------------------------------------------------------------------------------


# Tokens 1 and 2 tie for the max; softmax = [.143, .389, .389, .053, .019, .007].
TABLE = jnp.asarray([[2.0, 3.0, 3.0, 1.0, 0.0, -1.0]], jnp.float32)


@pytest.mark.parametrize(
    "kwargs, allowed",
    [
        (dict(top_k=2), {1, 2}),
        (dict(top_k=1), {1}),  # the tie goes to the lower id
        (dict(top_k=3), {0, 1, 2}),
        (dict(top_p=0.1), {1}),  # only the (lowest-id) argmax
        (dict(top_p=0.6), {1, 2}),  # 0.389 ranked above token 2 < 0.6; 0.778 above token 0
        (dict(top_p=0.8), {0, 1, 2}),
        (dict(top_k=2, top_p=0.3), {1}),  # nucleus inside the top-2 only
        (dict(top_p=0.99), {0, 1, 2, 3, 4}),  # 0.974 ranked above token 4, 0.993 above 5
        # Temperature first: at 0.5 the softmax is [.063, .464, .464, .009, ...].
        (dict(temperature=0.5, top_p=0.99), {0, 1, 2}),
    ],
)
def test_filters_keep_exactly_the_allowed_tokens(kwargs, allowed):
    sampling = SamplingConfig(1, **kwargs)
    kept = set(np.flatnonzero(np.isfinite(np.asarray(filter_logits(TABLE, sampling))[0])))
    assert kept == allowed
    draws = jax.vmap(lambda k: sample_from_logits(TABLE, k, sampling))(
        jax.random.split(jax.random.PRNGKey(0), 2000)
    )
    assert set(np.asarray(draws).ravel().tolist()) == allowed


def test_sampling_frequencies_follow_the_tempered_softmax():
    sampling = SamplingConfig(1, temperature=2.0)
    draws = jax.vmap(lambda k: sample_from_logits(TABLE, k, sampling))(
        jax.random.split(jax.random.PRNGKey(1), 20000)
    )
    freq = np.bincount(np.asarray(draws).ravel(), minlength=6) / 20000
    np.testing.assert_allclose(freq, jax.nn.softmax(TABLE[0] / 2.0), atol=0.015)


def test_greedy_ignores_rng():
    sampling = SamplingConfig(1, temperature=0.0)
    for seed in range(3):
        assert int(sample_from_logits(TABLE, jax.random.PRNGKey(seed), sampling)[0]) == 1


def test_sampled_rollout_logprobs_and_top_k(params):
    model = Llama(CONFIG)
    tokens, mask = _prompts(seed=1)
    n = 10
    sampling = SamplingConfig(n, temperature=1.0, top_k=2, stop_tokens=(5,))
    rollout = make_generate_fn(model, sampling)(params, tokens, mask, jax.random.PRNGKey(3))
    assert isinstance(rollout, Rollout)
    seqs = response_sequences(tokens, mask, rollout, sampling.pad_id)
    logits = model.apply({"params": params}, seqs["tokens"], attention_mask=seqs["attention_mask"])
    # Token t is predicted at t - 1.
    logp = jax.nn.log_softmax(np.asarray(logits)[:, :-1], axis=-1)
    targets = np.asarray(seqs["tokens"])[:, 1:]
    raw = np.take_along_axis(np.asarray(logp), targets[..., None], -1)[..., 0]
    resp = np.asarray(seqs["response_mask"])[:, 1:].astype(bool)
    # Each response's log-probs, in order, are the rollout's.
    for i in range(len(LENGTHS)):
        ln = int(rollout.lengths[i])
        np.testing.assert_allclose(
            raw[i][resp[i]], np.asarray(rollout.logprobs)[i, :ln], atol=tolerances.KV_CACHE_F32
        )
    # Every sampled token was one of the two best raw logits at its step.
    top2 = np.argsort(-np.asarray(logits)[:, :-1], axis=-1, kind="stable")[..., :2]
    assert (top2 == targets[..., None]).any(-1)[resp].all()
    # Different keys give different samples; the same key the same ones.
    again = make_generate_fn(model, sampling)(params, tokens, mask, jax.random.PRNGKey(3))
    other = make_generate_fn(model, sampling)(params, tokens, mask, jax.random.PRNGKey(4))
    np.testing.assert_array_equal(np.asarray(again.tokens), np.asarray(rollout.tokens))
    assert not np.array_equal(np.asarray(other.tokens), np.asarray(rollout.tokens))


def test_tiny_top_p_is_greedy(params):
    model = Llama(CONFIG)
    tokens, mask = _prompts(seed=2)
    greedy = generate(model, params, tokens, mask, None, SamplingConfig(8, temperature=0.0))
    # Slicing the stacked weights at every step instead of once changes nothing.
    sliced = generate(
        model, params, tokens, mask, None, SamplingConfig(8, temperature=0.0), unstack_params=False
    )
    for a, b in zip(greedy, sliced, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    nucleus = generate(
        model, params, tokens, mask, jax.random.PRNGKey(0), SamplingConfig(8, top_p=1e-6)
    )
    np.testing.assert_array_equal(np.asarray(nucleus.tokens), np.asarray(greedy.tokens))
    np.testing.assert_allclose(
        np.asarray(nucleus.logprobs), np.asarray(greedy.logprobs), atol=tolerances.LOSS_F32
    )


# --- 4. layout and errors --------------------------------------------------------------------


def test_response_sequences_layout():
    prompt = np.array([[0, 0, 11, 12], [21, 22, 23, 0], [31, 32, 33, 34]])
    mask = np.array([[0, 0, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1]])
    rollout = Rollout(
        tokens=jnp.array([[5, 6, 7], [8, 9, 0], [4, 0, 0]], jnp.int32),
        logprobs=jnp.array([[-0.1, -0.2, -0.3], [-0.4, -0.5, 0.0], [-0.7, 0.0, 0.0]]),
        lengths=jnp.array([3, 2, 1], jnp.int32),
        is_end=jnp.array([False, True, True]),
    )
    out = response_sequences(prompt, mask, rollout, pad_id=99)
    np.testing.assert_array_equal(
        out["tokens"],
        [
            [11, 12, 5, 6, 7, 99, 99],
            [21, 22, 23, 8, 9, 99, 99],
            [31, 32, 33, 34, 4, 99, 99],
        ],
    )
    np.testing.assert_array_equal(
        out["attention_mask"], [[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0, 0], [1] * 5 + [0, 0]]
    )
    np.testing.assert_array_equal(
        out["response_mask"],
        [[0, 0, 1, 1, 1, 0, 0], [0, 0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 1, 0, 0]],
    )
    np.testing.assert_array_equal(out["prompt_lengths"], [2, 3, 4])
    assert all(v.dtype == jnp.int32 for k, v in out.items() if k != "logprobs")
    # The sampler's log-probs sit on the response tokens they belong to, 0 elsewhere.
    np.testing.assert_allclose(
        out["logprobs"],
        [
            [0, 0, -0.1, -0.2, -0.3, 0, 0],
            [0, 0, 0, -0.4, -0.5, 0, 0],
            [0, 0, 0, 0, -0.7, 0, 0],
        ],
        atol=0,
    )
    assert out["logprobs"].dtype == jnp.float32


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(max_new_tokens=2.0), "max_new_tokens"),
        (dict(temperature=-0.5), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_k=-1), "top_k"),
        (dict(top_k=1.5), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(stop_tokens=(-1,)), "stop_tokens"),
        (dict(stop_tokens=("eos",)), "stop_tokens"),
        (dict(pad_id=-1), "pad_id"),
    ],
)
def test_bad_sampling_config(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        SamplingConfig(**{"max_new_tokens": 4, **kwargs})


def test_sampling_config_normalises():
    s = SamplingConfig(4, temperature=0, stop_tokens=[7, 8])
    assert s.stop_tokens == (7, 8) and s.greedy
    assert hash(s) == hash(SamplingConfig(4, 0.0, 0, 1.0, (7, 8)))  # usable as a jit static
    assert SamplingConfig(4, stop_tokens=9).stop_tokens == (9,)


def test_generate_rejects_bad_input(params):
    model = Llama(CONFIG.replace(max_position_embeddings=20))
    tokens, mask = _prompts()
    greedy = SamplingConfig(8, temperature=0.0)
    with pytest.raises(ConfigError, match=r"12 \+ max_new_tokens 9 = 21 exceeds .* 20"):
        generate(model, params, tokens, mask, None, SamplingConfig(9, temperature=0.0))
    with pytest.raises(ConfigError, match="stop_tokens"):
        generate(model, params, tokens, mask, None, SamplingConfig(8, stop_tokens=(1024,)))
    with pytest.raises(ConfigError, match="rng"):
        generate(model, params, tokens, mask, None, SamplingConfig(8, temperature=1.0))
    with pytest.raises(ConfigError, match="prompt_mask"):
        generate(model, params, tokens, mask[:, 1:], None, greedy)


# --- 5. a mesh ----------------------------------------------------------------------------------


def test_greedy_on_a_mesh_equals_single_device():
    # 4 kv heads, so the tensor axis (2) really splits the cache's K/V heads.
    cfg = CONFIG.replace(num_heads=8, num_kv_heads=4, head_dim=8)
    params = _sharp_params(cfg, seed=1)
    tokens, mask = _prompts(seed=3)
    sampling = SamplingConfig(12, temperature=0.0, stop_tokens=(7,))
    model = Llama(cfg)
    want = make_generate_fn(model, sampling)(params, tokens, mask, None)

    mesh = sharding.make_mesh((2, 2, 2))
    param_sharding = sharding.shardings_for(abstract_params(cfg, boxed=True), mesh)
    batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    fn = make_generate_fn(model, sampling)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
        args = (
            jax.device_put(params, param_sharding),
            jax.device_put(tokens, batch),
            jax.device_put(mask, batch),
        )
        hlo = fn.lower(*args, None).as_text()
        got = fn(*args, None)
    assert "sharding" in hlo and len(got.tokens.sharding.device_set) == 8
    for a, b in [(got.tokens, want.tokens), (got.lengths, want.lengths), (got.is_end, want.is_end)]:
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_allclose(
        np.asarray(got.logprobs), np.asarray(want.logprobs), atol=tolerances.SHARDED_F32
    )


def _all_gathers(hlo: str) -> dict[str, int]:
    """All-gathers in the compiled HLO: inside a while loop's body computation, and elsewhere."""
    import re

    bodies = set(re.findall(r"body=%?([\w.\-]+)", hlo))
    counts, computation = {"in_loop": 0, "outside": 0}, None
    for line in hlo.splitlines():
        if not line.startswith(" ") and line.rstrip().endswith("{"):
            computation = line.split()[1 if line.startswith("ENTRY") else 0].lstrip("%")
        if "all-gather(" in line:
            counts["in_loop" if computation in bodies else "outside"] += 1
    return counts


def test_per_step_weights_gather_inside_the_decode_loop():
    """weights="per_step" samples the same tokens as "gathered" on a (1, 8, 1) FSDP mesh, and
    its decode loop gathers the layer weights itself instead of XLA hoisting every gather out
    of the loop (which keeps the whole gathered policy on every device)."""
    cfg = CONFIG.replace(num_heads=8, num_kv_heads=4, head_dim=8)
    params = _sharp_params(cfg, seed=1)
    tokens, mask = _prompts(lengths=(5, 8, 3, 6, 8, 2, 7, 4), seed=3)
    mesh = sharding.make_mesh((1, 8, 1))
    param_sharding = sharding.shardings_for(abstract_params(cfg, boxed=True), mesh)
    batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    results, gathers = {}, {}
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
        args = (
            jax.device_put(params, param_sharding),
            jax.device_put(tokens, batch),
            jax.device_put(mask, batch),
        )
        for weights in ("gathered", "per_step"):
            fn = make_generate_fn(Llama(cfg), SamplingConfig(12, temperature=0.0, weights=weights))
            gathers[weights] = _all_gathers(fn.lower(*args, None).compile().as_text())
            results[weights] = fn(*args, None)
    np.testing.assert_array_equal(
        np.asarray(results["per_step"].tokens), np.asarray(results["gathered"].tokens)
    )
    # Every FSDP-sharded weight is gathered inside the loop with per_step: 7 matrices per layer,
    # the embedding and the LM head (norm scales are not sharded).
    assert gathers["per_step"]["in_loop"] >= 7 * cfg.num_layers + 2, gathers
    assert gathers["gathered"]["in_loop"] < gathers["per_step"]["in_loop"], gathers
