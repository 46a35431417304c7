"""TFDS builders that turn downloaded files into ArrayRecord datasets (no TensorFlow needed).

| builder | splits | source (a directory, or the file itself) |
|---|---|---|
| `helpsteer2` | train, validation | `train.*`, `validation.*` of `nvidia/HelpSteer2` |
| `helpsteer2_preference` | train, validation | `preference/preference.*` (or `preference.*`) |
| `rewardbench` | filtered | `filtered.*` (`allenai/reward-bench`, or any RewardBench-format file) |

`*` is `.jsonl.gz`, `.jsonl` or `.parquet`. The source is the `source=` constructor argument or
the TFDS `manual_dir` (`download_config=tfds.download.DownloadConfig(manual_dir=...)`): this
project never downloads anything. Records keep raw text and labels; tokenization happens in the
grain pipeline, so one prepared dataset serves every tokenizer and template. Prepared splits
keep file order (`disable_shuffling=True`), which keeps HelpSteer2's adjacent response pairs.

Preference labels: the file's `preference_strength`; a row without one (a partial extract) gets
the label recomputed from its raw strengths by `aggregation.aggregate_preference`, and is
skipped when that filters it out. Skips are counted in `info.metadata["read_report"]`.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from nemotron_jax.data.aggregation import aggregate_preference
from nemotron_jax.data.files import OnBadRow, ReadReport
from nemotron_jax.data.helpsteer2 import (
    ATTRIBUTES,
    PreferenceAnnotation,
    PreferenceRow,
    RatingRow,
    RewardBenchRow,
    find_helpsteer2_file,
    read_preferences,
    read_ratings,
    read_rewardbench,
)
from nemotron_jax.errors import DataError

_SUFFIXES = (".jsonl.gz", ".jsonl", ".parquet")
_CITATION = "Wang et al., HelpSteer2-Preference, arXiv:2410.01257 (2024)."


def _text() -> tfds.features.Text:
    return tfds.features.Text()


def _int() -> tfds.features.Scalar:
    return tfds.features.Scalar(np.int32)


def _source_file(source: Path, stems: tuple[str, ...], what: str) -> Path:
    if source.is_file():
        return source
    if not source.is_dir():
        raise DataError(f"{source}: {what} source not found")
    candidates = [source / (stem + s) for stem in stems for s in _SUFFIXES]
    for path in candidates:
        if path.is_file():
            return path
    names = ", ".join(str(p.relative_to(source)) for p in candidates)
    raise DataError(f"{source}: no {what} file; expected one of: {names}")


def _report_dict(report: ReadReport) -> dict[str, Any]:
    return {
        "path": report.path,
        "rows_read": report.rows_read,
        "rows_kept": report.rows_kept,
        "skipped": dict(report.skipped),
    }


class _Builder(tfds.core.GeneratorBasedBuilder):
    """Shared plumbing: where the source is, and the read reports kept in the metadata."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Download the dataset files and pass their directory."

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # tfds' default probes the `importlib_resources` backport, which is not a dependency.
        return epath.Path(inspect.getfile(cls))

    def __init__(
        self, *, source: str | Path | None = None, on_bad_row: OnBadRow = "raise", **kwargs
    ):
        self._source = None if source is None else Path(source)
        self._on_bad_row = on_bad_row
        super().__init__(**kwargs)

    def _make_info(self, features: dict[str, Any], description: str) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=description,
            features=tfds.features.FeaturesDict(features),
            disable_shuffling=True,
            citation=_CITATION,
            metadata=tfds.core.MetadataDict(),
        )

    def _source_dir(self, dl_manager: tfds.download.DownloadManager) -> Path:
        if self._source is not None:
            return self._source
        try:
            return Path(dl_manager.manual_dir)
        except AssertionError as e:  # tfds asserts when manual_dir is absent
            raise DataError(f"{self.name}: no source given; {e}".splitlines()[0]) from None

    def _record_report(self, report: ReadReport, **extra: int) -> None:
        reports = self.info.metadata.setdefault("read_report", [])
        reports.append({**_report_dict(report), **extra})


class Helpsteer2(_Builder):
    """HelpSteer2 ratings: prompt, response and five 0-4 attributes."""

    name = "helpsteer2"

    def _info(self) -> tfds.core.DatasetInfo:
        features = {"prompt": _text(), "response": _text(), **{a: _int() for a in ATTRIBUTES}}
        return self._make_info(features, "HelpSteer2 responses with aggregated 0-4 ratings.")

    def _split_generators(self, dl_manager):
        root = self._source_dir(dl_manager)
        if not root.is_dir():
            raise DataError(f"{root}: HelpSteer2 directory not found")
        files = {s: find_helpsteer2_file(root, s) for s in ("train", "validation")}
        return {split: self._generate_examples(path) for split, path in files.items()}

    def _generate_examples(self, path: Path):
        rows, report = read_ratings(path, on_bad_row=self._on_bad_row)
        self._record_report(report)
        for i, row in enumerate(rows):
            yield i, {"prompt": row.prompt, "response": row.response, **row.ratings()}


