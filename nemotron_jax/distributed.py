"""Several processes, one program: JAX's multi-controller runtime, as on a multi-host GPU or TPU
cluster (one process per host, every process running the same command).

    from nemotron_jax import distributed
    distributed.initialize(coordinator_address, num_processes, process_id)  # before any op
    if distributed.is_primary(): ...        # process 0 writes the workdir's files
    distributed.sync("params_written")      # every process waits for the others
    values = distributed.fetch(tree)         # global arrays -> numpy, in every process

With none of the three arguments `initialize` asks JAX's own cluster detection (SLURM, Open MPI,
TPU VMs, Kubernetes); on a single host without a cluster it does nothing, and every helper here
is then a no-op. On CPU the cross-process collectives are gloo's.

Failure is loud on every process, never a hang:
- a Python error in one process is published through the coordination service's key-value store
  (`fail`); a watchdog thread in every other process prints one line naming the failing process
  and exits with status 1 within a second;
- a process that dies without a word (killed, out of memory) stops sending heartbeats; after
  `heartbeat_timeout_s` the coordination service ends every other process. A process whose
  collective broke because its peer went away (gloo: "Connection closed by peer") waits for that
  verdict (`report_lost_peer`) rather than blame itself; the line that names the dead process is
  then either ours or XLA's ("tasks are unhealthy (stopped sending heartbeats): <ids>"), which
  ends the process at the same moment.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
from typing import Any

import numpy as np

from nemotron_jax.errors import ConfigError

# Seconds. A process that misses heartbeats this long counts as dead and ends the job; a
# finished process waits this long at exit for the others. Long enough for a loaded host, short
# enough that a failure is seen within a minute.
HEARTBEAT_TIMEOUT_S = 30
SHUTDOWN_TIMEOUT_S = 30
INITIALIZATION_TIMEOUT_S = 300
_FAILURE_KEY = "nemotron_jax/failure"
_ACK_KEY = "nemotron_jax/failure_seen/"  # + process index: a watchdog saw the failure
_ACK_WAIT_S = 5.0  # how long a failing process 0 keeps its coordination service up for them
_POLL_S = 0.5
_heartbeat_s = [HEARTBEAT_TIMEOUT_S]

_watchdog_stop = threading.Event()


def _cluster_detected() -> str | None:
    """The name of the cluster environment JAX would initialise from, or None (a lone host, or
    a cluster job of one process, e.g. one SLURM task: nothing to join, and JAX would limit it
    to one GPU). Opt-in methods (mpi4py) are left to an explicit `cluster_detection_method`."""
    try:
        from jax._src import clusters  # private, but the list JAX itself walks
    except ImportError:
        return None
    for env in clusters.ClusterEnv._cluster_types:
        if getattr(env, "opt_in_only_method", False):
            continue
        try:
            if env.is_env_present():
                return env.__name__ if env.get_process_count() > 1 else None
        except Exception:  # noqa: BLE001 - a probe that cannot run means no such cluster
            continue
    return None


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: list[int] | None = None,
    *,
    heartbeat_timeout_s: int = HEARTBEAT_TIMEOUT_S,
    shutdown_timeout_s: int = SHUTDOWN_TIMEOUT_S,
    initialization_timeout_s: int = INITIALIZATION_TIMEOUT_S,
) -> bool:
    """Joins the job's processes (see the module docstring); returns whether it did.

    `local_device_ids`: the accelerators this process drives. JAX's default under SLURM and
    Open MPI is the one whose index is the task's local rank (one process per GPU); with one
    process per host give them all (`0,1,...,7`).

    Must run before the first JAX computation. Raises ConfigError, naming the flag, on
    arguments JAX cannot start from.
    """
    import jax

    given = {
        "--coordinator_address": coordinator_address,
        "--num_processes": num_processes,
        "--process_id": process_id,
    }
    cluster = _cluster_detected()
    if all(v is None for v in given.values()) and cluster is None:
        return False
    if cluster is None and any(v is None for v in given.values()):
        missing = [k for k, v in given.items() if v is None]
        raise ConfigError(
            f"{', '.join(missing)} missing: without a detected cluster (SLURM, Open MPI, TPU, "
            f"Kubernetes) give --coordinator_address, --num_processes and --process_id together"
        )
    if num_processes is not None and num_processes < 1:
        raise ConfigError(f"--num_processes must be positive, got {num_processes}")
    if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
        raise ConfigError(
            f"--process_id {process_id} is not in [0, --num_processes={num_processes})"
        )
    if _default_backend_is_cpu():
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(
            coordinator_address,
            num_processes,
            process_id,
            local_device_ids,
            initialization_timeout=initialization_timeout_s,
            heartbeat_timeout_seconds=heartbeat_timeout_s,
            shutdown_timeout_seconds=shutdown_timeout_s,
        )
    except ValueError as e:  # JAX's own message names the argument it could not fill in
        raise ConfigError(f"jax.distributed.initialize: {e}") from None
    _heartbeat_s[0] = heartbeat_timeout_s
    _start_watchdog()
    return True


def _default_backend_is_cpu() -> bool:
    from nemotron_jax import runtime

    return runtime._default_backend_is_cpu()


def process_index() -> int:
    import jax

    return jax.process_index()


def process_count() -> int:
    import jax

    return jax.process_count()


def is_primary() -> bool:
    """Whether this process writes the run's files (process 0; always true in one process)."""
    return process_index() == 0


