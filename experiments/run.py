"""Runs one experiment config.

    python experiments/run.py --config experiments/configs/rm_bt.py:loss=scaled,smoke \
        --workdir runs/rm_bt_smoke [--config.optim.lr=3e-4]

The config file's `get_config(arg)` builds a locked ml_collections ConfigDict (a typo in an
override fails, naming the closest key); the final config is written to `<workdir>/config.json`
before step 0 (see `nemotron_jax/train/loop.py` on resuming). A config may define several stages
(`config.stages`), each run in its own sub-directory.

Exit status: 0 done (or preempted, after checkpointing), 2 a user error (one `error:` line on
stderr naming the flag, config key, file or path), 1 a bug (a traceback).
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import difflib  # noqa: E402

from absl import flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from nemotron_jax.errors import USER_ERRORS, NemotronError, Preempted, report_user_error  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "experiment config file[:args]", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "directory for checkpoints, metrics and logs")
flags.mark_flags_as_required(["config", "workdir"])


class UsageError(NemotronError):
    """A flag, config file or config override on the command line is wrong."""


def _keys(config, prefix="config") -> list[str]:
    """Every leaf key of a ConfigDict, dotted: config.optim.lr, ..."""
    out = []
    for key, value in config.items():
        name = f"{prefix}.{key}"
        out.extend(_keys(value, name) if hasattr(value, "items") else [name])
    return out


def _unknown_override(argv, config) -> str:
    """The message for a --config.<key> override that names no field, with the closest key."""
    given = [a[2:].split("=")[0] for a in argv if a.startswith("--config.")]
    known = _keys(config) if config is not None else []
    for key in given:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
            hint = f"; did you mean --{close[0]}?" if close else ""
            return f"--{key}: the config has no such key{hint}"
    return "a --config.<key> override names no key of the config"


def _config_file_error(message: str) -> str:
    """The user's line from ml_collections' 'Error whilst parsing config file' message, which
    embeds the traceback of the exception that `get_config` raised; None when that exception
    was not a user error (a bug in the config file: keep the traceback)."""
    lines = [line for line in message.strip().splitlines() if line.strip()]
    last = lines[-1].strip() if lines else ""
    name, _, text = last.partition(": ")
    if name.rsplit(".", 1)[-1] in {e.__name__ for e in (*USER_ERRORS, UsageError)} | {
        "ConfigError",
        "DataError",
        "CheckpointError",
    }:
        return f"--config {_config_arg(sys.argv)}: {text}"
    return None


def _config_arg(argv) -> str:
    """The value of --config on the command line."""
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            return a.split("=", 1)[1]
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return ""


def parse_flags(argv: list[str]):
    """(config, workdir) from the command line; every mistake on it raises `UsageError`."""
    try:
        flags.FLAGS(argv)
        config = _CONFIG.value
        "stages" in config  # noqa: B015 - a config file that failed to load raises on first use
    except flags.IllegalFlagValueError as e:
        text = str(e)
        if "Error whilst parsing config file" in text:
            line = _config_file_error(text)
            if line is None:
                raise
            raise UsageError(line) from None
        raise UsageError(text.splitlines()[0]) from None
    except flags.UnrecognizedFlagError as e:
        name = str(e).split("'")[1] if "'" in str(e) else str(e)
        if name.startswith("config."):
            raise UsageError(_unknown_override(argv, _loaded_config(argv))) from None
        raise UsageError(f"unknown flag --{name}; flags: --config, --workdir") from None
    except flags.Error as e:
        raise UsageError(str(e).splitlines()[0]) from None
    except (AttributeError, KeyError):  # an override of a key the locked config lacks
        raise UsageError(_unknown_override(argv, _loaded_config(argv))) from None
    except OSError as e:  # the config file could not be read
        detail = str(e.__cause__ or e).strip().splitlines()[-1].strip()
        raise UsageError(f"--config {_config_arg(argv)}: {detail}") from None
    return config, _WORKDIR.value


def _loaded_config(argv):
    """The config as its file builds it (before overrides), for naming the closest key; None
    if it does not load."""
    import importlib.util

    path, _, arg = _config_arg(argv).partition(":")
    try:
        spec = importlib.util.spec_from_file_location("_config_for_hints", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.get_config(*([arg] if arg else []))
    except Exception:  # noqa: BLE001 - only a hint is lost
        return None


def main(argv: list[str] | None = None) -> int:
    """Runs the command line `argv`; returns the exit status (2: a user error, one line)."""
    logging.set_verbosity(logging.WARNING)  # orbax logs every file operation at INFO
    from nemotron_jax import runtime

    try:
        config, workdir = parse_flags(sys.argv if argv is None else argv)
        runtime.configure_cpu()  # before the first computation: see nemotron_jax/runtime.py
        from nemotron_jax.experiment import run_experiment

        results = run_experiment(config, workdir)
    except USER_ERRORS as e:
        return report_user_error(e)
    except Preempted as e:
        print(e, file=sys.stderr)
        return 0
    print(json.dumps(results, indent=2))
    print_summary(results)
    return 0


def print_summary(results) -> None:
    """One line per stage with its final validation metrics, then ExPO and evaluation."""
    staged = results and all(isinstance(v, dict) for v in results.values())
    stages = results if staged else {"run": results}
    print("\nfinal validation metrics")
    for name, metrics in stages.items():
        if name == "evaluation":
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