class Helpsteer2Preference(_Builder):
    """HelpSteer2-Preference pairs, split by the `split` field ("train" vs anything else)."""

    name = "helpsteer2_preference"

    def _info(self) -> tfds.core.DatasetInfo:
        features = {
            "split": _text(),
            "prompt": _text(),
            "response_1": _text(),
            "response_2": _text(),
            "preference_strength": _int(),
            "preference_statement": _text(),
            "preference_elaboration": _text(),
            "raw_strengths": tfds.features.Sequence(_int()),
        }
        return self._make_info(features, "HelpSteer2-Preference pairs with signed strengths.")

    def _split_generators(self, dl_manager):
        path = _source_file(
            self._source_dir(dl_manager), ("preference/preference", "preference"), "preference"
        )
        rows, report = read_preferences(path, on_bad_row=self._on_bad_row)
        labelled, filtered = [], 0
        for row in rows:
            label = row.preference_strength
            if label is None:
                label = aggregate_preference(row.raw_strengths)
            if label is None:
                filtered += 1
                continue
            labelled.append((row, label))
        self._record_report(report, filtered_spread=filtered)
        splits = {
            "train": [x for x in labelled if x[0].is_train],
            "validation": [x for x in labelled if not x[0].is_train],
        }
        if not labelled:
            raise DataError(f"{path}: no preference rows left to prepare")
        # tfds cannot write an empty split; a partial extract may hold one split only.
        return {k: self._generate_examples(v) for k, v in splits.items() if v}

    def _generate_examples(self, labelled: list[tuple[PreferenceRow, int]]):
        for i, (row, label) in enumerate(labelled):
            yield (
                i,
                {
                    "split": row.split,
                    "prompt": row.prompt,
                    "response_1": row.response_1,
                    "response_2": row.response_2,
                    "preference_strength": label,
                    "preference_statement": row.preference_statement,
                    "preference_elaboration": row.preference_elaboration,
                    "raw_strengths": list(row.raw_strengths),
                },
            )


class Rewardbench(_Builder):
    """RewardBench-format pairs (prompt, chosen, rejected, subset, id) in one `filtered` split."""

    name = "rewardbench"

    def _info(self) -> tfds.core.DatasetInfo:
        features = {k: _text() for k in ("prompt", "chosen", "rejected", "subset")}
        features["id"] = tfds.features.Scalar(np.int64)
        return self._make_info(features, "RewardBench-format preference pairs.")

    def _split_generators(self, dl_manager):
        path = _source_file(self._source_dir(dl_manager), ("filtered",), "RewardBench")
        return {"filtered": self._generate_examples(path)}

    def _generate_examples(self, path: Path):
        rows, report = read_rewardbench(path, on_bad_row=self._on_bad_row)
        self._record_report(report)
        for i, row in enumerate(rows):
            yield (
                i,
                {
                    "prompt": row.prompt,
                    "chosen": row.chosen,
                    "rejected": row.rejected,
                    "subset": row.subset,
                    "id": row.id,
                },
            )


BUILDERS = {b.name: b for b in (Helpsteer2, Helpsteer2Preference, Rewardbench)}


def prepare(
    name: str, *, source: str | Path, data_dir: str | Path, on_bad_row: OnBadRow = "raise"
) -> tfds.core.DatasetBuilder:
    """Builds the ArrayRecord dataset `name` under `data_dir` from the files at `source`."""
    if name not in BUILDERS:
        raise DataError(f"unknown dataset {name!r}; expected one of {sorted(BUILDERS)}")
    builder = BUILDERS[name](source=source, on_bad_row=on_bad_row, data_dir=str(data_dir))
    builder.download_and_prepare(file_format="array_record")
    return builder


def data_sources(
    name: str, *, data_dir: str | Path, source: str | Path | None = None
) -> dict[str, Any]:
    """Random-access data sources by split, preparing the dataset first if needed.

    Args:
        name: "helpsteer2", "helpsteer2_preference" or "rewardbench".
        data_dir: the TFDS data directory.
        source: the downloaded files; needed only when the dataset is not prepared yet.

    Returns:
        {split: data source}; each record is a dict of bytes (text) and numpy values.
    """
    if name not in BUILDERS:
        raise DataError(f"unknown dataset {name!r}; expected one of {sorted(BUILDERS)}")
    builder = BUILDERS[name](source=source, data_dir=str(data_dir))
    if not builder.is_prepared():
        if source is None:
            raise DataError(f"{name} is not prepared under {data_dir}; pass source= to prepare it")
        builder.download_and_prepare(file_format="array_record")
    return dict(builder.as_data_source())


def _str(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def row_from_record(record: dict[str, Any]) -> RatingRow | PreferenceRow | RewardBenchRow:
    """Turns one data-source record back into the row dataclass its builder read."""
    if "response_1" in record:
        return PreferenceRow(
            _str(record["split"]),
            _str(record["prompt"]),
            _str(record["response_1"]),
            _str(record["response_2"]),
            int(record["preference_strength"]),
            preference_statement=_str(record["preference_statement"]),
            preference_elaboration=_str(record["preference_elaboration"]),
            all_preferences_unprocessed=tuple(
                PreferenceAnnotation(int(v)) for v in record["raw_strengths"]
            ),
        )
    if "chosen" in record:
        fields = ("prompt", "chosen", "rejected", "subset")
        return RewardBenchRow(*(_str(record[k]) for k in fields), id=int(record["id"]))
    if "response" in record:
        ratings = {a: int(record[a]) for a in ATTRIBUTES}
        return RatingRow(_str(record["prompt"]), _str(record["response"]), **ratings)
    raise DataError(f"record with keys {sorted(record)} matches no HelpSteer2 builder")
