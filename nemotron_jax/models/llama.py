"""Llama-3.1 decoder in Flax Linen, computing what Hugging Face's `LlamaForCausalLM` computes.

Pure-functional: parameters are a plain nested dict and a forward pass is

    logits = Llama(config).apply({"params": params}, tokens, attention_mask=mask)   # [B, T, V]

Parameter names mirror HF (`embed_tokens`, `q_proj`, ..., `lm_head`) so conversion is a rename
plus a transpose or reshape (`nemotron_jax/convert/hf_llama.py`). Layers are stacked on a leading
axis of length L by `nn.scan`. RoPE uses HF's rotate-half layout, so HF q/k weights load as they
are, with no permutation.

Einsum letters used throughout:
    B batch            T query length       S key/value length
    D hidden size      N query heads        K key/value heads     G = N / K query heads per K
    H head dim         F MLP size           V vocabulary          L layers
    R LoRA rank

With `lora_rank > 0` each projection named in `lora_targets` also has a low-rank adapter,
`<proj>_lora_a` [*in, R] and `<proj>_lora_b` [R, *out] (float32, logically sharded like the
in and out axes of the weight they adapt), and computes
`x @ W + (lora_alpha / R) * (dropout(x) @ A) @ B`. B starts at zero, so a fresh adapter leaves
the base model's outputs unchanged (`nemotron_jax/models/lora.py`: merge, adapters off).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from nemotron_jax.errors import ConfigError
from nemotron_jax.kernels.attention import CHOICES as ATTENTION_IMPLS
from nemotron_jax.kernels.attention import apply_rope, attention, position_mask
from nemotron_jax.kernels.attention import check_implementation as check_attention_impl
from nemotron_jax.kernels.attention import prepare as prepare_attention
from nemotron_jax.kernels.dense import dense
from nemotron_jax.sharding import constrain

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
ROPE_TYPES = ("default", "llama3")
# The projections LoRA may adapt, as PEFT names them for Llama.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture and numerics of a Llama-3.x decoder. Frozen and hashable (a jit static)."""

    vocab_size: int = 128256
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 131072
    rope_theta: float = 500000.0
    # "default" is plain RoPE; "llama3" applies Llama-3.1's frequency scaling below.
    rope_type: str = "llama3"
    rope_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False
    bos_token_id: int = 128000
    eos_token_id: tuple[int, ...] = (128001, 128008, 128009)
    pad_token_id: int | None = None
    # Storage dtype of the parameters and dtype of activations / matmul inputs. Matmuls always
    # accumulate in float32; RMSNorm statistics, softmax and logits are float32.
    param_dtype: str = "float32"
    dtype: str = "float32"
    # dtype of the [B, T, V] logits. float32 (default) is what losses and log-probs need; an
    # inference-only run may ask for the compute dtype, which HF's bf16 models return and which
    # halves the largest activation.
    logits_dtype: str = "float32"
    # Activation rematerialisation per layer: "none", "full" (save nothing) or "dots".
    remat: str = "none"
    # Layers per iteration of the layer `nn.scan` (`unroll`); more lets XLA schedule across
    # layers at the cost of compile time. Changes no parameter.
    scan_unroll: int = 1
    # Which `nemotron_jax.kernels.attention` implementation runs (one of ATTENTION_IMPLS);
    # "auto" lets `kernels.attention.resolve_implementation` choose for the backend, dtype and
    # mesh. Changes no parameter and no result beyond float rounding.
    attention_impl: str = "auto"
    # LoRA adapters (see the module docstring); rank 0 means none. The adapters add
    # parameters; everything else about the architecture is the base model's.
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    lora_dropout: float = 0.0

    def __post_init__(self):
        for field in ("dtype", "param_dtype", "logits_dtype"):
            if getattr(self, field) not in DTYPES:
                raise ConfigError(
                    f"unsupported {field} {getattr(self, field)!r}; choose from {list(DTYPES)}"
                )
        if self.rope_type not in ROPE_TYPES:
            raise ConfigError(
                f"unsupported rope type {self.rope_type!r}; supported: {list(ROPE_TYPES)}"
            )
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ConfigError(
                f"unknown attention_impl {self.attention_impl!r}; choose from {ATTENTION_IMPLS}"
            )
        try:
            check_attention_impl(self.attention_impl, DTYPES[self.dtype])
        except ValueError as e:
            raise ConfigError(f"attention_impl {self.attention_impl!r}: {e}") from None
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(f"unknown remat {self.remat!r}; choose from {list(REMAT_POLICIES)}")
        if not isinstance(self.scan_unroll, int) or self.scan_unroll <= 0:
            raise ConfigError(f"scan_unroll must be a positive int, got {self.scan_unroll!r}")
        sizes = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads")
        for field in (*sizes, "num_kv_heads", "head_dim"):
            if not isinstance(getattr(self, field), int) or getattr(self, field) <= 0:
                raise ConfigError(f"{field} must be a positive int, got {getattr(self, field)!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads ({self.num_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")
        eos = self.eos_token_id
        object.__setattr__(self, "eos_token_id", (eos,) if isinstance(eos, int) else tuple(eos))
        targets = self.lora_targets
        targets = (targets,) if isinstance(targets, str) else tuple(targets)
        object.__setattr__(self, "lora_targets", targets)
        if not isinstance(self.lora_rank, int) or self.lora_rank < 0:
            raise ConfigError(f"lora_rank must be an int >= 0, got {self.lora_rank!r}")
        unknown = [t for t in targets if t not in LORA_TARGETS]
        if unknown or not targets:
            raise ConfigError(
                f"lora_targets {list(targets)}: {unknown or 'empty'} not among the projections "
                f"{list(LORA_TARGETS)}"
            )
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.lora_rank and not self.lora_alpha > 0:
            raise ConfigError(f"lora_alpha must be positive, got {self.lora_alpha!r}")

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    def replace(self, **changes: Any) -> LlamaConfig:
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ConfigError(f"unknown LlamaConfig field(s): {sorted(unknown)}")
        return dataclasses.replace(self, **changes)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> LlamaConfig:
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; valid presets: {sorted(PRESETS)}")
        return PRESETS[name].replace(**overrides)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["eos_token_id"] = list(self.eos_token_id)
        d["lora_targets"] = list(self.lora_targets)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LlamaConfig:
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"unknown LlamaConfig field(s): {sorted(unknown)}")
        return cls(**d)


