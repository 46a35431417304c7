"""Host settings that keep XLA:CPU from paying page faults on every step.

    from nemotron_jax import runtime
    runtime.configure_cpu()  # first thing in a program, before any JAX computation

Why: XLA:CPU allocates every buffer of an execution afresh (the step's temporaries in one block,
often hundreds of MB) and frees it when the execution ends. With JAX's asynchronous CPU dispatch
that happens on a worker thread, whose glibc arena cannot hold a block over 64 MB, so glibc maps
fresh pages from the kernel for it and unmaps them afterwards: every step then faults on every
page it touches. Measured on a 2-core VM, the bf16 reward step of benchmarks/reward_step.py took
about 202,000 faults (800 MB) and a fifth of its time there. Two settings remove them:

1. `jax_cpu_enable_async_dispatch=False`: single-device computations run on the calling thread,
   whose allocations come from glibc's main arena. Multi-device computations stay asynchronous
   (JAX applies the flag to single-device ones only). It must be set before JAX creates its CPU
   client, i.e. before the first computation.
2. glibc `M_MMAP_THRESHOLD` and `M_TRIM_THRESHOLD` at 1 GiB: blocks up to 1 GiB come from the
   heap and freed ones stay there for the next step instead of going back to the kernel. The
   process keeps its peak heap, which a training process reaches on its first step anyway.

Both are process-wide, so they also apply to anything else in the process (torch included; it is
not slowed by them). They are applied only when JAX's default backend will be the CPU (no GPU or
TPU plugin installed, or JAX_PLATFORMS starting with cpu): on an accelerator host the step's
buffers live on the device. Set NEMOTRON_JAX_CPU_TUNING=0 to leave the process as it is.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import os

# glibc's mallopt parameter numbers (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
HEAP_THRESHOLD_BYTES = 1 << 30


def _glibc():
    """The process's C library if it is glibc (mallopt with these semantics), else None."""
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()
        return libc
    except (OSError, AttributeError):  # macOS, musl, Windows
        return None


def _backends_started() -> bool:
    """Whether JAX has created its clients (after which dispatch settings no longer apply)."""
    try:
        from jax._src.xla_bridge import backends_are_initialized  # private: may move
    except ImportError:
        return False  # then the flag is set regardless; it is harmless if too late
    return backends_are_initialized()


# Distributions whose presence makes a GPU or TPU JAX's default backend.
_ACCELERATOR_PLUGINS = ("jax-cuda12-plugin", "jax-cuda13-plugin", "jax-rocm", "libtpu")


def _default_backend_is_cpu() -> bool:
    """Whether JAX's default backend is (or, before it starts, will be) the CPU, without
    starting it: asking `jax.default_backend()` first would create the clients."""
    import jax

    platforms = jax.config.jax_platforms or os.environ.get("JAX_PLATFORMS", "")
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    if _backends_started():
        return jax.default_backend() == "cpu"
    names = {
        (d.metadata["Name"] or "").lower().replace("_", "-")
        for d in importlib.metadata.distributions()
    }
    return not any(name.startswith(_ACCELERATOR_PLUGINS) for name in names)


def configure_cpu(enabled: bool | None = None) -> dict[str, str]:
    """Applies the settings above; returns what each one did (for logs and benchmark headers).

    enabled=None reads NEMOTRON_JAX_CPU_TUNING (default on; "0" turns it off).
    """
    import jax

    if enabled is None:
        enabled = os.environ.get("NEMOTRON_JAX_CPU_TUNING", "1") != "0"
    if not enabled:
        return {"cpu_tuning": "off"}
    if not _default_backend_is_cpu():
        return {"cpu_tuning": "not applied: the default backend is an accelerator"}
    done = {}
    if _backends_started():
        done["async_dispatch"] = "unchanged: JAX's CPU client already exists"
    elif "jax_cpu_enable_async_dispatch" not in jax.config.values:
        done["async_dispatch"] = f"unchanged: jax {jax.__version__} has no such flag"
    else:
        jax.config.update("jax_cpu_enable_async_dispatch", False)
        done["async_dispatch"] = "off"
    libc = _glibc()
    if libc is None:
        done["malloc"] = "unchanged: not glibc"
    else:
        ok = [
            libc.mallopt(_M_TRIM_THRESHOLD, HEAP_THRESHOLD_BYTES),
            libc.mallopt(_M_MMAP_THRESHOLD, HEAP_THRESHOLD_BYTES),
        ]
        # Some glibc versions refuse mmap thresholds above 32 MB; the trim threshold still holds.
        done["malloc"] = (
            f"heap up to {HEAP_THRESHOLD_BYTES >> 20} MiB, kept after free"
            if all(ok)
            else f"partly applied (mallopt returned {ok})"
        )
    return done


def describe(done: dict[str, str]) -> str:
    return "; ".join(f"{k}: {v}" for k, v in done.items())
