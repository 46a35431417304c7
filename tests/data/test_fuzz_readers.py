"""Fuzzing the .jsonl readers: whatever a file holds (random bytes, JSON of the wrong shapes,
rows with fields missing, mistyped or out of range), reading it either returns rows, with every
bad row counted as a skip under on_bad_row="skip", or raises one `DataError` line naming the
file and line. It never crashes with another exception."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nemotron_jax.data import helpsteer2 as hs
from nemotron_jax.errors import DataError

READERS = {
    "ratings": hs.read_ratings,
    "disagreements": hs.read_disagreements,
    "preferences": hs.read_preferences,
    "nemo_regression": hs.read_nemo_regression,
    "rewardbench": hs.read_rewardbench,
}
FIELDS = [
    "prompt", "response", "response_1", "response_2", "helpfulness", "correctness",
    "coherence", "complexity", "verbosity", "preference_strength", "split", "chosen",
    "rejected", "subset", "id", "text", "label", "individual_preference",
]  # fmt: skip

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10, 10) | st.floats(allow_nan=True)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=6,
)  # fmt: skip
records = st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=8)
lines = st.one_of(
    records.map(lambda r: json.dumps(r).encode()),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=40),
    st.just(b""),
)


@pytest.mark.parametrize("reader", sorted(READERS))
@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(content=st.lists(lines, max_size=6))
def test_a_reader_never_crashes(tmp_path, reader, content):
    path = tmp_path / f"{reader}.jsonl"
    path.write_bytes(b"\n".join(content))
    read = READERS[reader]
    try:
        rows, report = read(path, on_bad_row="skip")
    except DataError as e:  # a file-level problem: one line naming the file
        assert str(path) in str(e) and "\n" not in str(e)
        return
    assert report.rows_read == len(rows) + sum(report.skipped.values())
    try:
        read(path, on_bad_row="raise")
    except DataError as e:
        assert report.skipped, "raise failed where skip skipped nothing"
        assert str(path) in str(e) and "line " in str(e) and "\n" not in str(e)
    else:
        assert not report.skipped
