"""Batched autoregressive sampling from `Llama` with a KV cache, compiled as one function.

    sampling = SamplingConfig(max_new_tokens=128, temperature=0.7, top_p=0.9, stop_tokens=(...))
    rollout = generate(model, params, prompt_tokens, prompt_mask, rng, sampling)
    batch = response_sequences(prompt_tokens, prompt_mask, rollout, sampling.pad_id)

`generate` left-aligns the prompts (any padding becomes left padding), runs one prefill over
them into a cache of P + N - 1 slots (`llama.init_cache`), then a `jax.lax.while_loop` of
one-token `Llama.decode` steps that stops as soon as every row has emitted a stop token. Prefill
and loop form one jitted function (model and sampling config are static); the cache is part of
the loop carry, so XLA updates it in place.

Token choice per step, on float32 logits: temperature 0 is greedy (argmax, lowest index on
ties, as torch), otherwise logits / temperature, then top-k, then top-p (nucleus) filtering, as
transformers applies them, and a categorical draw with one key per row and step. The recorded
log-probs are always those of the raw model (temperature 1, unfiltered): what a policy-gradient
loss compares against.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from nemotron_jax.errors import ConfigError
from nemotron_jax.models.llama import Llama, init_cache, positions_from_mask, unstack_layers

SAMPLER_WEIGHTS = ("gathered", "per_step")


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How `generate` picks tokens and when it stops. Frozen and hashable (a jit static).

    Attributes:
        max_new_tokens: N, the most tokens generated per row.
        temperature: logits are divided by it; 0.0 means greedy (argmax, no randomness).
        top_k: keep only the k most likely tokens (ties: the lower token id); 0 = off.
        top_p: keep the smallest most-likely set whose probability reaches top_p (nucleus,
            after top-k; the most likely token always stays); 1.0 = off.
        stop_tokens: a row ends after emitting any of these (e.g. Llama-3.1's eot, eom and
            end_of_text ids); the stop token is part of the output.
        pad_id: written after a row's end.
        weights: how a sharded policy's weights are held while decoding. "gathered": XLA
            all-gathers every weight once and keeps the whole copy (per tensor shard) for the
            rollout: fastest, and it fits up to about 8B on 80 GB devices. "per_step": each
            decode step gathers each layer's weights as it runs it, so a device holds about one
            gathered layer at a time: 70B policies on 80 GB, at the price of moving the policy's
            weights over the fsdp axis once per generated token.
    """

    max_new_tokens: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    stop_tokens: tuple[int, ...] = ()
    pad_id: int = 0
    weights: str = "gathered"

    def __post_init__(self):
        def is_int(x):
            return isinstance(x, int) and not isinstance(x, bool)

        if self.weights not in SAMPLER_WEIGHTS:
            raise ConfigError(f"weights {self.weights!r}; choose from {SAMPLER_WEIGHTS}")
        if not is_int(self.max_new_tokens) or self.max_new_tokens <= 0:
            raise ConfigError(f"max_new_tokens must be a positive int, got {self.max_new_tokens!r}")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t) or t < 0:
            raise ConfigError(f"temperature must be a finite number >= 0, got {t!r}")
        if not is_int(self.top_k) or self.top_k < 0:
            raise ConfigError(f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, int | float) or not 0 < p <= 1:
            raise ConfigError(f"top_p must be in (0, 1] (1 = off), got {p!r}")
        stops = (self.stop_tokens,) if is_int(self.stop_tokens) else self.stop_tokens
        try:
            stops = tuple(stops)
        except TypeError:
            raise ConfigError(f"stop_tokens must be a tuple of ints, got {stops!r}") from None
        if not all(is_int(s) and s >= 0 for s in stops):
            raise ConfigError(f"stop_tokens must be token ids (ints >= 0), got {stops!r}")
        object.__setattr__(self, "stop_tokens", stops)
        if not is_int(self.pad_id) or self.pad_id < 0:
            raise ConfigError(f"pad_id must be a token id (int >= 0), got {self.pad_id!r}")
        object.__setattr__(self, "temperature", float(t))
        object.__setattr__(self, "top_p", float(p))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class Rollout(NamedTuple):
    """What `generate` returns (N = max_new_tokens)."""

    tokens: jax.Array  # int32 [B, N]: generated tokens, pad_id after the stop token
    logprobs: jax.Array  # float32 [B, N]: raw-model log p of each token; 0 after the end
    lengths: jax.Array  # int32 [B]: generated tokens, the stop token included
    is_end: jax.Array  # bool [B]: the row emitted a stop token (False: ran out of tokens)