def describe() -> str:
    """ "process i of n: " in a multi-process job, else ""."""
    return f"process {process_index()} of {process_count()}: " if process_count() > 1 else ""


def sync(name: str) -> None:
    """Every process waits here until all have arrived (no-op in one process)."""
    if process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def fetch(tree: Any) -> Any:
    """The values of a tree of (global) jax arrays as numpy, the same in every process: the
    arrays other processes hold are gathered (a collective: every process must call it)."""
    import jax

    def one(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
            return np.asarray(jax.device_get(x))
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(one, tree)


def broadcast_flag(value: bool) -> bool:
    """Process 0's `value` in every process (a collective; `value` itself in one process)."""
    if process_count() <= 1:
        return bool(value)
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.asarray(value, np.int32)))


def local_rows(sharding, num_rows: int) -> slice:
    """The rows [start, stop) of a batch of `num_rows` that this process's devices hold under
    `sharding` (split on its leading axis); all of them in one process. The slice is what this
    process reads and passes to `jax.make_array_from_process_local_data`."""
    indices = sharding.addressable_devices_indices_map((num_rows,)).values()
    starts = [idx[0].start or 0 for idx in indices]
    stops = [num_rows if idx[0].stop is None else idx[0].stop for idx in indices]
    start, stop = min(starts), max(stops)
    held = sum(b - a for a, b in {(a, b) for a, b in zip(starts, stops, strict=True)})
    if held != stop - start:
        raise ConfigError(
            f"this process's devices hold rows that are not contiguous in the batch "
            f"({sorted(set(zip(starts, stops, strict=True)))}): order the mesh's devices by process"
        )
    return slice(start, stop)


