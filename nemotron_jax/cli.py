"""Command-line parsing shared by the entry points that take an ml_collections `--config`
(`experiments/run.py`, `tools/plan.py`): every mistake on the command line becomes one
`UsageError` line naming the flag, config argument or key (with the closest valid key).

    config = parse_config_flags(sys.argv, config_flag)   # config_flag: DEFINE_config_file's
"""

from __future__ import annotations

import difflib
import importlib.util

from absl import flags

from nemotron_jax.errors import USER_ERRORS, NemotronError


class UsageError(NemotronError):
    """A flag, config file or config override on the command line is wrong."""


def _unknown_override(argv, config) -> str:
    """The message for a --config.<key> override that names no field, with the closest key."""
    given = [a[2:].split("=")[0] for a in argv if a.startswith("--config.")]
    from nemotron_jax.train.workdir import flatten

    known = [f"config.{k}" for k in flatten(config.to_dict())] if config is not None else []
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
    user_errors = {"ConfigError", "DataError", "CheckpointError", "UsageError"}
    if name.rsplit(".", 1)[-1] in user_errors | {e.__name__ for e in USER_ERRORS}:
        return text
    return None


def _config_arg(argv) -> str:
    """The value of --config on the command line."""
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            return a.split("=", 1)[1]
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return ""


def parse_config_flags(argv: list[str], config_flag) -> object:
    """Parses `argv` into absl's FLAGS; returns the config. Every mistake raises `UsageError`."""
    try:
        flags.FLAGS(argv)
        config = config_flag.value
        if config is None:
            raise UsageError("--config is required, e.g. experiments/configs/sft.py:smoke")
        "stages" in config  # noqa: B015 - a config file that failed to load raises on first use
    except flags.IllegalFlagValueError as e:
        text = str(e)
        if "Error whilst parsing config file" in text:
            line = _config_file_error(text)
            if line is None:
                raise
            raise UsageError(f"--config {_config_arg(argv)}: {line}") from None
        raise UsageError(text.splitlines()[0]) from None
    except flags.UnrecognizedFlagError as e:
        name = str(e).split("'")[1] if "'" in str(e) else str(e)
        if name.startswith("config."):
            raise UsageError(_unknown_override(argv, _loaded_config(argv))) from None
        raise UsageError(f"unknown flag --{name} (--helpshort lists the flags)") from None
    except flags.Error as e:
        raise UsageError(str(e).splitlines()[0]) from None
    except (AttributeError, KeyError):  # an override of a key the locked config lacks
        raise UsageError(_unknown_override(argv, _loaded_config(argv))) from None
    except ValueError as e:  # an override path ml_collections cannot parse
        hint = ""
        if "stages." in str(e):
            hint = "; a stage is named by subscript: --config.stages['2_scaled_bt'].optim.lr=..."
        raise UsageError(str(e).splitlines()[0] + hint) from None
    except OSError as e:  # the config file could not be read
        detail = str(e.__cause__ or e).strip().splitlines()[-1].strip()
        raise UsageError(f"--config {_config_arg(argv)}: {detail}") from None
    return config


def _loaded_config(argv):
    """The config as its file builds it (before overrides), for naming the closest key; None
    if it does not load."""
    path, _, arg = _config_arg(argv).partition(":")
    try:
        spec = importlib.util.spec_from_file_location("_config_for_hints", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.get_config(*([arg] if arg else []))
    except Exception:  # noqa: BLE001 - only a hint is lost
        return None