# --- token choice --------------------------------------------------------------------------


def filter_logits(logits: jax.Array, sampling: SamplingConfig) -> jax.Array:
    """float32 logits [B, V] / temperature with the tokens top-k and top-p reject set to -inf.

    Ties are broken towards the lower token id, so the kept set is deterministic. Not for
    temperature 0 (greedy takes the argmax of the raw logits).
    """
    x = logits.astype(jnp.float32) / sampling.temperature
    b, v = x.shape
    rows = jnp.arange(b)[:, None]
    if sampling.top_k and sampling.top_k < v:
        # lax.top_k returns equal values lowest index first: exactly k tokens survive.
        _, idx = jax.lax.top_k(x, sampling.top_k)
        keep = jnp.zeros((b, v), bool).at[rows, idx].set(True)
        x = jnp.where(keep, x, -jnp.inf)
    if sampling.top_p < 1.0:
        # Only the surviving top-k need sorting when top-k is on.
        k = sampling.top_k if sampling.top_k and sampling.top_k < v else v
        values, idx = jax.lax.top_k(x, k)  # descending; stable on ties
        probs = jax.nn.softmax(values, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # probability mass ranked above each token
        keep_sorted = before < sampling.top_p  # the first token always stays (before = 0)
        keep = jnp.zeros((b, v), bool).at[rows, idx].set(keep_sorted)
        x = jnp.where(keep, x, -jnp.inf)
    return x


def sample_from_logits(
    logits: jax.Array, rng: jax.Array | None, sampling: SamplingConfig
) -> jax.Array:
    """int32 tokens [B] from raw logits [B, V]: argmax when greedy (rng unused), otherwise a
    categorical draw from `filter_logits` with one key per row (`jax.random.split(rng, B)`)."""
    if sampling.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    filtered = filter_logits(logits, sampling)
    keys = jax.random.split(rng, logits.shape[0])
    return jax.vmap(jax.random.categorical)(keys, filtered).astype(jnp.int32)


# --- generation ----------------------------------------------------------------------------


def left_align(tokens: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Moves each row's real tokens (mask 1) to the right end, in order: left padding whatever
    the input padding. Padding slots get token 0 (always a valid embedding row)."""
    mask = jnp.asarray(mask).astype(bool)
    order = jnp.argsort(mask, axis=-1, stable=True)  # pads (False) first, order kept
    tokens = jnp.take_along_axis(jnp.asarray(tokens).astype(jnp.int32), order, axis=-1)
    mask = jnp.take_along_axis(mask, order, axis=-1)
    return jnp.where(mask, tokens, 0), mask


def _check(model: Llama, prompt_tokens, prompt_mask, rng, sampling: SamplingConfig) -> None:
    cfg = model.config
    if not isinstance(sampling, SamplingConfig):
        raise ConfigError(f"sampling must be a SamplingConfig, got {type(sampling).__name__}")
    if not model.with_lm_head:
        raise ConfigError("generate needs a Llama with its LM head (with_lm_head=True)")
    shape, mask_shape = jnp.shape(prompt_tokens), jnp.shape(prompt_mask)
    if len(shape) != 2 or shape != mask_shape:
        raise ConfigError(
            f"prompt_tokens and prompt_mask must both be [batch, length]; got {shape} and "
            f"{mask_shape}"
        )
    p, n = shape[1], sampling.max_new_tokens
    if p + n > cfg.max_position_embeddings:
        raise ConfigError(
            f"prompt length {p} + max_new_tokens {n} = {p + n} exceeds the model's "
            f"max_position_embeddings {cfg.max_position_embeddings}"
        )
    for name, ids in (("stop_tokens", sampling.stop_tokens), ("pad_id", (sampling.pad_id,))):
        if any(i >= cfg.vocab_size for i in ids):
            raise ConfigError(f"{name} {ids} outside the vocabulary (size {cfg.vocab_size})")
    if rng is None and not sampling.greedy:
        raise ConfigError(f"temperature {sampling.temperature} samples: pass an rng key")


class _State(NamedTuple):
    step: jax.Array  # int32 []: index of the next token to choose
    logits: jax.Array  # float32 [B, V]: the model's prediction for that token
    cache: dict[str, Any]  # `init_cache` layout
    position: jax.Array  # int32 [B]: position of the last chosen token
    last: jax.Array  # int32 [B]: the last chosen token
    done: jax.Array  # bool [B]: emitted a stop token
    tokens: jax.Array  # int32 [B, N]
    logprobs: jax.Array  # float32 [B, N]
    lengths: jax.Array  # int32 [B]


def _choose(state: _State, rng, sampling: SamplingConfig) -> _State:
    """Picks token `step` of every row from `state.logits` and records it."""
    key = None if sampling.greedy else jax.random.fold_in(rng, state.step)
    token = sample_from_logits(state.logits, key, sampling)
    log_probs = jax.nn.log_softmax(state.logits, axis=-1)  # raw: temperature 1, unfiltered
    logp = jnp.take_along_axis(log_probs, token[:, None], axis=-1)[:, 0]
    live = ~state.done
    token = jnp.where(live, token, sampling.pad_id)
    logp = jnp.where(live, logp, 0.0)
    stopped = live & jnp.isin(token, jnp.asarray(sampling.stop_tokens, jnp.int32))
    at = (0, state.step)
    return state._replace(
        tokens=jax.lax.dynamic_update_slice(state.tokens, token[:, None], at),
        logprobs=jax.lax.dynamic_update_slice(state.logprobs, logp[:, None], at),
        lengths=state.lengths + live.astype(jnp.int32),
        done=state.done | stopped,
        last=token,
        step=state.step + 1,
    )


def _generate(
    model: Llama,
    params,
    prompt_tokens,
    prompt_mask,
    rng,
    sampling: SamplingConfig,
    unstack_params: bool = True,
):
    _check(model, prompt_tokens, prompt_mask, rng, sampling)
    tokens, mask = left_align(prompt_tokens, prompt_mask)
    b, p = tokens.shape
    n = sampling.max_new_tokens
    # In the compute dtype once: the model casts every weight to it anyway (so the result is
    # the same), and float32 master weights would double what the sampler gathers and holds.
    dtype = jnp.dtype(model.config.dtype)
    params = jax.tree.map(
        lambda w: w.astype(dtype) if jnp.issubdtype(w.dtype, jnp.floating) else w, params
    )
    variables = {"params": params}
    # Sliced once here rather than at every step inside the loop (see `Llama.decode`).
    layers = unstack_layers(params) if unstack_params else None
    # The N-th token is never fed back, so P + N - 1 slots suffice.
    cache = init_cache(model.config, b, p + n - 1)
    positions = positions_from_mask(mask)
    logits, cache = model.apply(
        variables,
        tokens,
        positions,
        mask,
        cache,
        layer_params=layers,
        last_only=True,
        prefill=True,
        method="decode",
    )
    state = _State(
        step=jnp.zeros((), jnp.int32),
        logits=logits[:, 0],  # left padding: the last column is every row's last real token
        cache=cache,
        position=jnp.sum(mask, axis=-1, dtype=jnp.int32) - 1,
        last=jnp.zeros((b,), jnp.int32),
        done=jnp.zeros((b,), bool),
        tokens=jnp.full((b, n), sampling.pad_id, jnp.int32),
        logprobs=jnp.zeros((b, n), jnp.float32),
        lengths=jnp.zeros((b,), jnp.int32),
    )
    state = _choose(state, rng, sampling)

    def cond(s: _State):
        return (s.step < n) & ~jnp.all(s.done)

    def body(s: _State) -> _State:
        position = s.position + 1
        # Rows that have ended feed padding (valid=False); their outputs are discarded anyway.
        new = (s.last[:, None], position[:, None], ~s.done[:, None])
        step_variables, step_layers = variables, layers
        if sampling.weights == "per_step":
            # Tied to the step counter, the weights are no longer loop-invariant: XLA cannot
            # hoist their all-gathers out of the loop and gathers them where each layer runs.
            step_variables, step_layers, _ = jax.lax.optimization_barrier(
                (variables, layers, s.step)
            )
        logits, cache = model.apply(
            step_variables, *new, s.cache, layer_params=step_layers, method="decode"
        )
        s = s._replace(logits=logits[:, 0], cache=cache, position=position)
        return _choose(s, rng, sampling)

    state = jax.lax.while_loop(cond, body, state)
    return Rollout(state.tokens, state.logprobs, state.lengths, state.done)


_generate_jit = jax.jit(_generate, static_argnames=("model", "sampling", "unstack_params"))


def generate(
    model: Llama,
    params: Any,
    prompt_tokens: jax.Array,
    prompt_mask: jax.Array,
    rng: jax.Array | None,
    sampling: SamplingConfig,
    *,
    unstack_params: bool = True,
) -> Rollout:
    """Samples up to `sampling.max_new_tokens` tokens after each prompt.

    Args:
        model: the `Llama` (with its LM head); static under jit.
        params: its parameters.
        prompt_tokens: int [B, P].
        prompt_mask: [B, P], 1 for real tokens and 0 for padding; rows may be left- or
            right-padded and of different lengths (each needs at least one real token).
        rng: a PRNG key; unused (may be None) when greedy.
        sampling: the `SamplingConfig`; static under jit.
        unstack_params: copy each layer's weights out of the stacked [L, ...] params once per
            call (`unstack_layers`): one extra copy of the layer weights in memory, against
            slicing (copying) them at every decode step. False saves the memory; on CPU it costs
            ~15% of decode speed at the benchmark size and ~2x on the tiny preset.

    Returns:
        A `Rollout`. Greedy results depend only on the model and the prompts, not on the
        padding side or `rng`.

    Raises:
        ConfigError: P + max_new_tokens > max_position_embeddings, a stop or pad id outside
            the vocabulary, or no rng for sampling.
    """
    _check(model, prompt_tokens, prompt_mask, rng, sampling)
    return _generate_jit(
        model, params, prompt_tokens, prompt_mask, rng, sampling, unstack_params=unstack_params
    )


def make_generate_fn(model: Llama, sampling: SamplingConfig, *, unstack_params: bool = True):
    """`jax.jit`ted `fn(params, prompt_tokens, prompt_mask, rng) -> Rollout` for one model and
    sampling config (compiled once per prompt shape); `unstack_params` as for `generate`."""

    def fn(params, prompt_tokens, prompt_mask, rng):
        return _generate(model, params, prompt_tokens, prompt_mask, rng, sampling, unstack_params)

    return jax.jit(fn)


# --- training sequences --------------------------------------------------------------------


def response_sequences(
    prompt_tokens: jax.Array, prompt_mask: jax.Array, rollout: Rollout, pad_id: int
) -> dict[str, jax.Array]:
    """Prompt + response as right-padded training rows of width P + N.

    Row b holds its real prompt tokens, then its `rollout.lengths[b]` generated tokens, then
    `pad_id`. `response_mask` is 1 exactly on the generated tokens, aligned with `tokens` (a
    causal LM predicts token t from position t - 1, as `loss_mask` in
    `nemotron_jax.losses.lm.sft`).

    Returns:
        {"tokens": int32 [B, P+N], "attention_mask": int32 [B, P+N],
         "response_mask": int32 [B, P+N], "prompt_lengths": int32 [B],
         "logprobs": float32 [B, P+N]: the sampler's log p of each generated token at its
         position (0 elsewhere), aligned like a recomputed `log p(tokens[t] | tokens[<t])`}.
    """
    mask = jnp.asarray(prompt_mask).astype(bool)
    b, p = mask.shape
    n = rollout.tokens.shape[1]
    # Real prompt tokens first, in order (right padding).
    order = jnp.argsort(~mask, axis=-1, stable=True)
    prompt = jnp.take_along_axis(jnp.asarray(prompt_tokens).astype(jnp.int32), order, axis=-1)
    prompt_len = jnp.sum(mask, axis=-1, dtype=jnp.int32)
    end = prompt_len + rollout.lengths.astype(jnp.int32)
    j = jnp.arange(p + n)[None, :]
    from_prompt = jnp.take_along_axis(prompt, jnp.minimum(j, p - 1), axis=-1)
    gen_index = jnp.clip(j - prompt_len[:, None], 0, n - 1)
    from_response = jnp.take_along_axis(rollout.tokens.astype(jnp.int32), gen_index, axis=-1)
    in_prompt = j < prompt_len[:, None]
    in_response = ~in_prompt & (j < end[:, None])
    tokens = jnp.where(in_prompt, from_prompt, jnp.where(in_response, from_response, pad_id))
    logprobs = jnp.take_along_axis(rollout.logprobs.astype(jnp.float32), gen_index, axis=-1)
    return {
        "logprobs": jnp.where(in_response, logprobs, 0.0),
        "tokens": tokens.astype(jnp.int32),
        "attention_mask": (j < end[:, None]).astype(jnp.int32),
        "response_mask": in_response.astype(jnp.int32),
        "prompt_lengths": prompt_len,
    }
