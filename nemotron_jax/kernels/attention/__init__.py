"""Attention kernels: `attention(q, k, v, implementation=...)` and its oracle.

See `ops.py` for the implementations and `reference.py` for the masking rules. This package is
also callable (`nemotron_jax.kernels.attention(q, k, v)`), because the package and the function
share a name and Python binds the package to its parent once it is imported.
"""

import sys
import types

from nemotron_jax.kernels.attention.ops import IMPLEMENTATIONS, attention, attention_sharded
from nemotron_jax.kernels.attention.pallas_gpu import BlockSizes, pallas_attention
from nemotron_jax.kernels.attention.reference import attention_reference, build_mask

__all__ = [
    "IMPLEMENTATIONS",
    "BlockSizes",
    "attention",
    "attention_reference",
    "attention_sharded",
    "build_mask",
    "pallas_attention",
]


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return attention(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
