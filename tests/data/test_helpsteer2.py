"""Readers: the real HelpSteer2 / NeMo / LLMBar rows, every file format, and bad input."""

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nemotron_jax.data import helpsteer2 as hs
from nemotron_jax.data.tokenizer import format_nemo_chat
from nemotron_jax.errors import DataError

# SOURCE.md of helpsteer2_nemo_aligner_test_rm: helpfulness..verbosity per row.
NEMO_RATINGS = [
    (4, 4, 4, 3, 2), (2, 3, 3, 3, 3), (4, 4, 4, 1, 1), (1, 1, 3, 2, 4),
    (2, 2, 3, 2, 3), (0, 0, 2, 2, 3), (4, 4, 4, 0, 2), (4, 4, 4, 0, 2),
]  # fmt: skip
RATING = {
    "prompt": "hi",
    "response": "hello",
    "helpfulness": 3,
    "correctness": 4,
    "coherence": 4,
    "complexity": 2,
    "verbosity": 1,
}


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_card_examples(shared_data):
    d = shared_data / "helpsteer2_card_examples"
    (rating,), report = hs.read_ratings(d / "train_example.jsonl")
    assert report.rows_read == report.rows_kept == 1 and not report.skipped
    assert rating.prompt == "c#" and rating.turns == ("c#",)
    assert rating.ratings() == {
        "helpfulness": 3, "correctness": 4, "coherence": 4, "complexity": 2, "verbosity": 1,
    }  # fmt: skip
    (dis,), _ = hs.read_disagreements(d / "disagreements_example.jsonl")
    assert dis.response == rating.response
    assert (dis.helpfulness, dis.verbosity) == ((3, 3, 4), (2, 1, 1))
    (pref,), _ = hs.read_preferences(d / "preference_example.jsonl")
    assert pref.is_train and pref.preference_strength == 1 and pref.raw_strengths == (1, 1, 1)
    assert [s.strength for s in pref.three_most_similar_preferences] == [1, 1, 1]
    raw = pref.all_preferences_unprocessed[0].justification
    assert raw == pref.preference_statement + " " + pref.preference_elaboration


def test_val18_rows_have_raw_annotations_only(shared_data):
    rows, report = hs.read_preferences(
        shared_data / "helpsteer2_preference_val18" / "preference_val18.jsonl"
    )
    assert report.rows_kept == 18
    assert all(r.split == "val" and not r.is_train for r in rows)
    assert all(r.preference_strength is None for r in rows)
    assert [len(r.raw_strengths) for r in rows].count(5) == 2
    assert rows[3].raw_strengths == (1, 2, 1, -1, 2)


def test_nemo_rows_parse_back_to_helpsteer2(shared_data):
    rows, _ = hs.read_nemo_regression(
        shared_data / "helpsteer2_nemo_aligner_test_rm" / "test-rm.jsonl"
    )
    assert len(rows) == 8
    for row, ratings in zip(rows, NEMO_RATINGS, strict=True):
        assert row.label[:4] == (hs.IGNORE_LABEL,) * 4
        assert row.label[4:] == tuple(float(r) for r in ratings)
        rating, system = row.to_rating_row()
        assert tuple(rating.ratings().values()) == ratings
        messages = [*rating.messages(), {"role": "assistant", "content": rating.response}]
        assert format_nemo_chat(messages, system=system) == row.text


def test_llmbar_rewardbench_rows(shared_data):
    rows, report = hs.read_rewardbench(shared_data / "llmbar" / "rewardbench_format.jsonl")
    assert report.rows_kept == 419
    assert [r.id for r in rows] == list(range(419))  # no id in the file: the row index
    assert sum(r.subset == "llmbar-natural" for r in rows) == 100


def test_multi_turn_prompt_is_split():
    prompt = "a\n<extra_id_1>Assistant\nb\n<extra_id_1>User\nc"
    row = hs.RatingRow(prompt, "d", 1, 1, 1, 1, 1)
    assert row.turns == ("a", "b", "c")
    assert [m["role"] for m in row.messages()] == ["user", "assistant", "user"]


def test_jsonl_gz_and_parquet_read_the_same(tmp_path):
    rows = [RATING, {**RATING, "prompt": "x\n<extra_id_1>Assistant\ny\n<extra_id_1>User\nz"}]
    lines = [json.dumps(r) for r in rows]
    with gzip.open(tmp_path / "train.jsonl.gz", "wt") as f:
        f.write("\n".join(lines) + "\n\n")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet")
    from_gz, report = hs.read_ratings(tmp_path / "train.jsonl.gz")
    from_pq, _ = hs.read_ratings(tmp_path / "train.parquet")
    assert from_gz == from_pq and len(from_gz) == 2 and from_gz[1].turns == ("x", "y", "z")
    assert report.blank_lines == 1


def test_preference_parquet_with_nested_lists(tmp_path):
    row = {
        "split": "train", "prompt": "p", "response_1": "a", "response_2": "b",
        "preference_strength": -2, "preference_statement": "s", "preference_elaboration": "e",
        "three_most_similar_preferences": [{"statement": "s", "elaboration": "e", "strength": -2}],
        "all_preferences_unprocessed": [{"strength": -2, "justification": "j"}] * 3,
    }  # fmt: skip
    pq.write_table(pa.Table.from_pylist([row]), tmp_path / "preference.parquet")
    (pref,), _ = hs.read_preferences(tmp_path / "preference.parquet")
    assert pref.preference_strength == -2 and pref.raw_strengths == (-2, -2, -2)


