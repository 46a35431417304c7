"""Grain input pipelines: rows or TFDS data sources → shuffled, batched, resumable numpy batches.

Every row is tokenized once, up front (`encode`), because these datasets are small (HelpSteer2
is 21k responses); that first pass is what produces the `FormatReport` counting every
truncation and skip. Examples are stored unpadded and padded to `max_len` when read.

    encoded = encode(rows, kind="pairs", tokenizer=tok, template="llama3", max_len=4096)
    print(encoded.report.summary())
    ds = make_dataset(encoded, batch_size=64, seed=0)
    it = iter(ds)
    batch = next(it)          # {"tokens": int32 [64, 2, 4096], ...}
    state = it.get_state()    # resume later with a fresh iterator's set_state(state)

Batches are dicts of stacked arrays: the example shapes of `formatting` with a leading B.
Shuffling is a seeded permutation, reseeded each epoch, so a run is reproducible from `seed`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Iterable, Sequence
from typing import Any

import grain
import numpy as np

from nemotron_jax.data.formatting import (
    Attributes,
    FormatReport,
    Kind,
    Template,
    Truncation,
    encode_rows,
    pad_example,
)
from nemotron_jax.data.helpsteer2 import PreferenceRow
from nemotron_jax.data.tfds_builders import row_from_record
from nemotron_jax.data.tokenizer import Tokenizer
from nemotron_jax.errors import ConfigError, DataError

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EncodedDataset:
    """Tokenized examples with random access; `ds[i]` is one fixed-shape example dict.

    Attributes:
        examples: unpadded `formatting.encode_rows` examples.
        report: the truncation and skip counts of the encoding pass.
        kind: "regression", "pairs" or "sft".
        max_len: T, the padded length.
        pad_id: the padding token id.
    """

    examples: Sequence[dict[str, Any]]
    report: FormatReport
    kind: str
    max_len: int
    pad_id: int

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return pad_example(self.examples[index], max_len=self.max_len, pad_id=self.pad_id)


def _rows(source: Any) -> Iterable[Any]:
    """Rows from a sequence of row dataclasses or a TFDS data source of records."""
    if isinstance(source, dict):
        raise DataError("pass one split's data source (e.g. sources['train']), not the dict")
    for i in range(len(source)):
        item = source[i]
        yield row_from_record(item) if isinstance(item, dict) else item


def encode(
    source: Any,
    *,
    kind: Kind,
    tokenizer: Tokenizer,
    template: Template,
    max_len: int,
    truncation: Truncation = "truncate",
    attributes: Attributes = "helpfulness",
    drop_ties: bool = False,
    system: str | None = None,
) -> EncodedDataset:
    """Tokenizes a whole source once (arguments as in `formatting.encode_rows`).

    Args:
        source: a sequence of rows (`RatingRow`, `PreferenceRow`, ...) or one split of
            `tfds_builders.data_sources(...)`.

    Returns:
        An `EncodedDataset`; its `report` counts every truncation and skip.
    """
    examples, report = encode_rows(
        _rows(source),
        kind=kind,
        tokenizer=tokenizer,
        template=template,
        max_len=max_len,
        truncation=truncation,
        attributes=attributes,
        drop_ties=drop_ties,
        system=system,
    )
    return EncodedDataset(examples, report, kind, max_len, tokenizer.pad_id)


def make_dataset(
    source: Any,
    *,
    kind: Kind | None = None,
    tokenizer: Tokenizer | None = None,
    template: Template = "llama3",
    max_len: int | None = None,
    batch_size: int,
    seed: int,
    shuffle: bool = True,
    num_epochs: int | None = None,
    drop_remainder: bool = True,
    truncation: Truncation = "truncate",
    attributes: Attributes = "helpfulness",
    drop_ties: bool = False,
    system: str | None = None,
    rows: slice | None = None,
) -> grain.IterDataset:
    """A grain `IterDataset` of dict batches with a leading batch axis B = `batch_size`.

    Args:
        source: an `EncodedDataset` (then `kind`, `tokenizer`, `template`, `max_len` and the
            encoding options are taken from it and must be left unset), or anything `encode`
            accepts, encoded here with the report logged.
        batch_size: B.
        seed: seeds the shuffle; the same seed gives the same order.
        shuffle: permute the examples (per epoch) before batching.
        num_epochs: passes over the data; None repeats forever.
        drop_remainder: drop a last batch smaller than B (keeps shapes fixed).
        rows: the rows of each batch to materialise (a process's share of a global batch,
            `distributed.local_rows`); None: all B. The order is over example indices and
            sliced after batching, so the global batches, and the iterator's state, do not
            depend on how many processes share them.

    Returns:
        Batches `{"tokens": int32 [B, T] (pairs: [B, 2, T]), "attention_mask": same,
        "index": int32 [B]}` plus `labels` float32 [B, 9] (regression), `strength` int32 [B]
        (pairs) or `loss_mask` int32 [B, T] (sft). Its iterators support `get_state()` and
        `set_state()`.
    """
    if isinstance(source, EncodedDataset):
        if kind not in (None, source.kind) or tokenizer is not None or max_len is not None:
            raise ConfigError(
                "an EncodedDataset fixes kind, tokenizer and max_len; leave them unset"
            )
        encoded = source
    else:
        if kind is None or tokenizer is None or max_len is None:
            raise ConfigError("kind, tokenizer and max_len are required to encode raw rows")
        encoded = encode(
            source,
            kind=kind,
            tokenizer=tokenizer,
            template=template,
            max_len=max_len,
            truncation=truncation,
            attributes=attributes,
            drop_ties=drop_ties,
            system=system,
        )
        report = encoded.report
        changed = report.skipped or report.truncated_turns or report.truncated_tokens
        (log.warning if changed else log.info)("encoded %s", report.summary())
    if len(encoded) == 0:
        raise DataError(f"no examples left after encoding ({encoded.report.summary()})")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be positive, got {batch_size}")
    if num_epochs is not None and num_epochs < 1:
        raise ConfigError(f"num_epochs must be positive or None, got {num_epochs}")
    ds = grain.MapDataset.range(len(encoded)).seed(seed)
    if shuffle:
        ds = ds.shuffle()
    if num_epochs != 1:
        ds = ds.repeat(num_epochs)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    return ds.map(functools.partial(_gather, encoded, rows or slice(None))).to_iter_dataset()


def _gather(encoded: EncodedDataset, rows: slice, indices: np.ndarray) -> dict[str, np.ndarray]:
    """The padded examples `indices[rows]`, stacked: {key: [len, ...]}."""
    examples = [encoded[int(i)] for i in np.asarray(indices)[rows]]
    return {k: np.stack([ex[k] for ex in examples]) for k in examples[0]}


def preference_splits(rows: Iterable[PreferenceRow]) -> dict[str, list[PreferenceRow]]:
    """Splits preference rows NeMo's way: `split == "train"` is train, anything else validation."""
    out: dict[str, list[PreferenceRow]] = {"train": [], "validation": []}
    for row in rows:
        out["train" if row.is_train else "validation"].append(row)
    return out
