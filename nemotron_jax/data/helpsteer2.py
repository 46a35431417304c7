"""Rows of HelpSteer2, HelpSteer2-Preference, NeMo regression files and RewardBench, from disk.

Files are read as the Hugging Face hub serves them: `.jsonl`, `.jsonl.gz` or `.parquet`.

| reader | file (in `nvidia/HelpSteer2` unless noted) | row |
|---|---|---|
| `read_ratings` | `train.jsonl.gz`, `validation.jsonl.gz` | `RatingRow` |
| `read_disagreements` | `disagreements/disagreements.jsonl.gz` | `DisagreementRow` |
| `read_preferences` | `preference/preference.jsonl.gz` | `PreferenceRow` |
| `read_nemo_regression` | NeMo-Aligner regression jsonl (`text`, `label`) | `NemoRegressionRow` |
| `read_rewardbench` | `allenai/reward-bench` (`prompt, chosen, rejected`, ...) | `RewardBenchRow` |

Every reader returns `(rows, ReadReport)`. A bad row (malformed JSON, missing field, wrong type,
value out of range, empty prompt or response, turns that do not alternate) raises `DataError`
naming the file, the 1-based line (or parquet row) and the field; with `on_bad_row="skip"` it is
skipped and counted per reason in the report instead. Unknown extra fields are ignored. Blank
lines are not rows; they are counted in `ReadReport.blank_lines`.

HelpSteer2 prompts hold every earlier turn joined with `\\n<extra_id_1>Assistant\\n` and
`\\n<extra_id_1>User\\n`; rows carry them split into `turns` (user first, alternating).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nemotron_jax.data import files as rf
from nemotron_jax.data.tokenizer import parse_nemo_chat, split_helpsteer2_prompt
from nemotron_jax.errors import DataError

ATTRIBUTES = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")
NUM_LABEL_SLOTS = 9
# NeMo-Aligner's attribute order (steerlm `common.py`); HelpSteer2 fills slots 4..8.
LABEL_SLOTS = {name: 4 + i for i, name in enumerate(ATTRIBUTES)}
IGNORE_LABEL = -100.0


def _turns(prompt: str) -> tuple[str, ...]:
    turns = tuple(m["content"] for m in split_helpsteer2_prompt(prompt))
    if len(turns) % 2 == 0:
        raise ValueError("the prompt ends with an assistant turn; the last turn must be the user's")
    return turns


def _messages(turns: tuple[str, ...]) -> list[dict[str, str]]:
    return [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(turns)]


@dataclasses.dataclass(frozen=True)
class RatingRow:
    """One HelpSteer2 response with its aggregated 0-4 ratings.

    `turns` is derived from `prompt`: user, assistant, ..., user (odd length).
    """

    prompt: str
    response: str
    helpfulness: int
    correctness: int
    coherence: int
    complexity: int
    verbosity: int
    turns: tuple[str, ...] = dataclasses.field(init=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "turns", _turns(self.prompt))

    def ratings(self) -> dict[str, int]:
        return {a: getattr(self, a) for a in ATTRIBUTES}

    def messages(self) -> list[dict[str, str]]:
        return _messages(self.turns)


@dataclasses.dataclass(frozen=True)
class DisagreementRow:
    """One HelpSteer2 response with every annotator's rating per attribute (3 to 5 each)."""

    prompt: str
    response: str
    helpfulness: tuple[int, ...]
    correctness: tuple[int, ...]
    coherence: tuple[int, ...]
    complexity: tuple[int, ...]
    verbosity: tuple[int, ...]
    turns: tuple[str, ...] = dataclasses.field(init=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "turns", _turns(self.prompt))


@dataclasses.dataclass(frozen=True)
class PreferenceAnnotation:
    """One annotator's raw preference (`all_preferences_unprocessed` entry)."""

    strength: int
    justification: str = ""


@dataclasses.dataclass(frozen=True)
class SimilarPreference:
    """One `three_most_similar_preferences` entry."""

    strength: int
    statement: str = ""
    elaboration: str = ""


