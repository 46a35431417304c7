"""Record files read row by row, with per-row validation and a report of what was skipped.

A record file is `.jsonl`, `.jsonl.gz` or `.parquet` (the formats the Hugging Face hub serves).
`read_records` hands each record to a parse function; the field helpers below raise `BadRow`,
which becomes a `DataError` naming the file, the 1-based line (or parquet row) and the field, or,
with `on_bad_row="skip"`, a skipped row counted per reason in the `ReadReport`.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import zlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

from nemotron_jax.errors import DataError

OnBadRow = Literal["raise", "skip"]
_MAX_MESSAGES = 5
R = TypeVar("R")


@dataclasses.dataclass
class ReadReport:
    """What a reader did with one file.

    Attributes:
        path: the file read.
        rows_read: records seen (blank lines excluded).
        rows_kept: rows returned.
        skipped: reason -> rows skipped (`on_bad_row="skip"` only).
        blank_lines: whitespace-only lines (not rows).
        messages: the first few skip messages, for the log.
    """

    path: str
    rows_read: int = 0
    rows_kept: int = 0
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)
    blank_lines: int = 0
    messages: list[str] = dataclasses.field(default_factory=list)

    @property
    def rows_skipped(self) -> int:
        return sum(self.skipped.values())


class BadRow(Exception):
    """A record breaks the schema; `reason` is the report key, `field` the field at fault."""

    def __init__(self, reason: str, field: str | None, message: str):
        super().__init__(message)
        self.reason, self.field = reason, field


def _records(path: Path) -> Iterator[tuple[str, Any]]:
    """Yields ("line N" or "row N", parsed record or the JSON error) for each record."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    name = path.name.lower()
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        try:
            records = pq.read_table(path).to_pylist()
        except Exception as e:
            raise DataError(f"{path}: not a readable parquet file ({e})") from e
        yield from ((f"row {i}", r) for i, r in enumerate(records, start=1))
        return
    if name.endswith(".jsonl.gz") or name.endswith(".json.gz"):
        opener = gzip.open
    elif name.endswith(".jsonl"):
        opener = open
    else:
        raise DataError(f"{path}: unknown file type; expected .jsonl, .jsonl.gz or .parquet")
    try:
        with opener(path, "rb") as f:  # bytes, decoded per line: a bad byte names its line
            for i, raw in enumerate(f, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    yield f"line {i}", e
                    continue
                if not line.strip():
                    yield f"line {i}", None
                    continue
                try:
                    yield f"line {i}", json.loads(line)
                except json.JSONDecodeError as e:
                    yield f"line {i}", e
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot be read ({e})") from e


def field(rec: Mapping[str, Any], name: str, typ: type | tuple[type, ...]) -> Any:
    value = rec.get(name)
    if value is None:
        raise BadRow("missing_field", name, "missing")
    # bool is an int subclass; a JSON true is never a valid rating or strength.
    if isinstance(value, bool) and bool not in (typ if isinstance(typ, tuple) else (typ,)):
        raise BadRow("wrong_type", name, f"expected {_type_name(typ)}, got bool")
    if not isinstance(value, typ):
        raise BadRow("wrong_type", name, f"expected {_type_name(typ)}, got {type(value).__name__}")
    return value


def _type_name(typ: type | tuple[type, ...]) -> str:
    return " or ".join(t.__name__ for t in (typ if isinstance(typ, tuple) else (typ,)))


def text(rec: Mapping[str, Any], name: str, *, nonempty: bool = True) -> str:
    value = field(rec, name, str)
    if nonempty and not value.strip():
        raise BadRow("empty_text", name, "empty")
    return value


def integer(rec: Mapping[str, Any], name: str, lo: int, hi: int) -> int:
    value = field(rec, name, int)
    if not lo <= value <= hi:
        raise BadRow("out_of_range", name, f"{value} is outside [{lo}, {hi}]")
    return value


def integer_list(rec: Mapping[str, Any], name: str, lo: int, hi: int) -> tuple[int, ...]:
    values = field(rec, name, list)
    if not values:
        raise BadRow("missing_field", name, "empty list")
    return tuple(integer({name: v}, name, lo, hi) for v in values)


def entries(rec: Mapping[str, Any], name: str) -> list[Mapping[str, Any]]:
    values = rec.get(name)
    if values is None:
        return []
    if not isinstance(values, list) or not all(isinstance(v, dict) for v in values):
        raise BadRow("wrong_type", name, "expected a list of objects")
    return values


def optional_text(rec: Mapping[str, Any], name: str) -> str:
    return "" if rec.get(name) is None else text(rec, name, nonempty=False)


def read_records(
    path: str | Path, parse: Callable[[Mapping[str, Any], int], R], on_bad_row: OnBadRow
) -> tuple[list[R], ReadReport]:
    """Parses every record of `path` with `parse(record, record_index)`.

    Raises:
        DataError: the file is missing or unreadable, or (with `on_bad_row="raise"`) a record
            is bad; the message names the file, the line or row, and the field.
    """
    if on_bad_row not in ("raise", "skip"):
        raise ValueError(f"on_bad_row must be 'raise' or 'skip', got {on_bad_row!r}")
    path = Path(path)
    report, rows = ReadReport(path=str(path)), []
    for where, rec in _records(path):
        if rec is None:
            report.blank_lines += 1
            continue
        report.rows_read += 1
        try:
            if isinstance(rec, json.JSONDecodeError):
                raise BadRow("malformed_json", None, f"malformed JSON ({rec.msg})")
            if isinstance(rec, UnicodeDecodeError):
                raise BadRow(
                    "not_utf8",
                    None,
                    f"byte 0x{rec.object[rec.start]:02x} at column {rec.start + 1} is not UTF-8",
                )
            if not isinstance(rec, dict):
                raise BadRow("wrong_type", None, f"expected an object, got {type(rec).__name__}")
            rows.append(parse(rec, report.rows_read - 1))
        except BadRow as e:
            at = f": field {e.field!r}" if e.field else ""
            message = f"{path}, {where}{at}: {e}"
            if on_bad_row == "raise":
                raise DataError(message) from None
            report.skipped[e.reason] = report.skipped.get(e.reason, 0) + 1
            if len(report.messages) < _MAX_MESSAGES:
                report.messages.append(message)
    report.rows_kept = len(rows)
    return rows, report