BAD = [
    ("{not json", "malformed_json", None),
    (
        json.dumps({k: v for k, v in RATING.items() if k != "coherence"}),
        "missing_field",
        "coherence",
    ),
    (json.dumps({**RATING, "helpfulness": "3"}), "wrong_type", "helpfulness"),
    (json.dumps({**RATING, "helpfulness": True}), "wrong_type", "helpfulness"),
    (json.dumps({**RATING, "verbosity": 5}), "out_of_range", "verbosity"),
    (json.dumps({**RATING, "response": "  "}), "empty_text", "response"),
    (json.dumps({**RATING, "prompt": "a\n<extra_id_1>User\nb"}), "bad_turns", "prompt"),
    (json.dumps({**RATING, "prompt": "a\n<extra_id_1>Assistant\nb"}), "bad_turns", "prompt"),
    ("[1, 2]", "wrong_type", None),
]


@pytest.mark.parametrize("line,reason,field", BAD)
def test_bad_rating_row_names_file_line_and_field(tmp_path, line, reason, field):
    path = _write(tmp_path / "train.jsonl", [json.dumps(RATING), line, json.dumps(RATING)])
    with pytest.raises(DataError, match=r"train\.jsonl, line 2") as e:
        hs.read_ratings(path)
    if field:
        assert f"field {field!r}" in str(e.value)
    rows, report = hs.read_ratings(path, on_bad_row="skip")
    assert len(rows) == 2 and report.rows_read == 3
    assert report.skipped == {reason: 1} and "line 2" in report.messages[0]


@pytest.mark.parametrize(
    "change,field",
    [
        ({"preference_strength": 4}, "preference_strength"),
        ({"preference_strength": None}, "preference_strength"),
        ({"response_2": ""}, "response_2"),
        ({"all_preferences_unprocessed": [{"strength": -100}]}, "strength"),
        ({"all_preferences_unprocessed": "x"}, "all_preferences_unprocessed"),
    ],
)
def test_bad_preference_row(tmp_path, change, field):
    row = {"split": "val", "prompt": "p", "response_1": "a", "response_2": "b"}
    row = {**row, "preference_strength": 1, **change}
    path = _write(tmp_path / "preference.jsonl", [json.dumps(row)])
    with pytest.raises(DataError, match=rf"preference\.jsonl, line 1: field '{field}'"):
        hs.read_preferences(path)


def test_bad_disagreement_and_nemo_rows(tmp_path):
    path = _write(tmp_path / "d.jsonl", [json.dumps({**RATING, "helpfulness": [3, 9, 2]})])
    with pytest.raises(DataError, match="field 'helpfulness': 9 is outside"):
        hs.read_disagreements(path)
    path = _write(tmp_path / "n.jsonl", [json.dumps({"text": "t", "label": [1.0] * 5})])
    with pytest.raises(DataError, match="field 'label': expected 9 values"):
        hs.read_nemo_regression(path)


def test_missing_or_unknown_files(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        hs.read_ratings(tmp_path / "nope.jsonl")
    _write(tmp_path / "x.csv", ["a"])
    with pytest.raises(DataError, match="unknown file type"):
        hs.read_ratings(tmp_path / "x.csv")
    (tmp_path / "bad.jsonl.gz").write_bytes(b"not gzip")
    with pytest.raises(DataError, match="cannot be read"):
        hs.read_ratings(tmp_path / "bad.jsonl.gz")
    with pytest.raises(DataError, match="directory not found"):
        hs.find_helpsteer2_file(tmp_path / "absent", "train")
    with pytest.raises(DataError, match=r"expected one of: preference/preference\.jsonl\.gz"):
        hs.find_helpsteer2_file(tmp_path, "preference")
    with pytest.raises(ValueError, match="on_bad_row"):
        hs.read_ratings(tmp_path / "x.csv", on_bad_row="ignore")


def test_multi_turn_nemo_row_round_trip():
    prompt = "a\n<extra_id_1>Assistant\nb\n<extra_id_1>User\nc"
    messages = [*hs.RatingRow(prompt, "d", 0, 0, 0, 0, 0).messages()]
    text = format_nemo_chat([*messages, {"role": "assistant", "content": "d"}], system="S")
    label = (hs.IGNORE_LABEL,) * 4 + (4.0, 3.0, 2.0, 1.0, 0.0)
    rating, system = hs.NemoRegressionRow(text, label).to_rating_row()
    assert (rating.prompt, rating.response, system) == (prompt, "d", "S")
    assert rating.ratings()["helpfulness"] == 4
    with pytest.raises(ValueError, match="not ratings"):
        hs.NemoRegressionRow(text, (hs.IGNORE_LABEL,) * 9).to_rating_row()
    with pytest.raises(ValueError, match="must start with"):
        hs.NemoRegressionRow("plain text", label).conversation()
