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
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from nemotron_jax import sharding
from nemotron_jax.errors import ConfigError
from nemotron_jax.kernels.attention import attention as kernel_attention
from nemotron_jax.kernels.attention import attention_sharded
from nemotron_jax.kernels.attention.reference import apply_rope
from nemotron_jax.sharding import constrain

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
ROPE_TYPES = ("default", "llama3")
ATTENTION_IMPLS = ("auto", "xla", "cpu", "cudnn", "pallas", "pallas_interpret")
MATMUL_IMPLS = ("xla", "onednn")
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}
# Finite, so that a row with every key masked gives a uniform softmax rather than NaN.
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


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
    # nemotron_jax.kernels.attention implementation: "auto" picks cuDNN on GPUs for bf16/fp16
    # compute, the fused "cpu" kernel on one CPU device for float32/bf16 (if a C++ compiler can
    # build it) and plain XLA otherwise; or "xla", "cpu" (C++ forward and backward, RoPE inside),
    # "cudnn", "pallas", "pallas_interpret".
    attention_impl: str = "auto"
    # Projection and LM-head products: "xla" (any backend, any mesh) or "onednn", oneDNN's CPU
    # matmul through an XLA FFI call (nemotron_jax.kernels.onednn; one CPU device, the onednn
    # extra and a C++ compiler). Changes no parameter and no result beyond float rounding.
    matmul_impl: str = "xla"

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
        if self.matmul_impl not in MATMUL_IMPLS:
            raise ConfigError(
                f"unknown matmul_impl {self.matmul_impl!r}; choose from {MATMUL_IMPLS}"
            )
        if self.attention_impl == "cpu" and self.dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"attention_impl 'cpu' takes float32 or bfloat16, not dtype "
                              f"{self.dtype!r}; use 'auto' or 'xla'")  # fmt: skip
        if self.matmul_impl == "onednn" and self.dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"matmul_impl 'onednn' computes in float32 or bfloat16, not dtype "
                              f"{self.dtype!r}")  # fmt: skip
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(f"unknown remat {self.remat!r}; choose from {list(REMAT_POLICIES)}")
        if not isinstance(self.scan_unroll, int) or self.scan_unroll <= 0:
            raise ConfigError(f"scan_unroll must be a positive int, got {self.scan_unroll!r}")
        for field in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
        ):
            if not isinstance(getattr(self, field), int) or getattr(self, field) <= 0:
                raise ConfigError(f"{field} must be a positive int, got {getattr(self, field)!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads ({self.num_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if isinstance(self.eos_token_id, int):
            object.__setattr__(self, "eos_token_id", (self.eos_token_id,))
        else:
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))

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
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LlamaConfig:
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"unknown LlamaConfig field(s): {sorted(unknown)}")
        return cls(**d)

    # --- Hugging Face config.json ---------------------------------------------------------

    @classmethod
    def from_hf(cls, hf: dict[str, Any], **overrides: Any) -> LlamaConfig:
        """Reads an HF `config.json` dict: hub form (`rope_scaling` + `rope_theta`) or the
        transformers-v5 form (`rope_parameters`). Settings this model cannot honour raise."""
        return cls(**{**_fields_from_hf(hf), **overrides})

    def to_hf(self, architecture: str = "LlamaForCausalLM") -> dict[str, Any]:
        """The HF `config.json` dict, in the hub form that real Llama-3.1 checkpoints use
        (`rope_scaling` + `rope_theta`); transformers v4 and v5 both read it."""
        rope_scaling = None
        if self.rope_type == "llama3":
            rope_scaling = {
                "rope_type": "llama3",
                "factor": self.rope_factor,
                "low_freq_factor": self.rope_low_freq_factor,
                "high_freq_factor": self.rope_high_freq_factor,
                "original_max_position_embeddings": self.rope_original_max_position_embeddings,
            }
        eos = self.eos_token_id[0] if len(self.eos_token_id) == 1 else list(self.eos_token_id)
        return {
            "architectures": [architecture],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": rope_scaling,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "mlp_bias": False,
            "pretraining_tp": 1,
            "initializer_range": 0.02,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": self.param_dtype,
            "use_cache": True,
        }


# HF config keys whose value must be exactly this for the model here to be the same model.
_HF_REQUIRED = {
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "pretraining_tp": 1,
}


