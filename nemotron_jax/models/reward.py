"""Reward model: the Llama backbone with a linear head read at each row's last real token.

    outputs = RewardModel(config).apply({"params": params}, tokens, attention_mask=mask)  # [B, A]

This is NeMo-Aligner's regression reward model (helpsteer2_spec.md §2.2): `o = W h + b`, where
`h` is the final-norm hidden state of the last real token and A = 9 attribute slots (slot 4 is
helpfulness, the slot the Bradley-Terry losses read). The same module serves regression and BT
training, so a BT stage can start from a regression checkpoint head included (§2.3).

Parameters are a plain dict

    {embed_tokens, layers, norm, reward_head: {kernel [D, A], bias [A]}}

whose backbone keys are exactly `Llama`'s, so an HF-converted Llama checkpoint loads by key
(`reward_params_from_backbone` drops its `lm_head` and adds a head). The head is stored and
computed in float32 whatever `param_dtype` is: it is D x A numbers, so this costs nothing, and it
is NeMo's code default (`force_head_dtype` absent).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from nemotron_jax.models.llama import Llama, LlamaConfig, positions_from_mask
from nemotron_jax.sharding import constrain

NUM_ATTRIBUTES = 9
# NeMo reads the BT reward from output[:, 4], the helpfulness slot of HelpSteer2.
HELPFULNESS_SLOT = 4


def _reward_head(num_attributes: int) -> nn.Dense:
    """The head `h [.., D] -> o [.., A]`: float32 params and math, HF-like normal(0.02) init."""
    return nn.Dense(
        num_attributes,
        use_bias=True,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        # D x A is tiny; full precision keeps TF32 (the GPU default for f32 dots) off the rewards.
        precision=jax.lax.Precision.HIGHEST,
        kernel_init=nn.with_logical_partitioning(
            nn.initializers.normal(stddev=0.02), ("embed", "attributes")
        ),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("attributes",)),
    )


def last_token_index(attention_mask: jax.Array) -> jax.Array:
    """Index [B] of each row's last real token: the last t with attention_mask[b, t] == 1.

    For right padding this is `sum(mask) - 1`; it is also right for left padding. A row with no
    real token gives T - 1 (its output is meaningless and must be weighted out by the loss).
    """
    mask = attention_mask.astype(bool).astype(jnp.int32)
    t = mask.shape[-1]
    return t - 1 - jnp.argmax(mask[..., ::-1], axis=-1)


class RewardModel(Llama):
    """Llama backbone (no LM head) plus a `Dense(D -> A)` head with bias, read at the last token.

    Attributes:
        config: the backbone architecture.
        num_attributes: A, the number of head outputs (9 in the NVIDIA recipe).
    """

    num_attributes: int = NUM_ATTRIBUTES
    with_lm_head: bool = dataclasses.field(default=False, kw_only=True)

    def setup(self):
        if self.with_lm_head:
            raise ValueError("a RewardModel has no LM head; leave with_lm_head=False")
        if not isinstance(self.num_attributes, int) or self.num_attributes <= 0:
            raise ValueError(f"num_attributes must be a positive int, got {self.num_attributes!r}")
        super().setup()
        self.reward_head = _reward_head(self.num_attributes)

    def __call__(self, tokens, *, attention_mask, positions=None):
        """Head outputs at the last real token of every sequence.

        Args:
            tokens: int [B, T], or [B, K, T] for K responses per example (K = 2 for pairs: row
                0 is response_1, row 1 is response_2).
            attention_mask: [B, T] or [B, K, T], 1 for real tokens, 0 for padding. Right padding
                is the norm (the reading index is then `sum(mask) - 1`); left padding also works.
            positions: int, same shape as tokens. Defaults to `positions_from_mask(mask)`, which
                is `arange(T)` for right padding and counts from the first real token otherwise.

        Returns:
            float32 [B, A], or [B, K, A] for [B, K, T] tokens.
        """
        tokens = jnp.asarray(tokens)
        attention_mask = jnp.asarray(attention_mask)
        if attention_mask.shape != tokens.shape:
            raise ValueError(
                f"attention_mask shape {attention_mask.shape} != tokens shape {tokens.shape}"
            )
        if positions is not None and jnp.shape(positions) != tokens.shape:
            raise ValueError(f"positions shape {jnp.shape(positions)} != tokens {tokens.shape}")
        if tokens.ndim == 3:
            b, k, t = tokens.shape
            flat = [
                None if x is None else jnp.reshape(x, (b * k, t))
                for x in (tokens, attention_mask, positions)
            ]
            out = self._read_rows(*flat)
            return out.reshape(b, k, self.num_attributes)
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [B, T] or [B, K, T], got shape {tokens.shape}")
        return self._read_rows(tokens, attention_mask, positions)

    def _read_rows(self, tokens, attention_mask, positions):
        """[B, T] tokens -> float32 [B, A]."""
        # Only the last real token's row is read, so with positions from the mask the attention
        # may skip the blocks above the diagonal (Llama.hidden_states' `real_rows_only`).
        real_rows_only = positions is None
        if positions is None:
            positions = positions_from_mask(attention_mask)
        hidden = self.hidden_states(
            tokens,
            positions=positions,
            attention_mask=attention_mask,
            real_rows_only=real_rows_only,
        )
        index = last_token_index(attention_mask)  # [B]
        last = jnp.take_along_axis(hidden, index[:, None, None], axis=1)[:, 0]  # [B, D]
        last = constrain(last, ("act_batch", "act_embed"))
        return self.reward_head(last)

    def token_values(self, tokens, *, attention_mask):
        """Head outputs at every position: float32 [B, T, A] from tokens [B, T] (a PPO critic
        reads its value of each state here; the head is the same `W h + b`)."""
        hidden = self.hidden_states(
            tokens, positions=positions_from_mask(attention_mask), attention_mask=attention_mask
        )
        return self.reward_head(hidden).astype(jnp.float32)


class ActorCritic(nn.Module):
    """PPO's two models as one parameter tree {"policy": Llama params, "critic": RewardModel
    params}: separate backbones (the critic starts from the reward model, as in NeMo-Aligner),
    so each loss term's gradient reaches only its own tree.

    Attributes:
        policy_config, critic_config: the two architectures (the critic's may differ).
        critic_attributes: A of the critic's head (the reward model's); `value_slot` is read.
    """

    policy_config: LlamaConfig
    critic_config: LlamaConfig
    critic_attributes: int
    value_slot: int

    def setup(self):
        self.policy = Llama(self.policy_config)
        self.critic = RewardModel(self.critic_config, self.critic_attributes)

    def values(self, tokens, *, attention_mask):
        """float32 [B, T]: values[:, t] is the critic's value of the state that generates token
        t (its head at position t - 1), aligned with tokens like the per-token log-probs;
        [:, 0] is 0."""
        out = self.critic.token_values(tokens, attention_mask=attention_mask)[..., self.value_slot]
        return jnp.pad(out[:, :-1], ((0, 0), (1, 0)))

    def __call__(self, tokens, *, attention_mask):
        """((hidden [B, T, D], lm_head [D, V]) of the policy, values [B, T] of the critic)."""
        hidden_and_head = self.policy.hidden_and_head(tokens, attention_mask=attention_mask)
        return hidden_and_head, self.values(tokens, attention_mask=attention_mask)


def scalar_reward(
    outputs: jax.Array, *, slot: int = HELPFULNESS_SLOT, weights: Sequence[float] | None = None
) -> jax.Array:
    """The scalar reward from head outputs [..., A] -> float32 [...].

    Args:
        outputs: head outputs [..., A].
        slot: the attribute read when `weights` is None (4 = helpfulness, as in NeMo).
        weights: [A] merge weights (NeMo's `merge_attributes=True`): reward = outputs . weights.
            Overrides `slot`.
    """
    outputs = jnp.asarray(outputs).astype(jnp.float32)
    a = outputs.shape[-1]
    if weights is None:
        if not -a <= slot < a:
            raise ValueError(f"reward slot {slot} out of range for {a} attributes")
        return outputs[..., slot]
    w = jnp.asarray(weights, dtype=jnp.float32)
    if w.shape != (a,):
        raise ValueError(f"merge weights must have shape ({a},), got {w.shape}")
    # Elementwise product and sum: exact float32, no matmul precision setting involved.
    return jnp.sum(outputs * w, axis=-1)


def _dummy_inputs() -> tuple[jax.Array, jax.Array]:
    return jnp.zeros((1, 1), jnp.int32), jnp.ones((1, 1), jnp.int32)


def abstract_reward_params(
    config: LlamaConfig, num_attributes: int = NUM_ATTRIBUTES, *, boxed: bool = False
) -> Any:
    """Parameter shapes and dtypes via `jax.eval_shape` (nothing allocated, at any size).

    With `boxed=True` the leaves keep their logical-axis metadata (`nn.LogicallyPartitioned`).
    """
    tokens, mask = _dummy_inputs()
    model = RewardModel(config, num_attributes)
    variables = jax.eval_shape(
        lambda rng: model.init(rng, tokens, attention_mask=mask), jax.random.PRNGKey(0)
    )
    params = variables["params"]
    return params if boxed else nn.unbox(params)


def init_reward_params(
    config: LlamaConfig, rng: jax.Array, num_attributes: int = NUM_ATTRIBUTES
) -> Any:
    """Random parameters as a plain dict: HF's backbone init, normal(0.02) kernel, zero bias."""
    tokens, mask = _dummy_inputs()
    model = RewardModel(config, num_attributes)
    init_fn = jax.jit(lambda r: model.init(r, tokens, attention_mask=mask))
    return nn.unbox(init_fn(rng)["params"])


_BACKBONE_KEYS = ("embed_tokens", "layers", "norm")


def reward_params_from_backbone(
    backbone_params: Mapping[str, Any],
    head_params_or_rng: Mapping[str, Any] | jax.Array,
    *,
    num_attributes: int = NUM_ATTRIBUTES,
) -> dict[str, Any]:
    """Reward-model params from plain (unboxed) `Llama` params: drops `lm_head`, adds a head.

    Args:
        backbone_params: `{embed_tokens, layers, norm[, lm_head]}`, e.g. from `init_params` or an
            HF conversion. The arrays are reused, not copied.
        head_params_or_rng: either head params `{kernel [D, A], bias [A]}` (A then comes from
            them), or a PRNG key to initialise a fresh head of `num_attributes` outputs.
        num_attributes: A for a freshly initialised head.

    Returns:
        `{embed_tokens, layers, norm, reward_head: {kernel, bias}}`.
    """
    unknown = set(backbone_params) - {*_BACKBONE_KEYS, "lm_head"}
    missing = set(_BACKBONE_KEYS) - set(backbone_params)
    if unknown or missing:
        raise ValueError(
            f"not Llama params: missing {sorted(missing)}, unexpected {sorted(unknown)}"
        )
    d = np.shape(backbone_params["norm"]["scale"])[-1]
    if isinstance(head_params_or_rng, Mapping):
        head = dict(head_params_or_rng)
        kernel_shape, bias_shape = np.shape(head.get("kernel")), np.shape(head.get("bias"))
        if set(head) != {"kernel", "bias"} or (
            len(kernel_shape) != 2 or kernel_shape[0] != d or bias_shape != kernel_shape[1:]
        ):
            raise ValueError(
                f"head params must be {{kernel [{d}, A], bias [A]}}, got "
                f"{ {k: np.shape(v) for k, v in head.items()} }"
            )
    else:
        head_init = _reward_head(num_attributes).init
        head = nn.unbox(head_init(head_params_or_rng, jnp.zeros((1, d), jnp.float32))["params"])
        head = dict(head)
    params = {k: backbone_params[k] for k in _BACKBONE_KEYS}
    params["reward_head"] = head
    return params
