"""The data entry point of training: the configured HelpSteer2 source, read and encoded for one
kind of example.

    splits = load(config.data, "pairs", drop_ties=True)
    splits.train, splits.validation   # EncodedDataset each (random access, fixed shapes)
    splits.tokenizer, splits.report   # the tokenizer used; what was read, skipped, truncated

The kind says which file is read: HelpSteer2's ratings for `regression` and `sft` (responses of
helpfulness >= data.sft_min_helpfulness only), HelpSteer2-Preference for `pairs` and `prompts`
(each distinct prompt once; the prompts that online RL samples from).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from nemotron_jax.errors import ConfigError

# Example kind -> the HelpSteer2 file family its rows come from.
SOURCE_OF_KIND = {
    "regression": "ratings",
    "sft": "ratings",
    "pairs": "preferences",
    "lm_pairs": "preferences",
    "prompts": "preferences",
}
SOURCES = ("synthetic", "dir", "tfds")


@dataclasses.dataclass
class Splits:
    train: Any  # pipeline.EncodedDataset
    validation: Any  # pipeline.EncodedDataset
    tokenizer: Any
    report: dict[str, Any]


class _Data(dict):
    """A dict read like a ConfigDict (`data.source`)."""

    __getattr__ = dict.__getitem__


def data_dir(data) -> Path:
    """The directory of HelpSteer2 files that `data` (an experiment's `config.data`) names; the
    synthetic set is generated there on first use."""
    from nemotron_jax.data import synthetic

    if data.source == "synthetic":
        root = Path(os.environ.get("NEMOTRON_JAX_CACHE", ".cache")) / "synthetic"
        out = root / f"prompts{data.synthetic_prompts}-seed{data.synthetic_seed}"
        if not (out / "tokenizer.model").exists():
            # Generate beside the target and rename, so a crash never leaves a partial dataset.
            root.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=out.name + ".partial-", dir=root))
            synthetic.generate(tmp, num_prompts=data.synthetic_prompts, seed=data.synthetic_seed)
            try:
                os.replace(tmp, out)
            except OSError:  # another process finished first: keep its copy
                shutil.rmtree(tmp, ignore_errors=True)
        return out
    if data.source in ("dir", "tfds"):
        if not data.dir:
            raise ConfigError(f"config.data.source is {data.source!r} but config.data.dir is empty")
        path = Path(data.dir)
        if not path.is_dir():
            raise FileNotFoundError(f"config.data.dir {path}: no such directory")
        return path
    raise ConfigError(f"config.data.source {data.source!r} is unknown; choose from {SOURCES}")


def configured_tokenizer(data, root: Path | None = None):
    """The tokenizer `data.tokenizer` names, or the data's own SentencePiece model when empty
    (`root`: the data directory, default `data_dir(data)`)."""
    from nemotron_jax.data.tokenizer import Llama3Tokenizer, SentencePieceTokenizer

    if data.tokenizer == "llama3":
        return Llama3Tokenizer()
    if data.tokenizer == "synthetic":  # a tiny model on real text (smoke runs)
        synthetic = dict(data.items(), source="synthetic")
        return SentencePieceTokenizer.load(data_dir(_Data(synthetic)) / "tokenizer.model")
    if data.tokenizer:
        return SentencePieceTokenizer.load(data.tokenizer)
    root = data_dir(data) if root is None else root
    if not (root / "tokenizer.model").exists():
        raise ConfigError(
            "config.data.tokenizer is empty and the data has no tokenizer.model; "
            "set it to 'llama3' or a SentencePiece model path"
        )
    return SentencePieceTokenizer.load(root / "tokenizer.model")


def _read(data, root: Path, family: str) -> tuple[list, list, dict]:
    """(train rows, validation rows, read report) from the files, or through the TFDS builders
    when data.source is "tfds" (prepared once into ArrayRecord, then random access)."""
    from nemotron_jax.data import helpsteer2
    from nemotron_jax.data.pipeline import preference_splits

    if data.source == "tfds":
        from nemotron_jax.data import tfds_builders

        name = "helpsteer2" if family == "ratings" else "helpsteer2_preference"
        tfds_dir = Path(data.tfds_dir or root / "tfds")
        sources = tfds_builders.data_sources(name, data_dir=tfds_dir, source=root)
        rows = {
            split: [tfds_builders.row_from_record(src[i]) for i in range(len(src))]
            for split, src in sources.items()
        }
        report: dict = {"tfds": {"name": name, "data_dir": str(tfds_dir)}}
        return rows.get("train", []), rows.get("validation", []), report
    if family == "ratings":
        report, split_rows = {}, {}
        for split in ("train", "validation"):
            path = helpsteer2.find_helpsteer2_file(root, split)
            split_rows[split], read = helpsteer2.read_ratings(path, on_bad_row=data.on_bad_row)
            report[split] = dataclasses.asdict(read)
        return split_rows["train"], split_rows["validation"], report
    path = helpsteer2.find_helpsteer2_file(root, "preference")
    rows, read = helpsteer2.read_preferences(path, on_bad_row=data.on_bad_row)
    splits = preference_splits(rows)
    return splits["train"], splits["validation"], {"preference": dataclasses.asdict(read)}


def _unique_prompts(rows) -> tuple[list, int]:
    seen, out = set(), []
    for row in rows:
        key = tuple(row.turns) if hasattr(row, "turns") else (row.prompt,)
        if key not in seen:
            seen.add(key)
            out.append(row)
    return out, len(rows) - len(out)


def summary(read_report: dict, train, validation) -> str:
    """One line of what the data lost: rows read and skipped (by reason), then per split the
    examples kept and what truncation and filtering did (`FormatReport`s)."""
    reads = [r for r in read_report.values() if isinstance(r, dict) and "rows_read" in r]
    rows = sum(r["rows_read"] for r in reads)
    reasons: dict[str, int] = {}
    for r in reads:
        for reason, n in r["skipped"].items():
            reasons[reason] = reasons.get(reason, 0) + n
    skipped = sum(reasons.values())
    why = f" ({', '.join(f'{n} {k}' for k, n in sorted(reasons.items()))})" if reasons else ""
    head = f"data: {rows} rows read, {skipped} skipped{why}" if reads else "data: tfds"

    def split(name, r) -> str:
        lost = {
            "truncated": r.truncated_turns + r.truncated_tokens,
            "too long": r.skipped_too_long + r.skipped_response_too_long,
            "ties dropped": r.ties_dropped,
        }
        detail = ", ".join(f"{n} {k}" for k, n in lost.items() if n)
        return f"{name} {r.kept} of {r.examples} kept" + (f" ({detail})" if detail else "")

    return f"{head}; {split('train', train)}; {split('validation', validation)}"


def load(
    data, kind: str, *, tokenizer=None, max_len: int | None = None, drop_ties: bool = False
) -> Splits:
    """Reads and encodes the train and validation splits.

    Args:
        data: an experiment's `config.data`.
        kind: "regression", "pairs", "sft" or "prompts" (see `formatting.encode_rows`).
        tokenizer: the tokenizer to encode with; default the one `data.tokenizer` names (or the
            synthetic data's SentencePiece model).
        max_len: T, default `data.max_len`.
        drop_ties: pairs only: give ties no example (else they keep weight for NeMo's policy).
    """
    from nemotron_jax.data.pipeline import encode

    if kind not in SOURCE_OF_KIND:
        raise ConfigError(f"data kind {kind!r} is unknown; choose from {list(SOURCE_OF_KIND)}")
    root = data_dir(data)
    tokenizer = configured_tokenizer(data, root) if tokenizer is None else tokenizer
    train, validation, read_report = _read(data, root, SOURCE_OF_KIND[kind])
    report: dict[str, Any] = {"data_dir": str(root), "read": read_report}
    if data.max_rows > 0:  # the first rows of each split, in file order (smoke)
        report["max_rows"] = data.max_rows
        report["rows_before_max_rows"] = {"train": len(train), "validation": len(validation)}
        train, validation = train[: data.max_rows], validation[: data.max_rows]
    if kind == "sft":
        keep = data.sft_min_helpfulness
        train, validation = (
            [r for r in rows if r.helpfulness >= keep] for rows in (train, validation)
        )
    if kind == "prompts":
        train, report["train_duplicate_prompts_merged"] = _unique_prompts(train)
        validation, report["eval_duplicate_prompts_merged"] = _unique_prompts(validation)
    options = dict(
        kind=kind,
        tokenizer=tokenizer,
        template=data.template,
        max_len=data.max_len if max_len is None else max_len,
        truncation=data.truncation,
        attributes=data.attributes,
        drop_ties=drop_ties,
    )
    train, validation = encode(train, **options), encode(validation, **options)
    report["summary"] = summary(read_report, train.report, validation.report)
    report.update(
        train_encoding=train.report.summary(),
        eval_encoding=validation.report.summary(),
        train_examples=len(train),
        eval_examples=len(validation),
    )
    return Splits(train, validation, tokenizer, report)
