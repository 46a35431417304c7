"""nemotron_jax.kernels.dense: the projection product against einsum, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nemotron_jax.kernels.dense import dense
from tests import tolerances


@pytest.mark.parametrize(
    "eq,x_shape,w_shape",
    [
        ("BTD,DNH->BTNH", (2, 5, 12), (12, 3, 4)),
        ("BTNH,NHD->BTD", (2, 5, 3, 4), (3, 4, 12)),
        ("BTD,DF->BTF", (3, 4, 8), (8, 20)),
    ],
)
def test_float32_matches_einsum(eq, x_shape, w_shape):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=x_shape), jnp.float32)
    w = jnp.asarray(rng.normal(size=w_shape), jnp.float32)
    g = jnp.asarray(rng.normal(size=jnp.einsum(eq.lower(), x, w).shape), jnp.float32)
    got, got_vjp = jax.vjp(lambda a, b: dense(eq, a, b, jnp.float32), x, w)
    want, want_vjp = jax.vjp(lambda a, b: jnp.einsum(eq.lower(), a, b), x, w)
    np.testing.assert_allclose(got, want, atol=tolerances.SIMPLE_F32, rtol=tolerances.SIMPLE_F32)
    for a, e in zip(got_vjp(g), want_vjp(g), strict=True):
        np.testing.assert_allclose(a, e, atol=tolerances.SIMPLE_F32, rtol=tolerances.SIMPLE_F32)


def test_bfloat16_compute_keeps_the_input_dtypes():
    """bf16 compute on float32 (master) weights: output in bf16, float32 accumulation, and the
    gradients come back in the dtypes of x and w."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(2, 3, 16)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(16, 8)), jnp.float32)
    y, vjp = jax.vjp(lambda a, b: dense("BTD,DF->BTF", a, b, jnp.bfloat16), x, w)
    assert y.dtype == jnp.bfloat16
    exact = jnp.einsum(
        "btd,df->btf", x.astype(jnp.float32), w.astype(jnp.bfloat16).astype(jnp.float32)
    )
    np.testing.assert_array_equal(np.asarray(y), np.asarray(exact.astype(jnp.bfloat16)))
    dx, dw = vjp(jnp.ones_like(y))
    assert dx.dtype == jnp.bfloat16 and dw.dtype == jnp.float32


def test_bad_equation():
    with pytest.raises(ValueError, match="dense needs the form"):
        dense("BTD,FD->BTF", jnp.zeros((1, 2, 3)), jnp.zeros((4, 3)), jnp.float32)