@dataclasses.dataclass(frozen=True)
class PreferenceRow:
    """One HelpSteer2-Preference pair.

    `preference_strength` < 0 means response_1 is better, > 0 response_2, 0 a tie. It is None
    when the file carries only the raw annotations; `aggregation.aggregate_preferences` fills it.
    """

    split: str
    prompt: str
    response_1: str
    response_2: str
    preference_strength: int | None
    preference_statement: str = ""
    preference_elaboration: str = ""
    three_most_similar_preferences: tuple[SimilarPreference, ...] = ()
    all_preferences_unprocessed: tuple[PreferenceAnnotation, ...] = ()
    turns: tuple[str, ...] = dataclasses.field(init=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "turns", _turns(self.prompt))

    @property
    def is_train(self) -> bool:
        """NeMo's rule: exactly "train" is train; anything else ("val") is validation."""
        return self.split == "train"

    @property
    def raw_strengths(self) -> tuple[int, ...]:
        return tuple(a.strength for a in self.all_preferences_unprocessed)


@dataclasses.dataclass(frozen=True)
class NemoRegressionRow:
    """A NeMo-Aligner regression row: `<extra_id_*>` chat text and 9 labels (-100 = unset)."""

    text: str
    label: tuple[float, ...]

    def conversation(self) -> tuple[str, tuple[str, ...], str]:
        """(system prompt, prompt turns, response) parsed from `text`.

        Raises:
            ValueError: the text is not a NeMo chat ending in an assistant turn.
        """
        messages = parse_nemo_chat(self.text)
        if len(messages) < 3 or messages[-1]["role"] != "assistant":
            raise ValueError("nemo text does not end with an assistant response")
        turns = tuple(m["content"] for m in messages[1:-1])
        return messages[0]["content"], turns, messages[-1]["content"]

    def to_rating_row(self) -> tuple[RatingRow, str]:
        """The row as a `RatingRow`, with the system prompt its text was rendered with.

        Raises:
            ValueError: the text does not parse (`conversation`), or slots 4..8 are not integer
                ratings 0-4.
        """
        system, turns, response = self.conversation()
        values = [self.label[s] for s in LABEL_SLOTS.values()]
        if any(v != int(v) or not 0 <= v <= 4 for v in values):
            raise ValueError(f"label slots 4..8 are not ratings 0-4: {values}")
        # Rejoin the turns the way HelpSteer2 stores a multi-turn prompt.
        prompt = turns[0] + "".join(
            ("\n<extra_id_1>Assistant\n", "\n<extra_id_1>User\n")[i % 2] + t
            for i, t in enumerate(turns[1:])
        )
        ratings = {a: int(v) for a, v in zip(ATTRIBUTES, values, strict=True)}
        return RatingRow(prompt=prompt, response=response, **ratings), system


@dataclasses.dataclass(frozen=True)
class RewardBenchRow:
    """A RewardBench-format pair; `chosen` is the better response."""

    prompt: str
    chosen: str
    rejected: str
    subset: str
    id: int


def _prompt(rec: Mapping[str, Any]) -> str:
    prompt = rf.text(rec, "prompt")
    try:
        _turns(prompt)
    except ValueError as e:
        raise rf.BadRow("bad_turns", "prompt", str(e)) from e
    return prompt


def _rating(rec: Mapping[str, Any], index: int) -> RatingRow:
    prompt, response = _prompt(rec), rf.text(rec, "response")
    return RatingRow(prompt, response, **{a: rf.integer(rec, a, 0, 4) for a in ATTRIBUTES})


def _disagreement(rec: Mapping[str, Any], index: int) -> DisagreementRow:
    prompt, response = _prompt(rec), rf.text(rec, "response")
    return DisagreementRow(
        prompt, response, **{a: rf.integer_list(rec, a, 0, 4) for a in ATTRIBUTES}
    )


def _preference(rec: Mapping[str, Any], index: int) -> PreferenceRow:
    split, prompt = rf.text(rec, "split"), _prompt(rec)
    response_1, response_2 = rf.text(rec, "response_1"), rf.text(rec, "response_2")
    raw = tuple(
        PreferenceAnnotation(rf.integer(a, "strength", -3, 3), rf.optional_text(a, "justification"))
        for a in rf.entries(rec, "all_preferences_unprocessed")
    )
    # The label may be absent only where the raw annotations can recompute it (partial extracts
    # of the release, e.g. helpsteer2_preference_val18, drop the aggregated fields).
    strength = None
    if not raw or rec.get("preference_strength") is not None:
        strength = rf.integer(rec, "preference_strength", -3, 3)
    similar = tuple(
        SimilarPreference(
            rf.integer(s, "strength", -3, 3),
            rf.optional_text(s, "statement"),
            rf.optional_text(s, "elaboration"),
        )
        for s in rf.entries(rec, "three_most_similar_preferences")
    )
    return PreferenceRow(
        split,
        prompt,
        response_1,
        response_2,
        strength,
        preference_statement=rf.optional_text(rec, "preference_statement"),
        preference_elaboration=rf.optional_text(rec, "preference_elaboration"),
        three_most_similar_preferences=similar,
        all_preferences_unprocessed=raw,
    )


