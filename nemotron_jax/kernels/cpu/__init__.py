"""Back ends that only the CPU runs: C++ kernels called through XLA FFI, built from source.

Quarantined here, behind the op APIs (`kernels.attention`); nothing outside `kernels/` imports
this package. `attention.py` is the fused attention (`implementation="cpu"`), `build.py` compiles
and caches the handlers.
"""
