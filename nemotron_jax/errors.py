"""User-facing errors.

Every error that bad input can cause derives from `NemotronError`, whose message is one line
naming the file, field or key at fault. Command-line tools catch it and print only the message
(`cli_main`), so a user never has to read a traceback to learn what was wrong.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable


class NemotronError(Exception):
    """Base class for errors caused by user input (configs, checkpoints, paths, flags)."""


class ConfigError(NemotronError, ValueError):
    """A model or experiment config is invalid or unsupported."""


class CheckpointError(NemotronError, ValueError):
    """A checkpoint directory is missing, incomplete or inconsistent with its config."""


class DataError(NemotronError, ValueError):
    """A dataset file is missing, malformed or holds a row that breaks its schema."""


class TrainingDiverged(NemotronError):
    """The loss or the parameters became non-finite; nothing non-finite was checkpointed."""


class Preempted(Exception):
    """A run stopped on SIGTERM or SIGINT after checkpointing its last step; not an error (exit
    0). The message says where it stopped and how to resume."""


def cli_main(fn: Callable[[], int | None]) -> Callable[[], None]:
    """Wraps a tool's main(): user errors print `error: <message>` and exit with status 2."""

    @functools.wraps(fn)
    def wrapper() -> None:
        try:
            code = fn()
        except (NemotronError, FileNotFoundError, NotADirectoryError) as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        sys.exit(code or 0)

    return wrapper
