"""Aggregation against every released test vector (helpsteer2_spec.md §1.1, §1.2)."""

import dataclasses
import itertools

import pytest

from nemotron_jax.data import aggregation as ag
from nemotron_jax.data import helpsteer2 as hs

# Released `preference_strength` of the 18 local validation rows, in file order (spec §1.2).
VAL18_LABELS = [-3, -1, -1, 2, 1, 0, 0, -2, -2, 0, 1, 0, -2, 1, 0, 2, -1, -2]
RELEASED = [
    ([-1, -3, 2, 2, -1], -2), ([3, -1, 3, -3, -1], -2), ([1, -1, 1, -1, -2], -1),
    ([-2, 2, 1, -2, 2], 2), ([-1, 3, -2, -3, 3], -2), ([2, -2, -2, -1, 1], -2),
    ([1, 1, -1, 1, -1], 1), ([-2, 2, 1, 1, -1], 1), ([-1, -2, 1, -1, 1], -1),
    ([-3, -1, -2, 2], -2), ([-1, -1, -1, 2], -1), ([1, 1, 1], 1),
]  # fmt: skip


@pytest.mark.parametrize("strengths,label", RELEASED)
def test_released_multi_annotator_rows(strengths, label):
    assert ag.aggregate_preference(strengths) == label


def test_val18_rows_match_released_labels(shared_data):
    rows, _ = hs.read_preferences(
        shared_data / "helpsteer2_preference_val18" / "preference_val18.jsonl"
    )
    out, report = ag.aggregate_preferences(rows)
    assert [r.preference_strength for r in out] == VAL18_LABELS
    assert (report.rows_in, report.kept, report.filtered_spread, report.ties) == (18, 18, 0, 5)
    assert report.compared == 0  # the file carries no labels to compare with


def test_card_preference_row_agrees_with_file(shared_data):
    rows, _ = hs.read_preferences(
        shared_data / "helpsteer2_card_examples" / "preference_example.jsonl"
    )
    out, report = ag.aggregate_preferences(rows)
    assert out[0].preference_strength == 1
    assert (report.compared, report.disagree_with_file) == (1, 0)


def test_tie_break_takes_the_larger_absolute_mean():
    # {1,1,2} and {1,2,2} both have range 1; the release says 2 (spec §1.2, local row 4).
    assert ag.closest_subset([1, 2, 1, -1, 2]) == (1, 2, 2)
    assert ag.aggregate_preference([1, 2, 1, -1, 2]) == 2
    assert ag.closest_indices([1, 2, 1, -1, 2]) == (2, 1, 4)
    # The mirror image gets the mirrored label, whatever the annotators' order.
    assert ag.aggregate_preference([-1, -2, -1, 1, -2]) == -2
    for perm in itertools.permutations([1, 2, 1, -1, 2]):
        assert ag.aggregate_preference(list(perm)) == 2
        assert ag.aggregate_preference([-v for v in perm]) == -2
    # Exactly opposite windows: the documented convention, the positive one.
    assert ag.closest_subset([-1, -1, 0, 1, 1]) == (0, 1, 1)


def test_round_mean():
    assert [ag.round_mean(v) for v in ([-1, 1, -1], [-1, 1, 1], [1, 1, 2], [-2, -2, -1])] == [
        0, 0, 1, -2,
    ]  # fmt: skip
    assert (ag.round_mean([1, 2]), ag.round_mean([-1, -2]), ag.round_mean([0, 1, 1, 1])) == (
        2, -2, 1,
    )  # fmt: skip


def test_spread_filter_and_report():
    def row(raw, label=None):
        annotations = tuple(hs.PreferenceAnnotation(s) for s in raw)
        return hs.PreferenceRow(
            "train", "p", "a", "b", label, all_preferences_unprocessed=annotations
        )

    rows = [
        row([-3, 0, 3]),  # best range 6 > 2
        row([-1, 1, -1], label=0),  # tie, agrees
        row([2, 2, 3], label=1),  # recomputed 2, disagrees
        row([1, 1]),  # too few
        hs.PreferenceRow("val", "p", "a", "b", -1),  # no raw annotations
    ]
    out, report = ag.aggregate_preferences(rows)
    assert [r.preference_strength for r in out] == [0, 2, -1]
    assert dataclasses.asdict(report) == {
        "rows_in": 5, "kept": 3, "filtered_spread": 1, "too_few_annotations": 1,
        "no_raw_annotations": 1, "ties": 1, "compared": 2, "disagree_with_file": 1,
        "label_counts": {-1: 1, 0: 1, 2: 1},
    }  # fmt: skip
    assert ag.aggregate_preference([-3, 0, 3], max_spread=None) == 0
    with pytest.raises(ValueError, match="no label"):
        ag.aggregate_preferences([hs.PreferenceRow("val", "p", "a", "b", None)])


def test_card_ratings_from_disagreements(shared_data):
    d = shared_data / "helpsteer2_card_examples"
    dis, _ = hs.read_disagreements(d / "disagreements_example.jsonl")
    ratings, _ = hs.read_ratings(d / "train_example.jsonl")
    assert ag.aggregate_disagreements(dis) == ratings
    vectors = {(3, 3, 4): 3, (3, 4, 4): 4, (4, 3, 4): 4, (2, 2, 2): 2, (2, 1, 1): 1}
    assert {v: ag.aggregate_rating(v) for v in vectors} == vectors
    # 5 annotators: the closest three are used, an outlier ignored.
    assert ag.aggregate_rating([0, 4, 4, 3, 4]) == 4
