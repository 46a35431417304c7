"""Runs one experiment config.

    python experiments/run.py --config experiments/configs/rm_bt.py:loss=scaled,smoke \
        --workdir runs/rm_bt_smoke [--config.optim.lr=3e-4]

The config file's `get_config(arg)` builds a locked ml_collections ConfigDict (a typo in an
override fails, naming the closest key); the final config is written to `<workdir>/config.json`
before step 0 (see `nemotron_jax/train/loop.py` on resuming). A config may define several stages
(`config.stages`), each run in its own sub-directory.

Several processes (hosts) run the same command, each with its own --process_id:

    python experiments/run.py --config ... --workdir runs/x \
        --coordinator_address=host0:12355 --num_processes=2 --process_id=0

or with none of the three under SLURM, Open MPI, TPU VMs or Kubernetes (docs/scaling.md).

Exit status: 0 done (or preempted, after checkpointing), 2 a user error (one `error:` line on
stderr naming the flag, config key, file or path), 1 a bug (a traceback). In a multi-process
run the failing process's line names it, and every other process ends with status 1 and one
line naming the process that failed.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from absl import flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from nemotron_jax.cli import parse_config_flags  # noqa: E402
from nemotron_jax.errors import USER_ERRORS, ConfigError, Preempted, report_user_error  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "experiment config file[:args]", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "directory for checkpoints, metrics and logs")
flags.mark_flags_as_required(["config", "workdir"])
# Multi-process (multi-host) runs: every process runs the same command with its own
# --process_id. With none of the three, JAX's cluster detection (SLURM, Open MPI, TPU VMs,
# Kubernetes) fills them in; on a lone host the run is a single process. See docs/scaling.md.
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0's coordination service"
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "processes in the job")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index, 0 .. n-1")
_LOCAL_DEVICES = flags.DEFINE_list(
    "local_device_ids",
    None,
    "accelerators this process drives, e.g. 0,1,2,3,4,5,6,7 for one process per 8-GPU host "
    "(JAX's default under SLURM or Open MPI is one GPU per task, by local rank)",
)
_HEARTBEAT = flags.DEFINE_integer(
    "heartbeat_timeout_s",
    30,
    "seconds without a heartbeat after which a process counts as dead and the job ends",
)


def _local_device_ids() -> list[int] | None:
    if _LOCAL_DEVICES.value is None:
        return None
    try:
        return [int(i) for i in _LOCAL_DEVICES.value]
    except ValueError:
        raise ConfigError(
            f"--local_device_ids must be comma-separated integers, got "
            f"{','.join(_LOCAL_DEVICES.value)!r}"
        ) from None


def main(argv: list[str] | None = None) -> int:
    """Runs the command line `argv`; returns the exit status (2: a user error, one line)."""
    logging.set_verbosity(logging.WARNING)  # orbax logs every file operation at INFO
    from nemotron_jax import distributed, runtime

    joined = False
    try:
        config = parse_config_flags(sys.argv if argv is None else argv, _CONFIG)
        workdir = _WORKDIR.value
        runtime.configure_cpu()  # before the first computation: see nemotron_jax/runtime.py
        joined = distributed.initialize(
            _COORDINATOR.value,
            _NUM_PROCESSES.value,
            _PROCESS_ID.value,
            _local_device_ids(),
            heartbeat_timeout_s=_HEARTBEAT.value,
        )
        from nemotron_jax.experiment import run_experiment

        results = run_experiment(config, workdir)
    except USER_ERRORS as e:
        if not joined:
            return report_user_error(e)
        distributed.fail(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
        report_user_error(e, prefix=distributed.describe())
        distributed.exit_now(2)  # the others are told; JAX's exit barrier would wait for them
    except Preempted as e:
        print(e, file=sys.stderr)
        return 0
    except BaseException as e:
        if not joined:
            raise
        if distributed.is_lost_peer(e):
            distributed.report_lost_peer(e)  # ends the process if a peer is gone, else returns
        import traceback

        traceback.print_exc()
        distributed.fail(f"{type(e).__name__}: {str(e).strip()[:300]} (traceback in its log)")
        print(f"error: {distributed.describe()}failed with {type(e).__name__}", file=sys.stderr)
        distributed.exit_now(1)
    if distributed.is_primary():
        print(json.dumps(results, indent=2))
        print_summary(results)
    return 0


def print_summary(results) -> None:
    """One line per stage with its final validation metrics, then ExPO and evaluation."""
    staged = results and all(isinstance(v, dict) for v in results.values())
    stages = results if staged else {"run": results}
    print("\nfinal validation metrics")
    for name, metrics in stages.items():
        if name in ("evaluation", "not_run"):
            continue
        if "best_alpha" in metrics:
            print(f"  {name:<28} best alpha {metrics['best_alpha']}")
            continue
        keys = (
            "accuracy",
            "reward_gap",
            "mse",
            "loss",
            "reward_mean",
            "reference_reward_mean",
            "win_rate_vs_reference",
            "kl",
        )
        shown = {k: metrics[k] for k in keys if k in metrics}
        print(f"  {name:<28} " + "  ".join(f"{k} {v:.4f}" for k, v in shown.items()))
    for name, score in (stages.get("evaluation") or {}).items():
        print(f"  evaluation {name:<17} {score:.4f}")


if __name__ == "__main__":
    sys.exit(main())
