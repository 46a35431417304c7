"""TFDS builders: prepare ArrayRecord from real and synthetic files, read back in file order."""

import json
from collections import Counter

import pytest

from nemotron_jax.data import helpsteer2 as hs
from nemotron_jax.data import tfds_builders as tb
from nemotron_jax.errors import DataError

VAL18_LABELS = [-3, -1, -1, 2, 1, 0, 0, -2, -2, 0, 1, 0, -2, 1, 0, 2, -1, -2]
LLMBAR_SUBSETS = {
    "llmbar-natural": 100,
    "llmbar-adver-neighbor": 134,
    "llmbar-adver-GPTInst": 92,
    "llmbar-adver-GPTOut": 47,
    "llmbar-adver-manual": 46,
}


def _rows(source) -> list:
    return [tb.row_from_record(source[i]) for i in range(len(source))]


def test_helpsteer2_from_real_rows(shared_data, tmp_path):
    # A HelpSteer2 download: the card's example row plus the 8 NeMo-Aligner rows, parsed back.
    card, _ = hs.read_ratings(shared_data / "helpsteer2_card_examples" / "train_example.jsonl")
    nemo, _ = hs.read_nemo_regression(
        shared_data / "helpsteer2_nemo_aligner_test_rm" / "test-rm.jsonl"
    )
    rows = card + [r.to_rating_row()[0] for r in nemo]
    src = tmp_path / "HelpSteer2"
    src.mkdir()
    for name, part in (("train.jsonl", rows[:7]), ("validation.jsonl", rows[7:])):
        lines = [
            json.dumps({"prompt": r.prompt, "response": r.response, **r.ratings()}) for r in part
        ]
        (src / name).write_text("\n".join(lines) + "\n")
    sources = tb.data_sources("helpsteer2", data_dir=tmp_path / "tfds", source=src)
    assert {k: len(v) for k, v in sources.items()} == {"train": 7, "validation": 2}
    assert _rows(sources["train"]) + _rows(sources["validation"]) == rows  # file order kept
    assert isinstance(sources["train"][0]["prompt"], bytes)
    # Prepared once: a second call needs no source.
    again = tb.data_sources("helpsteer2", data_dir=tmp_path / "tfds")
    assert len(again["train"]) == 7


def test_preference_from_val18_file(shared_data, tmp_path):
    path = shared_data / "helpsteer2_preference_val18" / "preference_val18.jsonl"
    builder = tb.prepare("helpsteer2_preference", source=path, data_dir=tmp_path)
    assert list(builder.info.splits) == ["validation"]  # every row is "val"
    (report,) = builder.info.metadata["read_report"]
    assert (report["rows_read"], report["rows_kept"], report["filtered_spread"]) == (18, 18, 0)
    rows = _rows(builder.as_data_source()["validation"])
    assert [r.preference_strength for r in rows] == VAL18_LABELS  # recomputed, no file label
    assert rows[3].raw_strengths == (1, 2, 1, -1, 2)


def test_preference_and_rewardbench_from_synthetic(synthetic_dir, tmp_path):
    expected, _ = hs.read_preferences(synthetic_dir / "preference" / "preference.jsonl.gz")
    sources = tb.data_sources("helpsteer2_preference", data_dir=tmp_path, source=synthetic_dir)
    got = _rows(sources["train"]) + _rows(sources["validation"])
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        assert (a.split, a.prompt, a.response_1, a.response_2) == (
            b.split, b.prompt, b.response_1, b.response_2,
        )  # fmt: skip
        assert (a.preference_strength, a.raw_strengths) == (b.preference_strength, b.raw_strengths)
        assert a.preference_statement == b.preference_statement
    rewardbench = tb.data_sources(
        "rewardbench", data_dir=tmp_path, source=synthetic_dir / "rewardbench"
    )
    assert len(rewardbench["filtered"]) == 40


def test_rewardbench_reads_llmbar(shared_data, tmp_path):
    path = shared_data / "llmbar" / "rewardbench_format.jsonl"
    sources = tb.data_sources("rewardbench", data_dir=tmp_path, source=path)
    rows = _rows(sources["filtered"])
    expected, _ = hs.read_rewardbench(path)
    assert rows == expected
    assert Counter(r.subset for r in rows) == LLMBAR_SUBSETS


def test_missing_sources_name_the_expected_files(tmp_path):
    with pytest.raises(DataError, match=r"expected one of: train\.jsonl\.gz, train\.jsonl"):
        tb.prepare("helpsteer2", source=tmp_path, data_dir=tmp_path / "out")
    with pytest.raises(DataError, match=r"preference/preference\.jsonl\.gz"):
        tb.prepare("helpsteer2_preference", source=tmp_path, data_dir=tmp_path / "out")
    with pytest.raises(DataError, match="source not found"):
        tb.prepare("rewardbench", source=tmp_path / "absent", data_dir=tmp_path / "out")
    with pytest.raises(DataError, match="not prepared"):
        tb.data_sources("rewardbench", data_dir=tmp_path / "empty")
    with pytest.raises(DataError, match="unknown dataset"):
        tb.data_sources("helpsteer3", data_dir=tmp_path)
