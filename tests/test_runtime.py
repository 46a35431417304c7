"""nemotron_jax.runtime.configure_cpu: a step's large buffers stop faulting in fresh pages."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nemotron_jax import runtime

# Runs in a fresh process: the dispatch setting only takes effect before JAX's CPU client exists.
# Each call returns a new 128 MB array (the size of a [1024, 32000] f32 logits block), which
# XLA:CPU allocates per execution; counts the page faults of each of the last six calls.
_PROBE = """
import json, resource, sys
from nemotron_jax import runtime
done = runtime.configure_cpu()
import jax, jax.numpy as jnp
f = jax.jit(lambda x: jnp.broadcast_to(x, (1024, 32000)) * 2.0)
x = jnp.ones((32000,), jnp.float32)
for _ in range(6):  # warm-up: compiles, and the heap grows to hold the live results
    out = f(x).block_until_ready()
faults = []
for _ in range(6):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    out = f(x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
assert float(out[5, 7]) == 2.0
print(json.dumps({"done": done, "faults": faults,
                  "async": jax.config.values["jax_cpu_enable_async_dispatch"]}))
"""

PAGES_PER_CALL = 1024 * 32000 * 4 // 4096  # 32,000 faults when every page is new


def _probe(tuning: str) -> dict:
    env = {**os.environ, "NEMOTRON_JAX_CPU_TUNING": tuning}
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _thp_always() -> bool:
    path = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    return path.exists() and "[always]" in path.read_text()


@pytest.mark.skipif(runtime._glibc() is None, reason="malloc settings need glibc (Linux)")
def test_configure_cpu_removes_per_step_page_faults():
    tuned = _probe("1")
    assert tuned["async"] is False
    assert tuned["done"]["async_dispatch"] == "off"
    assert tuned["done"]["malloc"].startswith("heap up to 1024 MiB"), tuned["done"]
    # Reused heap pages. The median, because an unrelated allocation can split a freed block
    # once, and the call after that then extends the heap: usually every call has 0 faults, but
    # one full-suite run under parallel load had one call with 32,000.
    assert sorted(tuned["faults"])[3] < PAGES_PER_CALL // 20, tuned

    untouched = _probe("0")
    assert untouched["done"] == {"cpu_tuning": "off"}
    assert untouched["async"] is True
    if not _thp_always():  # with huge pages everywhere, fresh pages fault 512 at a time
        assert min(untouched["faults"]) >= PAGES_PER_CALL * 0.9, untouched  # the control


def test_configure_cpu_after_backend_start_says_dispatch_is_unchanged():
    import jax.numpy as jnp

    jnp.zeros(1).block_until_ready()  # the test process's CPU client exists from here on
    done = runtime.configure_cpu(enabled=True)
    assert done["async_dispatch"] == "unchanged: JAX's CPU client already exists"
    assert runtime.configure_cpu(enabled=False) == {"cpu_tuning": "off"}


@pytest.mark.parametrize("platforms", ["cuda", "tpu,cpu"])
def test_configure_cpu_leaves_an_accelerator_host_alone(platforms):
    """When the default backend will be an accelerator, neither setting is applied (and no JAX
    client is started to find that out)."""
    probe = (
        "import json; from nemotron_jax import runtime; done = runtime.configure_cpu(); "
        "print(json.dumps({'done': done, 'started': runtime._backends_started()}))"
    )
    env = {**os.environ, "JAX_PLATFORMS": platforms, "NEMOTRON_JAX_CPU_TUNING": "1"}
    out = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == {
        "done": {"cpu_tuning": "not applied: the default backend is an accelerator"},
        "started": False,
    }