_LLAMA31 = dict(vocab_size=128256, head_dim=128, num_kv_heads=8, rope_theta=500000.0)
PRESETS: dict[str, LlamaConfig] = {
    # A few hundred thousand parameters: unit tests, smoke runs and the CPU demos.
    "tiny": LlamaConfig(
        vocab_size=1024,
        hidden_size=64,
        intermediate_size=176,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        max_position_embeddings=2048,
        rope_original_max_position_embeddings=256,
        bos_token_id=2,
        eos_token_id=(3,),
        pad_token_id=0,
    ),
    "llama3.1-8b": LlamaConfig(
        **_LLAMA31, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32
    ),
    "llama3.1-70b": LlamaConfig(
        **_LLAMA31, hidden_size=8192, intermediate_size=28672, num_layers=80, num_heads=64
    ),
    "llama3.1-405b": LlamaConfig(
        **_LLAMA31, hidden_size=16384, intermediate_size=53248, num_layers=126, num_heads=128
    ),
}


# --- RoPE ----------------------------------------------------------------------------------


def rope_inv_freq(config: LlamaConfig) -> np.ndarray:
    """Inverse frequencies [H/2] in float32, with Llama-3.1 scaling when rope_type is llama3.

    Follows transformers' `_compute_llama3_parameters` step for step (float32 throughout), so the
    angles match HF's bit for bit up to the last ulp of `pow`.
    """
    h = config.head_dim
    exponents = np.arange(0, h, 2, dtype=np.int64).astype(np.float32) / np.float32(h)
    inv_freq = (np.float32(1.0) / (np.float32(config.rope_theta) ** exponents)).astype(np.float32)
    if config.rope_type == "default":
        return inv_freq
    factor = config.rope_factor
    low, high = config.rope_low_freq_factor, config.rope_high_freq_factor
    old_len = config.rope_original_max_position_embeddings
    wavelen = (2 * math.pi / inv_freq).astype(np.float32)
    scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq).astype(np.float32)
    smooth = ((old_len / wavelen - low) / (high - low)).astype(np.float32)
    smoothed = ((1 - smooth) * scaled / factor + smooth * scaled).astype(np.float32)
    # Boundary wavelengths count as "medium", as in HF.
    medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_cos_sin(config: LlamaConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos and sin tables [B, T, H] (float32) for integer positions [B, T]."""
    inv_freq = jnp.asarray(rope_inv_freq(config))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
    angles = jnp.concatenate([angles, angles], axis=-1)  # rotate-half layout
    return jnp.cos(angles), jnp.sin(angles)


# --- masks and positions -------------------------------------------------------------------


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """Positions [B, T] counting only real tokens: 0, 1, ... from each row's first real token.

    Equal to `arange(T)` for right padding; needed for left-padded prompts.
    """
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


# --- layers --------------------------------------------------------------------------------


_NORMAL_INIT = nn.initializers.normal(stddev=0.02)  # HF initializer_range


def _init(names: tuple[str, ...], init=_NORMAL_INIT):
    return nn.with_logical_partitioning(init, names)


def projection(module: nn.Module, name: str, eq: str, x, shape, names) -> jax.Array:
    """`dense(eq, x, W)` for the weight `name` of `shape` and logical `names`, plus its LoRA
    adapter when `config.lora_targets` names it.

    `eq` is "<x letters>,<W letters>-><out letters>" with W's input letters first (those it
    shares with x, e.g. "BTD,DNH->BTNH"); A takes W's input axes and B its output axes.
    """
    cfg = module.config
    dtype = DTYPES[cfg.dtype]
    w = module.param(name, _init(names), shape, DTYPES[cfg.param_dtype])
    y = dense(eq, x, w, dtype)
    if not cfg.lora_rank or name not in cfg.lora_targets:
        return y
    x_letters, w_letters = eq.split("->")[0].split(",")
    n_in = sum(c in x_letters for c in w_letters)
    w_in, w_out = w_letters[:n_in], w_letters[n_in:]
    rows = "".join(c for c in x_letters if c not in w_letters)
    r = cfg.lora_rank
    # PEFT's default init: A ~ kaiming-uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in)); B = 0.
    a_init = nn.initializers.variance_scaling(
        1 / 3, "fan_in", "uniform", in_axis=tuple(range(n_in)), out_axis=-1
    )
    a = module.param(
        name + "_lora_a", _init(names[:n_in] + (None,), a_init), shape[:n_in] + (r,), jnp.float32
    )
    b = module.param(
        name + "_lora_b",
        _init((None,) + names[n_in:], nn.initializers.zeros),
        (r,) + shape[n_in:],
        jnp.float32,
    )
    if cfg.lora_dropout and module.has_rng("dropout"):
        keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - cfg.lora_dropout, x.shape)
        x = jnp.where(keep, x / (1.0 - cfg.lora_dropout), 0).astype(x.dtype)
    low = dense(f"{x_letters},{w_in}R->{rows}R", x, a, dtype)
    delta = dense(f"{rows}R,R{w_out}->{eq.split('->')[1]}", low, b, dtype)
    return y + (delta.astype(jnp.float32) * (cfg.lora_alpha / r)).astype(y.dtype)


class RMSNorm(nn.Module):
    """HF's LlamaRMSNorm: statistics in float32, cast back to the input dtype, then scaled."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        scale = self.param(
            "scale",
            _init(("norm",), nn.initializers.ones),
            (cfg.hidden_size,),
            DTYPES[cfg.param_dtype],
        )
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + cfg.rms_norm_eps)
        dtype = DTYPES[cfg.dtype]
        return xf.astype(dtype) * scale.astype(dtype)