def _fields_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    model_type = hf.get("model_type", "llama")
    if model_type != "llama":
        raise ConfigError(f"config.json model_type is {model_type!r}; only 'llama' is supported")
    for key, want in _HF_REQUIRED.items():
        if key in hf and hf[key] != want:
            raise ConfigError(f"unsupported config field {key}={hf[key]!r} (need {want!r})")
    for key in ("sliding_window", "layer_types", "quantization_config"):
        if hf.get(key) not in (None, [], {}) and not (
            key == "layer_types" and set(hf[key]) <= {"full_attention"}
        ):
            raise ConfigError(f"unsupported config field {key}={hf[key]!r}")
    try:
        heads = hf["num_attention_heads"]
        fields = {
            "vocab_size": hf["vocab_size"],
            "hidden_size": hf["hidden_size"],
            "intermediate_size": hf["intermediate_size"],
            "num_layers": hf["num_hidden_layers"],
            "num_heads": heads,
            "num_kv_heads": hf.get("num_key_value_heads") or heads,
        }
    except KeyError as e:
        raise ConfigError(f"config.json lacks required field {e.args[0]!r}") from None
    fields["head_dim"] = hf.get("head_dim") or fields["hidden_size"] // heads
    fields["rms_norm_eps"] = hf.get("rms_norm_eps", 1e-6)
    fields["max_position_embeddings"] = hf.get("max_position_embeddings", 2048)
    fields["tie_word_embeddings"] = bool(hf.get("tie_word_embeddings", False))
    if hf.get("bos_token_id") is not None:
        fields["bos_token_id"] = hf["bos_token_id"]
    if hf.get("eos_token_id") is not None:
        eos = hf["eos_token_id"]
        fields["eos_token_id"] = tuple(eos) if isinstance(eos, list | tuple) else (eos,)
    fields["pad_token_id"] = hf.get("pad_token_id")
    dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    if dtype not in DTYPES:
        raise ConfigError(f"unsupported config field torch_dtype={dtype!r}; use {list(DTYPES)}")
    fields["param_dtype"] = fields["dtype"] = dtype

    # transformers v5 nests everything, rope_theta included, under rope_parameters.
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    fields["rope_theta"] = float(theta)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ConfigError(
            f"unsupported rope type {rope_type!r} in config.json; supported: {list(ROPE_TYPES)}"
        )
    if rope.get("attention_factor") not in (None, 1, 1.0):
        raise ConfigError(f"unsupported rope attention_factor={rope['attention_factor']!r}")
    fields["rope_type"] = rope_type
    if rope_type == "llama3":
        try:
            fields["rope_factor"] = float(rope["factor"])
            fields["rope_low_freq_factor"] = float(rope["low_freq_factor"])
            fields["rope_high_freq_factor"] = float(rope["high_freq_factor"])
            fields["rope_original_max_position_embeddings"] = int(
                rope["original_max_position_embeddings"]
            )
        except KeyError as e:
            raise ConfigError(f"llama3 rope scaling lacks field {e.args[0]!r}") from None
    return fields


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


def make_attention_mask(
    q_positions: jax.Array, kv_positions: jax.Array, kv_valid: jax.Array
) -> jax.Array:
    """Boolean [B, T, S]: query t may attend key s iff s is a real token not after t.

    Causality is by position, not by index, so the same mask serves a KV cache whose slots hold
    earlier positions (queries [B, T], cache keys [B, S]).
    """
    causal = kv_positions[:, None, :] <= q_positions[:, :, None]
    return causal & kv_valid[:, None, :].astype(bool)


def _fused_attention(q, k, v, impl, **kwargs):
    """A kernel attention call (Pallas, cuDNN or the fused CPU kernel; `kwargs` as
    `kernel_attention` takes them); under a (data, fsdp, tensor) mesh it runs per shard in
    `shard_map`, since GSPMD would otherwise replicate an opaque kernel call."""
    mesh = sharding.active_mesh()
    if mesh is not None:
        return attention_sharded(q, k, v, mesh=mesh, implementation=impl, **kwargs)
    return kernel_attention(q, k, v, implementation=impl, **kwargs)


def resolve_attention_impl(config: LlamaConfig) -> str:
    """The attention implementation for this config on the default backend: with "auto",
    cuDNN on a GPU in 16-bit compute; the fused "cpu" kernel on the CPU in float32 or bfloat16
    outside a multi-device mesh (where "xla" partitions any batch, while a per-shard kernel
    needs the batch to divide the mesh) when it builds here (it needs a C++ compiler); else
    "xla"."""
    if config.attention_impl != "auto":
        return config.attention_impl
    backend = jax.default_backend()
    if backend == "gpu" and config.dtype in ("bfloat16", "float16"):
        return "cudnn"
    mesh = sharding.active_mesh()
    single_device = mesh is None or mesh.size == 1
    if backend == "cpu" and config.dtype in ("float32", "bfloat16") and single_device:
        from nemotron_jax.kernels.attention import cpu  # lazy: builds the kernel on first use

        if cpu.available():
            return "cpu"
    return "xla"


