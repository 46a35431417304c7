"""User-facing errors.

Every error that bad input can cause derives from `NemotronError`, whose message is one line
naming the file, field or key at fault. Command-line tools catch it and print only the message
(`cli_main`), so a user never has to read a traceback to learn what was wrong.
"""

from __future__ import annotations

import argparse
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


# What bad input raises: each prints as one `error:` line with exit status 2. Anything else is a
# bug and keeps its traceback (exit status 1).
USER_ERRORS = (NemotronError, FileNotFoundError, NotADirectoryError, IsADirectoryError)


def report_user_error(e: BaseException, prefix: str = "") -> int:
    """Prints `error: <prefix><message>` (the first line of it) on stderr; returns exit status
    2. A multi-process run's prefix names the process."""
    message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    print(f"error: {prefix}{message}", file=sys.stderr)
    return 2


def cli_main(fn: Callable[[], int | None]) -> Callable[[], None]:
    """Wraps a tool's main(): user errors print `error: <message>` and exit with status 2."""

    @functools.wraps(fn)
    def wrapper() -> None:
        try:
            code = fn()
        except USER_ERRORS as e:
            sys.exit(report_user_error(e))
        sys.exit(code or 0)

    return wrapper


class ArgumentParser(argparse.ArgumentParser):
    """argparse with bad arguments reported as one `error:` line (exit status 2), like every
    other user error, instead of the usage block followed by the error."""

    def error(self, message: str):
        print(f"error: {self.prog}: {message} (--help for usage)", file=sys.stderr)
        sys.exit(2)