class Attention(nn.Module):
    """Grouped-query causal self-attention with RoPE.

    Without a cache, q, k, v, the rotary tables and the padding go to `kernels.attention`, which
    applies RoPE (or fuses it) and picks the back end of `config.attention_impl`.

    With `kv_cache` ({"k", "v": this layer's [B, K, S, H] slabs, "index": the first slot to
    write, "mask": [B, T, S] causal by position}) the T new, rotated keys/values are written at
    slot `index` and the queries attend over all S slots; the updated slabs are the second
    output (None without a cache). With a cache and `positions` (a prefill into an empty cache)
    the queries attend only to the T new tokens, as self-attention. The slabs are head-major,
    the layout the XLA attention reads, so no step copies a transposed cache.
    """

    config: LlamaConfig

    @nn.compact
    def __call__(self, x, cos, sin, positions, segment_ids, index_causal=False, kv_cache=None):
        cfg = self.config
        dtype = DTYPES[cfg.dtype]
        d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q_names, kv_names = ("embed", "q_heads", "head_dim"), ("embed", "kv_heads", "head_dim")
        q = projection(self, "q_proj", "BTD,DNH->BTNH", x, (d, n, h), q_names)
        key = projection(self, "k_proj", "BSD,DKH->BSKH", x, (d, k, h), kv_names)
        value = projection(self, "v_proj", "BSD,DKH->BSKH", x, (d, k, h), kv_names)

        def output(out):  # [B, T, N, H] -> [B, T, D]
            o_names = ("q_heads", "head_dim", "embed")
            return projection(self, "o_proj", "BTNH,NHD->BTD", out, (n, h, d), o_names)

        if kv_cache is None:
            q = constrain(q, ("act_batch", "act_seq", "act_heads", None))
            # Causal by position; `index_causal` tells the kernel it may skip later keys.
            out = attention(
                q, key, value, segment_ids=segment_ids, positions=positions,
                causal=index_causal, rope=(cos, sin), implementation=cfg.attention_impl,
            )  # fmt: skip
            return output(out), None

        q, key = apply_rope(q, cos, sin), apply_rope(key, cos, sin)
        q = constrain(q, ("act_batch", "act_seq", "act_heads", None))
        index = kv_cache["index"]
        if positions is not None:
            # A prefill into an empty cache: the T tokens attend among themselves, as
            # self-attention, so flash kernels apply and no [T, S] scores over the cache form.
            out = attention(
                q, key, value, segment_ids=segment_ids, positions=positions, causal=True,
                implementation=cfg.attention_impl,
            )  # fmt: skip

        def write(slab, new):  # new [B, T, K, H] into slab [B, K, S, H] at slot `index`
            new = new.transpose(0, 2, 1, 3).astype(dtype)
            # In place when the cache is loop-carried (or donated); K split like kv_heads.
            slab = jax.lax.dynamic_update_slice(slab, new, (0, 0, index, 0))
            return constrain(slab, ("act_batch", "act_heads", "act_seq", None))

        slabs = {"k": write(kv_cache["k"], key), "v": write(kv_cache["v"], value)}
        if positions is None:
            # [B, S, K, H] views; XLA folds them into the attention's head-major transpose.
            key, value = (slabs[name].transpose(0, 2, 1, 3) for name in ("k", "v"))
            out = attention(
                q, key, value, mask=kv_cache["mask"], causal=False,
                implementation=cfg.attention_impl,
            )  # fmt: skip
        return output(out), slabs