def put_global(tree: Any, sharding) -> Any:
    """Host values that every process holds whole (numpy, the same in each) as global arrays on
    `sharding`: each process places the parts its devices hold."""
    import jax

    def one(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(one, tree)


def global_batch(local: dict[str, np.ndarray], sharding) -> dict[str, Any]:
    """Each leaf of this process's rows (`local_rows`) as one global array on `sharding`; leaves
    that already are jax arrays pass through."""
    import jax

    return jax.tree.map(
        lambda x: (
            x
            if isinstance(x, jax.Array)
            else jax.make_array_from_process_local_data(sharding, np.asarray(x))
        ),
        local,
    )


# --- failure --------------------------------------------------------------------------------


def _client():
    from jax._src import distributed as jax_distributed  # the runtime client JAX keeps

    return jax_distributed.global_state.client


def fail(message: str) -> None:
    """Publishes this process's failure so every other process ends at once (see the module
    docstring). A no-op in one process."""
    if process_count() <= 1:
        return
    client = _client()
    if client is None:
        return
    try:
        client.key_value_set(_FAILURE_KEY, f"process {process_index()}: {message}")
    except Exception:  # noqa: BLE001 - another process failed first; its message stands
        return
    if process_index() == 0:  # it hosts the service: keep it up until the others have read it
        import time

        others = [i for i in range(process_count()) if i != 0]
        deadline = time.monotonic() + _ACK_WAIT_S
        while others and time.monotonic() < deadline:
            others = [i for i in others if not _try_get(client, f"{_ACK_KEY}{i}")]
            time.sleep(0.05)


def _try_get(client, key: str) -> str | None:
    try:
        return client.key_value_try_get(key)
    except Exception:  # noqa: BLE001 - NOT_FOUND (or the service is gone)
        return None


def exit_now(status: int) -> None:
    """Leaves without JAX's shutdown barrier, which would wait for processes that will never
    arrive (and then abort, hiding `status`)."""
    _watchdog_stop.set()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


# What a collective raises when the process at the other end has gone (gloo on CPU, NCCL and the
# coordination service on GPU/TPU).
_LOST_PEER_MARKERS = (
    "connection closed by peer",
    "connection reset by peer",
    "gloo allgather failed",
    "gloo allreduce failed",
    "nccl error",
)


def is_lost_peer(error: BaseException) -> bool:
    """Whether `error` says another process went away mid-collective, not a fault of this one."""
    text = f"{type(error).__name__}: {error}".lower()
    return process_count() > 1 and any(marker in text for marker in _LOST_PEER_MARKERS)


def report_lost_peer(error: BaseException) -> bool:
    """Waits (at most the heartbeat timeout and 10 s) for the coordination service to tell which
    processes are gone; if some are, prints one line naming them and ends this process with
    status 1 (XLA may end it first, at the same moment, with its own message naming them).
    Returns False, having printed nothing more, when no process turned out to be gone: the
    error is then this process's own."""
    first = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
    print(
        f"{describe()}a collective failed ({type(error).__name__}: {first}): waiting for the "
        f"coordination service to name the process that stopped",
        file=sys.stderr,
        flush=True,
    )
    everyone = list(range(process_count()))
    answer: dict[str, Any] = {}

    def ask():  # a barrier over the live processes: returns once the dead miss their heartbeats
        try:
            answer["live"] = _client().get_live_nodes(everyone)
        except Exception:  # noqa: BLE001 - the service itself is gone (process 0 died)
            answer["live"] = {i: 0 for i in everyone if i != 0}

    waiter = threading.Thread(target=ask, daemon=True)
    waiter.start()
    waiter.join(_heartbeat_s[0] + 10.0)
    if "live" not in answer:
        return False
    gone = [i for i in everyone if i not in answer["live"]]
    if not gone:
        return False
    names = ", ".join(str(i) for i in gone)
    print(
        f"error: process {names} of {process_count()} stopped responding (killed or crashed); "
        f"ending process {process_index()}",
        file=sys.stderr,
    )
    exit_now(1)


def _start_watchdog() -> None:
    client = _client()
    me = f"process {process_index()}:"

    def watch():
        while not _watchdog_stop.wait(_POLL_S):
            try:
                message = client.key_value_try_get(_FAILURE_KEY)
            except Exception:  # noqa: BLE001 - NOT_FOUND: nobody has failed
                continue
            if message.startswith(me):
                return
            try:
                client.key_value_set(f"{_ACK_KEY}{process_index()}", "1")
            except Exception:  # noqa: BLE001 - the service is going away; exit regardless
                pass
            print(
                f"error: {message} (this is process {process_index()} of {process_count()}, "
                f"stopping)",
                file=sys.stderr,
            )
            exit_now(1)

    threading.Thread(target=watch, name="nemotron_jax-failure-watchdog", daemon=True).start()
    atexit.register(_watchdog_stop.set)  # runs before JAX's own shutdown (registered earlier)
