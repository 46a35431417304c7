"""Fused kernels, each beside its plain-JAX oracle (`kernels/<op>/reference.py`).

Imports are lazy so that importing `nemotron_jax` never pulls in Pallas. Add one entry per op to
`_LAZY` (public name -> defining module).
"""

import importlib

_LAZY = {
    "attention": "nemotron_jax.kernels.attention",
    "token_logprobs": "nemotron_jax.kernels.logprobs",
    "token_logprobs_sharded": "nemotron_jax.kernels.logprobs",
}


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
