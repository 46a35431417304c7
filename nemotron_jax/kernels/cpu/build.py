"""Compile a small C++ XLA FFI handler on first use and cache the shared library.

The CPU kernels (`kernels/cpu/*.cc`) ship as source: a wheel
of prebuilt libraries would have to match every jaxlib's FFI headers and every CPU. Each is
compiled once with the system compiler (`$CXX`, default g++) against `jax.ffi.include_dir()` and
cached under `~/.cache/nemotron_jax` (or `$NEMOTRON_JAX_CACHE`), keyed by a hash of the source,
the jax version, the compiler flags and this CPU's instruction-set flags (a `-march=native`
library built on one machine must not be loaded on another that shares the home directory).
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Sequence

import jax


class HandlerUnavailable(RuntimeError):
    """A C++ handler cannot be built or loaded here; the message says why."""


def _cpu_flags() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def cache_dir() -> pathlib.Path:
    return pathlib.Path(
        os.environ.get("NEMOTRON_JAX_CACHE", pathlib.Path.home() / ".cache" / "nemotron_jax")
    )


def build_handler(
    source: pathlib.Path,
    *,
    what: str,
    flags: Sequence[str] = ("-O2",),
    link: Sequence[str] = (),
    stamp: bytes = b"",
) -> pathlib.Path:
    """Compile `source` into a shared library (once) and return its path.

    Args:
        source: the .cc file.
        what: how error messages name the feature that needs it ("attention implementation 'cpu'").
        flags: compiler flags before the source (optimisation, include dirs).
        link: linker arguments after the source (libraries, rpaths).
        stamp: extra bytes for the cache key (e.g. the resolved path of a linked library).
    """
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None:
        raise HandlerUnavailable(
            f"{what} compiles a small C++ handler ({source.name}) on first use, but the "
            f"compiler {compiler!r} ($CXX) was not found"
        )
    cmd_flags = [*flags, "-std=c++17", "-shared", "-fPIC", "-isystem", jax.ffi.include_dir()]
    key = b"\0".join(
        [source.read_bytes(), jax.__version__.encode(), " ".join(cmd_flags).encode(),
         " ".join(link).encode(), _cpu_flags().encode(), compiler.encode(), stamp]
    )  # fmt: skip
    out = cache_dir() / f"{source.stem}_{hashlib.sha256(key).hexdigest()[:16]}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    cmd = [compiler, *cmd_flags, str(source), *link, "-o", tmp]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode:
        os.unlink(tmp)
        raise HandlerUnavailable(
            f"{what}: building {source.name} failed ({' '.join(cmd)}):\n{result.stderr[-2000:]}"
        )
    os.replace(tmp, out)  # atomic: a concurrent process sees the old state or the whole file
    return out
