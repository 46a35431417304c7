"""Projections: `dense("BTD,DNH->BTNH", x, w, dtype)`, the product every linear layer makes.

Computed as one 2-D product [B*T, prod C] x [prod C, prod R] with float32 accumulation, whose
custom gradient keeps the backward's two products in the compute dtype too. Why this helps on
every back end: JAX's own transpose would feed the backward a float32 cotangent, doubling the
bytes of both gradient products in bf16 training; the 2-D form contracts one merged row axis
for the weight gradient, which tensor cores and XLA:CPU alike run as a single GEMM; and float32
accumulation is what Megatron and torch do for bf16 matmuls.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp


def _product(a, b, out_dtype, transpose_a=False, transpose_b=False):
    """op(a) @ op(b) of two 2-D arrays, accumulated in float32, returned in out_dtype."""
    dims = (((0,) if transpose_a else (1,), (1,) if transpose_b else (0,)), ((), ()))
    return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32).astype(out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def matmul(x: jax.Array, w: jax.Array, dtype) -> jax.Array:
    """x [Z, C] @ w [C, R] -> [Z, R] in `dtype`: inputs cast to `dtype`, float32 accumulation."""
    return _product(x.astype(dtype), w.astype(dtype), dtype)


def _matmul_fwd(x, w, dtype):
    xc, wc = x.astype(dtype), w.astype(dtype)
    # Zero-size arrays carry the input dtypes (residuals must be arrays).
    return _product(xc, wc, dtype), (xc, wc, jnp.zeros((0,), x.dtype), jnp.zeros((0,), w.dtype))


def _matmul_bwd(dtype, residuals, g):
    xc, wc, x_proto, w_proto = residuals
    g = g.astype(dtype)
    dx = _product(g, wc, x_proto.dtype, transpose_b=True)  # g w^T: no transposed copy of w
    dw = _product(xc, g, w_proto.dtype, transpose_a=True)  # x^T g
    return dx, dw


matmul.defvjp(_matmul_fwd, _matmul_bwd)


def dense(eq: str, x: jax.Array, w: jax.Array, dtype) -> jax.Array:
    """x [B, T, *C] times w [*C, *R] -> [B, T, *R] in `dtype`, e.g. "BTD,DNH->BTNH"."""
    xs, rest = eq.split(",")
    ws, out = rest.split("->")
    n_contract = len(xs) - 2
    if xs[2:] != ws[:n_contract] or out != xs[:2] + ws[n_contract:]:
        raise ValueError(f"dense needs the form 'BT<C>,<C><R>->BT<R>', got {eq!r}")
    b, t = x.shape[:2]
    w2 = w.reshape(math.prod(w.shape[:n_contract]), -1)
    y = matmul(x.reshape(b * t, -1), w2, dtype)
    return y.reshape(b, t, *w.shape[n_contract:])
