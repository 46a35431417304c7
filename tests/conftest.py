"""Test setup: 8 fake CPU devices (set before JAX initialises), offline HF, compile cache."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

_CACHE = os.environ.get("JAX_COMPILATION_CACHE_DIR")
if _CACHE and os.environ.get("PYTEST_XDIST_WORKER"):
    # One cache directory per xdist worker: JAX writes an entry with a plain, non-atomic write,
    # so a worker reading an entry that another worker is still writing gets a truncated
    # executable (and the process aborts). Subprocesses (tools, notebook kernels) inherit it.
    _CACHE = os.path.join(_CACHE, "pytest-" + os.environ["PYTEST_XDIST_WORKER"])
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
if _CACHE:
    jax.config.update("jax_compilation_cache_dir", _CACHE)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real-data slices next to the repository; absent on a user's fresh clone."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real-data slices not found at {SHARED_DATA} (only present in CI/dev)")
    return SHARED_DATA


# Files that start processes of their own and run for minutes: scheduled first, so that
# `--dist loadfile` overlaps them with the rest of the suite instead of leaving them to run
# alone at its end.
_FIRST = ("test_multiprocess.py",)


def pytest_collection_modifyitems(session, config, items):
    del session, config
    items.sort(key=lambda item: item.path.name not in _FIRST)  # stable: order kept otherwise
