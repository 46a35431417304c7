"""Attention: `attention(q, k, v, implementation=...)`, the one call a model makes.

`ops.py` holds the API (`attention`, `resolve_implementation`, `prepare`, `attention_sharded`),
`xla.py` the plain-XLA implementation, `reference.py` the oracle and the masking rules,
`pallas_gpu.py` the Triton flash kernels; the fused CPU kernel lives in `kernels/cpu/`. This
package is also callable (`nemotron_jax.kernels.attention(q, k, v)`), because the package and
the function share a name and Python binds the package to its parent once it is imported.
"""

import sys
import types

from nemotron_jax.kernels.attention.ops import (
    CHOICES,
    IMPLEMENTATIONS,
    attention,
    attention_sharded,
    check_implementation,
    position_mask,
    prepare,
    resolve_implementation,
)
from nemotron_jax.kernels.attention.pallas_gpu import BlockSizes, pallas_attention
from nemotron_jax.kernels.attention.reference import apply_rope, attention_reference, build_mask

__all__ = [
    "CHOICES",
    "IMPLEMENTATIONS",
    "BlockSizes",
    "apply_rope",
    "attention",
    "attention_reference",
    "attention_sharded",
    "build_mask",
    "check_implementation",
    "pallas_attention",
    "position_mask",
    "prepare",
    "resolve_implementation",
]


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return attention(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