# --- layers --------------------------------------------------------------------------------


_NORMAL_INIT = nn.initializers.normal(stddev=0.02)  # HF initializer_range


def _init(names: tuple[str, ...], init=_NORMAL_INIT):
    return nn.with_logical_partitioning(init, names)


def _product(a, b, out_dtype, impl, transpose_a=False, transpose_b=False):
    """op(a) @ op(b) accumulated in float32, returned in out_dtype, by XLA or by oneDNN."""
    if impl == "onednn":
        from nemotron_jax.kernels import onednn  # lazy: builds the handler on first use

        return onednn.matmul(
            a, b, out_dtype=out_dtype, transpose_a=transpose_a, transpose_b=transpose_b
        )
    dims = (((0,) if transpose_a else (1,), (1,) if transpose_b else (0,)), ((), ()))
    y = jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)
    return y.astype(out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _matmul(x: jax.Array, w: jax.Array, dtype, impl: str = "xla", out_dtype=None) -> jax.Array:
    """x [Z, C] @ w [C, R] -> [Z, R]: inputs cast to `dtype`, float32 accumulation, result in
    `out_dtype` (default `dtype`).

    The custom gradient keeps the backward's two products in `dtype` as well (JAX's own
    transpose would feed them a float32 cotangent). With impl "xla" and a 16-bit dtype it saves x
    already transposed, so that the weight gradient x^T g is a plain [C, Z] x [Z, R] product,
    which XLA:CPU runs in bf16 instead of upcasting a transposed operand; oneDNN reads transposed
    operands in place.
    """
    return _product(x.astype(dtype), w.astype(dtype), out_dtype or dtype, impl)


def _save_transposed(dtype, impl) -> bool:
    return impl == "xla" and jnp.dtype(dtype) != jnp.float32


def _matmul_fwd(x, w, dtype, impl, out_dtype):
    xc, wc = x.astype(dtype), w.astype(dtype)
    y = _product(xc, wc, out_dtype or dtype, impl)
    saved_x = xc.T if _save_transposed(dtype, impl) else xc
    # Zero-size arrays carry the input dtypes (residuals must be arrays).
    return y, (saved_x, wc, jnp.zeros((0,), x.dtype), jnp.zeros((0,), w.dtype))


def _matmul_bwd(dtype, impl, out_dtype, residuals, g):
    saved_x, wc, x_proto, w_proto = residuals
    g = g.astype(dtype)
    # dx = g w^T, a contraction over R, so that no transpose of w is materialised.
    dx = _product(g, wc, x_proto.dtype, impl, transpose_b=True)
    dw = _product(saved_x, g, w_proto.dtype, impl, transpose_a=not _save_transposed(dtype, impl))
    return dx, dw


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def _dot(eq: str, x: jax.Array, w: jax.Array, dtype, impl: str = "xla") -> jax.Array:
    """x [B, T, *C] times w [*C, *R] -> [B, T, *R], e.g. "BTD,DNH->BTNH": inputs in the compute
    dtype, float32 accumulation (on XLA:CPU a bf16 dot is only fast with one, and it is more
    accurate), output cast back to dtype.

    Computed as one 2-D product [B*T, prod C] x [prod C, prod R] (`_matmul`): XLA:CPU runs 2-D
    dots and their backward much faster than the batched einsum (a reward-model training step
    took 1.6x less time in bf16), and the weight gradient contracts one merged row axis.
    """
    xs, rest = eq.split(",")
    ws, out = rest.split("->")
    n_contract = len(xs) - 2
    if xs[2:] != ws[:n_contract] or out != xs[:2] + ws[n_contract:]:
        raise ValueError(f"_dot needs the form 'BT<C>,<C><R>->BT<R>', got {eq!r}")
    b, t = x.shape[:2]
    w2 = w.reshape(math.prod(w.shape[:n_contract]), -1)
    y = _matmul(x.reshape(b * t, -1), w2, dtype, impl)
    return y.reshape(b, t, *w.shape[n_contract:])


def _silu_times(gate: jax.Array, up: jax.Array, dtype) -> jax.Array:
    """SwiGLU's silu(gate) * up, in float32 and rounded once to dtype: on XLA:CPU a bf16
    silu * up is twice as slow (0.72 against 0.35 ms for [1024, 768]) as well as rounded twice."""
    return (jax.nn.silu(gate.astype(jnp.float32)) * up.astype(jnp.float32)).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _onednn_swiglu(x: jax.Array, w_gate: jax.Array, up: jax.Array, dtype) -> jax.Array:
    """silu(x [Z, D] @ w_gate [D, F]) * up [Z, F] -> [Z, F] in dtype, as one oneDNN call whose
    post-ops apply silu and the product to the float32 accumulators (`onednn.matmul`'s
    `silu_times`): the gate is neither rounded nor written to memory, and no separate
    elementwise pass runs (in bf16 that pass took 0.4 of a layer's 3.5 ms).

    This fused call is the inference path. Differentiating runs the unfused one instead (the
    gate product, then `_silu_times`), which keeps the gate for the backward; its value rounds
    the gate to dtype first, so the two differ by at most that rounding.
    """
    from nemotron_jax.kernels import onednn  # lazy: builds the handler on first use

    xc, wc = x.astype(dtype), w_gate.astype(dtype)
    return onednn.matmul(xc, wc, out_dtype=dtype, silu_times=up.astype(dtype))


def _swiglu_unfused(x, w_gate, up, dtype):
    return _silu_times(_matmul(x, w_gate, dtype, "onednn"), up, dtype)


def _onednn_swiglu_fwd(x, w_gate, up, dtype):
    return jax.vjp(functools.partial(_swiglu_unfused, dtype=dtype), x, w_gate, up)


def _onednn_swiglu_bwd(dtype, vjp, g):
    return vjp(g)


_onednn_swiglu.defvjp(_onednn_swiglu_fwd, _onednn_swiglu_bwd)


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
        return _scale_features(xf.astype(dtype), scale.astype(dtype))


@jax.custom_vjp
def _scale_features(x: jax.Array, scale: jax.Array) -> jax.Array:
    """x [..., D] * scale [D]. The gradient of scale, a sum of g * x over every row, is taken as
    a [1, rows] x [rows, D] product with float32 accumulation: in a bf16 training step XLA:CPU
    otherwise lowers each such column sum to a reduce-window that took 4-6 ms (about 7% of the
    benchmark step for the 9 norms), against well under 1 ms as a product."""
    return x * scale


def _scale_features_fwd(x, scale):
    return x * scale, (x, scale)


def _scale_features_bwd(residuals, g):
    x, scale = residuals
    gx = (g * x).reshape(-1, x.shape[-1])
    ones = jnp.ones((1, gx.shape[0]), gx.dtype)
    d_scale = jnp.dot(ones, gx, preferred_element_type=jnp.float32)[0]
    return (g * scale).astype(x.dtype), d_scale.astype(scale.dtype)


_scale_features.defvjp(_scale_features_fwd, _scale_features_bwd)


ATTENTION_BLOCKS = 4


def _xla_attention(q, k, v, mask):
    return kernel_attention(q, k, v, mask=mask, causal=False)


def _onednn_attention(q, k, v, mask):
    from nemotron_jax.kernels import onednn  # lazy: builds the handler on first use

    return onednn.attention(q, k, v, mask=mask)


def block_causal_attention(q, k, v, mask, blocks=ATTENTION_BLOCKS, attend=_xla_attention):
    """XLA attention for self-attention whose mask is causal by index (T == S, positions
    arange): the queries are split into `blocks` row blocks and block i attends only to keys
    [0, end of block i), so the fully masked scores above the diagonal are never computed (with 4
    blocks 3/8 of the score and probability work is skipped). The [B, T, S] mask, which carries
    the padding, still applies inside each block, so the result equals the plain call.
    Measured on the CPU reward-step benchmark (T = 256): ~8% (float32) and ~10% (bfloat16) off
    the step; 8 blocks were no faster than 4.
    """
    t = q.shape[1]
    blocks = min(blocks, t)
    bounds = [i * t // blocks for i in range(1, blocks)]
    # Split and concatenate rather than slice: their transposes are concatenate and split, so
    # the backward assembles dq, dk and dv without the zero-padded [B, T, ...] copy per block
    # that a slice's transpose (a pad) makes (measured ~45 ms of a 0.55 s bf16 CPU step).
    q_blocks = jnp.split(q, bounds, axis=1)
    k_blocks, v_blocks = jnp.split(k, bounds, axis=1), jnp.split(v, bounds, axis=1)
    mask_rows = jnp.split(mask, bounds, axis=1)
    outs = []
    for i, q_i in enumerate(q_blocks):
        hi = t if i == blocks - 1 else bounds[i]
        k_i = jnp.concatenate(k_blocks[: i + 1], axis=1)
        v_i = jnp.concatenate(v_blocks[: i + 1], axis=1)
        outs.append(attend(q_i, k_i, v_i, mask_rows[i][:, :, :hi]))
    return jnp.concatenate(outs, axis=1)


class Attention(nn.Module):
    """Grouped-query causal self-attention with RoPE.

    The core `attend(q, k, v, mask)` sees keys/values and a [B, T, S] mask, not the sequence that
    produced them, so a KV cache only has to supply longer k, v and mask.

    With `kv_cache` ({"k", "v"}: this layer's [B, K, S, H] slabs) the T new keys/values are
    written at slot `cache_index` and the queries attend over all S slots (`mask` is then
    [B, T, S]); the updated slabs are the second output (None without a cache). The slabs are
    head-major, the layout the XLA attention reads, so no step copies a transposed cache.
    """

    config: LlamaConfig

    @nn.compact
    def __call__(
        self, x, cos, sin, mask, segment_ids, index_causal=False, kv_cache=None, cache_index=None
    ):
        cfg = self.config
        dtype, pdtype = DTYPES[cfg.dtype], DTYPES[cfg.param_dtype]
        d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        wq = self.param("q_proj", _init(("embed", "q_heads", "head_dim")), (d, n, h), pdtype)
        wk = self.param("k_proj", _init(("embed", "kv_heads", "head_dim")), (d, k, h), pdtype)
        wv = self.param("v_proj", _init(("embed", "kv_heads", "head_dim")), (d, k, h), pdtype)
        wo = self.param("o_proj", _init(("q_heads", "head_dim", "embed")), (n, h, d), pdtype)

        q = _dot("BTD,DNH->BTNH", x, wq, dtype, cfg.matmul_impl)
        key = _dot("BSD,DKH->BSKH", x, wk, dtype, cfg.matmul_impl)
        value = _dot("BSD,DKH->BSKH", x, wv, dtype, cfg.matmul_impl)
        impl = resolve_attention_impl(cfg) if kv_cache is None else "xla"
        if impl != "cpu":  # the "cpu" kernel rotates q and k itself, as it loads them
            q, key = apply_rope(q, cos, sin), apply_rope(key, cos, sin)
        q = constrain(q, ("act_batch", "act_seq", "act_heads", None))
        if kv_cache is not None:

            def write(slab, new):  # new [B, T, K, H] into slab [B, K, S, H] at cache_index
                new = new.transpose(0, 2, 1, 3).astype(dtype)
                # In place when the cache is loop-carried (or donated); K split like kv_heads.
                slab = jax.lax.dynamic_update_slice(slab, new, (0, 0, cache_index, 0))
                return constrain(slab, ("act_batch", "act_heads", "act_seq", None))

            kv_cache = {"k": write(kv_cache["k"], key), "v": write(kv_cache["v"], value)}
            # [B, S, K, H] views; XLA folds them into the attention's own head-major transpose.
            key, value = (kv_cache[name].transpose(0, 2, 1, 3) for name in ("k", "v"))
            # The fused kernels are causal by index; a cache needs causality by position.
            out = kernel_attention(q, key, value, mask=mask, causal=False)
            return _dot("BTNH,NHD->BTD", out, wo, dtype, cfg.matmul_impl), kv_cache
        # With matmul_impl "onednn" the XLA path's two batched products go through oneDNN too, in
        # 16-bit compute only: there it took 4% off the bf16 reward-step benchmark, while in
        # float32 XLA's own products were 2.5% faster.
        attend = _xla_attention
        if cfg.matmul_impl == "onednn" and cfg.dtype != "float32":
            attend = _onednn_attention
        if impl == "cpu":
            # The [B, T, S] mask holds causality by position; `causal=index_causal` lets the
            # kernel skip the keys after each query when positions are indices.
            out = _fused_attention(
                q, key, value.astype(dtype), impl, mask=mask, causal=index_causal, rope=(cos, sin)
            )
        elif impl == "xla" and index_causal:
            out = block_causal_attention(q, key, value.astype(dtype), mask, attend=attend)
        elif impl == "xla":  # the [B, T, S] mask already carries causality by position
            out = attend(q, key, value.astype(dtype), mask)
        else:  # fused kernels take padding as segment ids and causality by index
            out = _fused_attention(
                q, key, value.astype(dtype), impl, segment_ids=segment_ids, causal=True
            )
        return _dot("BTNH,NHD->BTD", out, wo, dtype, cfg.matmul_impl), None


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        dtype, pdtype = DTYPES[cfg.dtype], DTYPES[cfg.param_dtype]
        d, f = cfg.hidden_size, cfg.intermediate_size
        w_gate = self.param("gate_proj", _init(("embed", "mlp")), (d, f), pdtype)
        w_up = self.param("up_proj", _init(("embed", "mlp")), (d, f), pdtype)
        w_down = self.param("down_proj", _init(("mlp", "embed")), (f, d), pdtype)
        up = _dot("BTD,DF->BTF", x, w_up, dtype, cfg.matmul_impl)
        if cfg.matmul_impl == "onednn":  # the gate product, silu and * up in one call
            b, t, _ = x.shape
            hidden = _onednn_swiglu(x.reshape(b * t, d), w_gate, up.reshape(b * t, f), dtype)
            hidden = hidden.reshape(b, t, f)
        else:
            hidden = _silu_times(_dot("BTD,DF->BTF", x, w_gate, dtype, "xla"), up, dtype)
        hidden = constrain(hidden, ("act_batch", "act_seq", "act_mlp"))
        return _dot("BTF,FD->BTD", hidden, w_down, dtype, cfg.matmul_impl)


class DecoderLayer(nn.Module):
    """One pre-norm block; the (carry, output) signature is what `nn.scan` expects. The output
    is this layer's updated KV-cache slabs when given a cache (`Llama.decode`), else None."""

    config: LlamaConfig

    @nn.compact
    def __call__(
        self, x, cos, sin, mask, segment_ids, index_causal=False, kv_cache=None, cache_index=None
    ):
        cfg = self.config
        attn, kv_cache = Attention(cfg, name="self_attn")(
            RMSNorm(cfg, name="input_layernorm")(x),
            cos,
            sin,
            mask,
            segment_ids,
            index_causal,
            kv_cache,
            cache_index,
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
            split_rngs={"params": True},
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
        mask is then causal by index for every real query, as it always is for default positions,
        and the XLA attention skips the blocks above the diagonal (`block_causal_attention`), the
        "cpu" kernel the keys after each query.
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
        mask = make_attention_mask(positions, positions, attention_mask)
        cos, sin = rope_cos_sin(cfg, positions)
        x = jnp.take(self.embed_tokens, tokens, axis=0).astype(DTYPES[cfg.dtype])
        x = constrain(x, ("act_batch", "act_seq", "act_embed"))
        segment_ids = attention_mask.astype(jnp.int32)  # 1 = real token, 0 = padding
        x, _ = self.layers(x, cos, sin, mask, segment_ids, index_causal)
        return self.norm(x)

    def decode(self, tokens, positions, valid, cache, *, layer_params=None, last_only=False):
        """A forward over T new tokens that reads and extends a KV cache (`init_cache`).

        Serves the prefill (T = prompt length, left-padded) and each decode step (T = 1). The new
        keys/values go to cache slots [index, index + T); every query attends over all S slots,
        causally by position, so slot order does not matter and padding is just `valid=False`.
        Always the XLA attention (the fused kernels are causal by index, not by position).

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
        mask = make_attention_mask(positions, cache_positions, cache_valid)  # [B, T, S]
        cos, sin = rope_cos_sin(cfg, positions)
        x = jnp.take(self.embed_tokens, tokens, axis=0).astype(DTYPES[cfg.dtype])
        x = constrain(x, ("act_batch", "act_seq", "act_embed"))
        layer = DecoderLayer(cfg, parent=None)  # unbound: applied with each layer's params
        new_k, new_v = [], []
        for i, params in enumerate(layer_params):
            slabs = {"k": cache["k"][i], "v": cache["v"][i]}
            x, slabs = layer.apply(
                {"params": params}, x, cos, sin, mask, None, kv_cache=slabs, cache_index=index
            )
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
        if cfg.matmul_impl == "onednn":
            b, t, _ = hidden.shape
            flat = _matmul(hidden.reshape(b * t, -1), w, dtype, "onednn", out_dtype)
            logits = flat.reshape(b, t, -1)
        else:
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