def _silu_times(gate: jax.Array, up: jax.Array, dtype) -> jax.Array:
    """SwiGLU's silu(gate) * up, in float32 and rounded to dtype once (not twice)."""
    return (jax.nn.silu(gate.astype(jnp.float32)) * up.astype(jnp.float32)).astype(dtype)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        dtype = DTYPES[cfg.dtype]
        d, f = cfg.hidden_size, cfg.intermediate_size
        up = projection(self, "up_proj", "BTD,DF->BTF", x, (d, f), ("embed", "mlp"))
        gate = projection(self, "gate_proj", "BTD,DF->BTF", x, (d, f), ("embed", "mlp"))
        hidden = _silu_times(gate, up, dtype)
        hidden = constrain(hidden, ("act_batch", "act_seq", "act_mlp"))
        return projection(self, "down_proj", "BTF,FD->BTD", hidden, (f, d), ("mlp", "embed"))


class DecoderLayer(nn.Module):
    """One pre-norm block; the (carry, output) signature is what `nn.scan` expects. The output
    is this layer's updated KV-cache slabs when given a cache (`Llama.decode`), else None."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x, cos, sin, positions, segment_ids, index_causal=False, kv_cache=None):
        cfg = self.config
        normed = RMSNorm(cfg, name="input_layernorm")(x)
        attn, kv_cache = Attention(cfg, name="self_attn")(
            normed, cos, sin, positions, segment_ids, index_causal, kv_cache
        )
        x = x + attn
        x = x + MLP(cfg, name="mlp")(RMSNorm(cfg, name="post_attention_layernorm")(x))
        return constrain(x, ("act_batch", "act_seq", "act_embed")), kv_cache


class Llama(nn.Module):
    """The decoder plus LM head. `__call__` returns logits [B, T, V] (in `logits_dtype`).

    Args of `__call__` / `hidden_states`:
        tokens: int [B, T].
        positions: int [B, T]; defaults to arange(T), as HF's forward does. Left-padded batches
            pass `positions_from_mask(attention_mask)`.
        attention_mask: [B, T], 1 for real tokens and 0 for padding; defaults to all ones.

    Attributes:
        config: the architecture.
        with_lm_head: False builds the backbone alone, without the `lm_head` parameter (reward
            models put their own head on it); `__call__` and `logits` then raise, so initialise
            with `init(..., method="hidden_states")`. Keyword-only, so subclasses can add
            positional fields after `config`.
    """

    config: LlamaConfig
    with_lm_head: bool = dataclasses.field(default=True, kw_only=True)

    def __post_init__(self):
        super().__post_init__()
        # Any attention back end that needs building is built now, before the first trace.
        prepare_attention(self.config.attention_impl, DTYPES[self.config.dtype])

    def setup(self):
        cfg = self.config
        pdtype = DTYPES[cfg.param_dtype]
        self.embed_tokens = self.param(
            "embed_tokens", _init(("vocab", "embed")), (cfg.vocab_size, cfg.hidden_size), pdtype
        )
        layer = DecoderLayer
        if cfg.remat != "none":
            # Argument 6 (counting self) is the Python bool `index_causal`.
            layer = nn.remat(
                layer, prevent_cse=False, policy=REMAT_POLICIES[cfg.remat], static_argnums=(6,)
            )
        self.layers = nn.scan(
            layer,
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(nn.broadcast,) * 5,
            length=cfg.num_layers,
            unroll=min(cfg.scan_unroll, cfg.num_layers),
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(cfg, name="layers")
        self.norm = RMSNorm(cfg, name="norm")
        if self.with_lm_head and not cfg.tie_word_embeddings:
            self.lm_head = self.param(
                "lm_head", _init(("embed", "vocab")), (cfg.hidden_size, cfg.vocab_size), pdtype
            )

    def __call__(self, tokens, *, positions=None, attention_mask=None, return_hidden=False):
        hidden = self.hidden_states(tokens, positions=positions, attention_mask=attention_mask)
        logits = self.logits(hidden)
        return (logits, hidden) if return_hidden else logits

    def hidden_states(self, tokens, *, positions=None, attention_mask=None, real_rows_only=False):
        """Final-norm hidden states [B, T, D] in the compute dtype (what reward heads read).

        `real_rows_only=True` declares that only the rows of real tokens will be read and that
        `positions` increase along every row's real tokens (as `positions_from_mask` gives); the
        attention is then causal by index for every real query, as it always is for default
        positions, and may skip the keys after each query (`kernels.attention`, `causal=True`).
        Rows of padding queries may then differ from the plain attention's (they never feed a
        real row: padding keys are masked).
        """
        cfg = self.config
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, length], got shape {tokens.shape}")
        b, t = tokens.shape
        index_causal = positions is None or real_rows_only
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), dtype=bool)
        cos, sin = rope_cos_sin(cfg, positions)
        x = jnp.take(self.embed_tokens, tokens, axis=0).astype(DTYPES[cfg.dtype])
        x = constrain(x, ("act_batch", "act_seq", "act_embed"))
        segment_ids = attention_mask.astype(jnp.int32)  # 1 = real token, 0 = padding
        x, _ = self.layers(x, cos, sin, positions, segment_ids, index_causal)
        return self.norm(x)

    def decode(
        self, tokens, positions, valid, cache, *, layer_params=None, last_only=False,
        prefill=False,
    ):  # fmt: skip
        """A forward over T new tokens that reads and extends a KV cache (`init_cache`).

        Serves the prefill (T = prompt length, left-padded) and each decode step (T = 1). The new
        keys/values go to cache slots [index, index + T); every query attends over all S slots,
        causally by position, so slot order does not matter and padding is just `valid=False`.
        The attention gets that [B, T, S] mask; `kernels.attention` runs it on a back end that
        takes masks.

        The layers run unrolled, not under `nn.scan`: a scan slices every layer's weights out of
        the stacked [L, ...] params at every call, which inside a decode loop copies all the
        weights once per token. Pass `layer_params=unstack_layers(params)`, computed once outside
        the loop, to avoid that.

        Args:
            tokens: int [B, T].
            positions: int [B, T], e.g. `positions_from_mask` for a left-padded prompt, then each
                row's next position.
            valid: [B, T], True for real tokens (padding is never attended to).
            cache: the dict `init_cache` returns, with room for T more tokens.
            layer_params: `unstack_layers(params)`; default: sliced from the params here.
            last_only: logits only at the last of the T positions ([B, 1, V]), which is all a
                left-padded prefill needs.
            prefill: the cache is empty and `positions` increase along each row's real tokens
                (`positions_from_mask`): the tokens attend among themselves through the
                self-attention path (flash kernels; no [T, S] scores over the whole cache).

        Returns:
            (logits [B, T, V] or [B, 1, V] in logits_dtype, the updated cache, index + T).
        """
        cfg = self.config
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, length], got shape {tokens.shape}")
        if layer_params is None:
            layer_params = unstack_layers(nn.unbox(self.variables["params"]))
        index = cache["index"]
        positions = positions.astype(jnp.int32)
        cache_positions = jax.lax.dynamic_update_slice(cache["positions"], positions, (0, index))
        cache_valid = jax.lax.dynamic_update_slice(cache["valid"], valid.astype(bool), (0, index))
        mask = position_mask(positions, cache_positions, cache_valid)  # [B, T, S]
        cos, sin = rope_cos_sin(cfg, positions)
        x = jnp.take(self.embed_tokens, tokens, axis=0).astype(DTYPES[cfg.dtype])
        x = constrain(x, ("act_batch", "act_seq", "act_embed"))
        layer = DecoderLayer(cfg, parent=None)  # unbound: applied with each layer's params
        new_k, new_v = [], []
        for i, params in enumerate(layer_params):
            slabs = {"k": cache["k"][i], "v": cache["v"][i], "index": index, "mask": mask}
            self_attention = (positions, valid.astype(jnp.int32)) if prefill else (None, None)
            x, slabs = layer.apply({"params": params}, x, cos, sin, *self_attention, kv_cache=slabs)
            new_k.append(slabs["k"])
            new_v.append(slabs["v"])
        if last_only:
            x = x[:, -1:]
        logits = self.logits(self.norm(x))
        new_cache = {
            "k": tuple(new_k),
            "v": tuple(new_v),
            "positions": cache_positions,
            "valid": cache_valid,
            "index": index + tokens.shape[1],
        }
        return logits, new_cache

    def hidden_and_head(self, tokens, *, positions=None, attention_mask=None):
        """(final hidden states [B, T, D], LM head [D, V]): the inputs of the fused per-token
        log-prob kernel, which never forms the [B, T, V] logits."""
        hidden = self.hidden_states(tokens, positions=positions, attention_mask=attention_mask)
        return hidden, self.lm_head_matrix()

    def lm_head_matrix(self) -> jax.Array:
        """The output projection [D, V] (the embedding, transposed, when tied)."""
        if not self.with_lm_head:
            raise ValueError(f"{type(self).__name__} was built without an LM head")
        if self.config.tie_word_embeddings:
            return self.embed_tokens.T
        return self.lm_head

    def logits(self, hidden):
        """Logits [B, T, V] in `logits_dtype` (float32 by default) from final hidden states
        [B, T, D]; float32 accumulation either way."""
        cfg = self.config
        dtype, out_dtype = DTYPES[cfg.dtype], DTYPES[cfg.logits_dtype]
        w = self.lm_head_matrix().astype(dtype)
        logits = jnp.einsum(
            "BTD,DV->BTV", hidden.astype(dtype), w, preferred_element_type=jnp.float32
        ).astype(out_dtype)
        return constrain(logits, ("act_batch", "act_seq", "act_vocab"))


def init_cache(config: LlamaConfig, batch: int, max_len: int) -> dict[str, Any]:
    """An empty KV cache for `Llama.decode` with room for `max_len` tokens per row.

    {"k", "v": tuples of L slabs [B, K, S, H] in the compute dtype (one buffer per layer, so
     each is updated in place),
     "positions": int32 [B, S], "valid": bool [B, S] (False = empty slot or padding),
     "index": int32 [] (the next slot to write)}.
    """
    shape = (batch, config.num_kv_heads, max_len, config.head_dim)
    names = ("act_batch", "act_heads", "act_seq", None)

    def slabs():
        return tuple(
            constrain(jnp.zeros(shape, DTYPES[config.dtype]), names)
            for _ in range(config.num_layers)
        )

    return {
        "k": slabs(),
        "v": slabs(),
        "positions": jnp.zeros((batch, max_len), jnp.int32),
        "valid": jnp.zeros((batch, max_len), bool),
        "index": jnp.zeros((), jnp.int32),
    }


def unstack_layers(params: Any) -> tuple[Any, ...]:
    """Each layer's parameter tree, sliced out of the stacked [L, ...] `params["layers"]` (a
    copy of the layer weights; see `Llama.decode`)."""
    layers = params["layers"]
    num_layers = jax.tree.leaves(layers)[0].shape[0]
    return tuple(jax.tree.map(lambda w, i=i: w[i], layers) for i in range(num_layers))


def abstract_params(config: LlamaConfig, *, boxed: bool = False) -> Any:
    """Parameter shapes and dtypes via `jax.eval_shape`: nothing is allocated, at any size.

    With `boxed=True` the leaves keep their logical-axis metadata (`nn.LogicallyPartitioned`).
    """
    tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    variables = jax.eval_shape(Llama(config).init, jax.random.PRNGKey(0), tokens)
    params = variables["params"]
    return params if boxed else nn.unbox(params)


def init_params(config: LlamaConfig, rng: jax.Array) -> Any:
    """Random parameters (HF's init: normal(0.02) weights, unit norms) as a plain dict."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    return nn.unbox(jax.jit(Llama(config).init)(rng, tokens)["params"])


def count_params(config: LlamaConfig) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_params(config)))