def _nemo(rec: Mapping[str, Any], index: int) -> NemoRegressionRow:
    chat = rf.text(rec, "text")
    label = rf.field(rec, "label", list)
    if len(label) != NUM_LABEL_SLOTS:
        raise rf.BadRow(
            "out_of_range", "label", f"expected {NUM_LABEL_SLOTS} values, got {len(label)}"
        )
    if any(isinstance(v, bool) or not isinstance(v, int | float) for v in label):
        raise rf.BadRow("wrong_type", "label", "expected numbers")
    return NemoRegressionRow(chat, tuple(float(v) for v in label))


def _rewardbench(rec: Mapping[str, Any], index: int) -> RewardBenchRow:
    prompt, chosen, rejected = (
        rf.text(rec, "prompt"),
        rf.text(rec, "chosen"),
        rf.text(rec, "rejected"),
    )
    subset = rf.text(rec, "subset")
    # Conversions such as the LLMBar file carry no id; the 0-based record index stands in.
    row_id = rf.field(rec, "id", int) if rec.get("id") is not None else index
    return RewardBenchRow(prompt, chosen, rejected, subset, row_id)


def read_ratings(
    path: str | Path, *, on_bad_row: rf.OnBadRow = "raise"
) -> tuple[list[RatingRow], rf.ReadReport]:
    """Reads HelpSteer2 ratings (`train`/`validation` files): 5 integer attributes in 0..4."""
    return rf.read_records(path, _rating, on_bad_row)


def read_disagreements(
    path: str | Path, *, on_bad_row: rf.OnBadRow = "raise"
) -> tuple[list[DisagreementRow], rf.ReadReport]:
    """Reads `disagreements`: each attribute a non-empty list of per-annotator ratings 0..4."""
    return rf.read_records(path, _disagreement, on_bad_row)


def read_preferences(
    path: str | Path, *, on_bad_row: rf.OnBadRow = "raise"
) -> tuple[list[PreferenceRow], rf.ReadReport]:
    """Reads HelpSteer2-Preference rows; every strength must lie in [-3, 3].

    `preference_strength` is required unless `all_preferences_unprocessed` is present (then the
    row's label is None until aggregated). Statement, elaboration and the annotation lists are
    optional and default to empty.
    """
    return rf.read_records(path, _preference, on_bad_row)


def read_nemo_regression(
    path: str | Path, *, on_bad_row: rf.OnBadRow = "raise"
) -> tuple[list[NemoRegressionRow], rf.ReadReport]:
    """Reads NeMo-Aligner regression rows: `text` and a 9-number `label`."""
    return rf.read_records(path, _nemo, on_bad_row)


def read_rewardbench(
    path: str | Path, *, on_bad_row: rf.OnBadRow = "raise"
) -> tuple[list[RewardBenchRow], rf.ReadReport]:
    """Reads RewardBench-format rows; a missing `id` becomes the 0-based record index."""
    return rf.read_records(path, _rewardbench, on_bad_row)


_SUFFIXES = (".jsonl.gz", ".jsonl", ".parquet")
_LAYOUT = {
    "train": ("train",),
    "validation": ("validation",),
    "preference": ("preference/preference", "preference"),
    "disagreements": ("disagreements/disagreements", "disagreements"),
}


def find_helpsteer2_file(root: str | Path, which: str) -> Path:
    """Locates one HelpSteer2 file in a download of the dataset repository.

    Args:
        root: the directory the user downloaded `nvidia/HelpSteer2` into.
        which: "train", "validation", "preference" or "disagreements".

    Raises:
        DataError: none of the expected names exists; the message lists them.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: HelpSteer2 directory not found")
    candidates = [root / (stem + s) for stem in _LAYOUT[which] for s in _SUFFIXES]
    for path in candidates:
        if path.is_file():
            return path
    expected = ", ".join(str(p.relative_to(root)) for p in candidates)
    raise DataError(f"{root}: no HelpSteer2 {which} file; expected one of: {expected}")
