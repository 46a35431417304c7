"""Aggregating raw annotations into HelpSteer2 labels.

Both datasets keep the annotators who agree most, then round their mean:

- **Ratings** (`disagreements` → `train`/`validation`): each attribute's label is the mean of the
  3 annotators who agree most, rounded (dataset card, verified on its example row).
- **Preferences** (`all_preferences_unprocessed` → `preference_strength`): the 3-subset of raw
  strengths with the smallest range, `round(mean)`. When several 3-subsets share the smallest
  range, the one with the larger |mean| wins (the stronger preference). The rule depends only on
  the values, not on the annotators' order, and mirrors: negating every strength negates the
  label ([1, 2, 1, -1, 2] → 2 and [-1, -2, -1, 1, -2] → -2). It reproduces every released row
  checked (31 rows; one of them, [1, 2, 1, -1, 2], is a tie). Only windows with exactly opposite
  means, as in [-1, -1, 0, 1, 1], are left to a convention: the positive one. The rule is
  reconstructed from released rows, not read in the paper.
- **Spread filter** (unverified): a pair whose best 3-subset still has range > `max_spread`
  (default 2) is dropped. No source states it; it is consistent with every released row having
  a best range ≤ 2 and with 1,556 HelpSteer2 pairs being absent from the release. Pass
  `max_spread=None` to keep every pair.

The mean of three integers is never a half, so the rounding mode cannot matter there; elsewhere
(fewer than 3 ratings) halves round away from zero, a choice no source pins down.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterable, Sequence
from fractions import Fraction

from nemotron_jax.data.helpsteer2 import ATTRIBUTES, DisagreementRow, PreferenceRow, RatingRow
from nemotron_jax.errors import DataError


def closest_indices(values: Sequence[int], k: int = 3) -> tuple[int, ...]:
    """Indices of the `k` values with the smallest range, in ascending order of value.

    The smallest-range k-subset is always a window of the ascending sort; among equal ranges the
    window with the larger |sum| wins, then the positive one (see the module docstring). With
    `len(values) <= k`, all indices are returned.
    """
    order = sorted(range(len(values)), key=lambda i: values[i])  # stable: ties keep input order
    if len(order) <= k:
        return tuple(order)
    windows = [order[i : i + k] for i in range(len(order) - k + 1)]
    ranges = [values[w[-1]] - values[w[0]] for w in windows]
    sums = [sum(values[j] for j in w) for w in windows]
    best = min(
        (i for i, r in enumerate(ranges) if r == min(ranges)),
        key=lambda i: (-abs(sums[i]), -sums[i]),
    )
    return tuple(windows[best])


def closest_subset(values: Sequence[int], k: int = 3) -> tuple[int, ...]:
    """The `k` values with the smallest range, ascending (see `closest_indices`)."""
    return tuple(values[i] for i in closest_indices(values, k))


def round_mean(values: Sequence[int]) -> int:
    """Rounds the mean to the nearest integer, halves away from zero (exact arithmetic)."""
    mean = Fraction(sum(values), len(values))
    rounded = int(abs(mean) + Fraction(1, 2))  # floor(|x| + 1/2)
    return rounded if mean >= 0 else -rounded


def aggregate_rating(values: Sequence[int]) -> int:
    """One attribute's label from its per-annotator ratings (mean of the 3 closest, rounded)."""
    if not values:
        raise ValueError("no ratings to aggregate")
    return round_mean(closest_subset(values))


def aggregate_preference(strengths: Sequence[int], *, max_spread: int | None = 2) -> int | None:
    """A pair's `preference_strength` from its raw strengths, or None when filtered out.

    Args:
        strengths: 3 to 5 raw strengths in [-3, 3].
        max_spread: drop the pair when its closest 3 strengths still span more than this
            (unverified filter, see the module docstring); None keeps every pair.

    Returns:
        The label in [-3, 3] (0 = tie), or None for fewer than 3 strengths or a spread filtered
        out.
    """
    if len(strengths) < 3:
        return None
    subset = closest_subset(strengths)
    if max_spread is not None and subset[-1] - subset[0] > max_spread:
        return None
    return round_mean(subset)


@dataclasses.dataclass
class PreferenceAggregationReport:
    """Counts from `aggregate_preferences`.

    Attributes:
        rows_in: rows offered.
        kept: rows returned.
        filtered_spread: dropped by the spread filter.
        too_few_annotations: dropped for having 1-2 raw strengths.
        no_raw_annotations: kept with the file's label, nothing to recompute from.
        ties: kept rows whose label is 0.
        compared: kept rows that carry a file label and were recomputed.
        disagree_with_file: of those, labels that differ from the file's `preference_strength`.
        label_counts: label -> kept rows.
    """

    rows_in: int = 0
    kept: int = 0
    filtered_spread: int = 0
    too_few_annotations: int = 0
    no_raw_annotations: int = 0
    ties: int = 0
    compared: int = 0
    disagree_with_file: int = 0
    label_counts: dict[int, int] = dataclasses.field(default_factory=dict)


def aggregate_preferences(
    rows: Iterable[PreferenceRow], *, max_spread: int | None = 2
) -> tuple[list[PreferenceRow], PreferenceAggregationReport]:
    """Recomputes every row's label from `all_preferences_unprocessed`.

    Returns rows whose `preference_strength` is the recomputed label; rows with no raw
    annotations keep the file's label. Ties stay in (the loss decides what to do with them).

    Raises:
        DataError: a row has neither raw annotations nor a label.
    """
    report, out, labels = PreferenceAggregationReport(), [], Counter()
    for row in rows:
        report.rows_in += 1
        raw = row.raw_strengths
        if not raw:
            if row.preference_strength is None:
                raise DataError(f"preference row {report.rows_in - 1} has no label and no raw ones")
            report.no_raw_annotations += 1
            label = row.preference_strength
        elif len(raw) < 3:
            report.too_few_annotations += 1
            continue
        else:
            label = aggregate_preference(raw, max_spread=max_spread)
            if label is None:
                report.filtered_spread += 1
                continue
            if row.preference_strength is not None:
                report.compared += 1
                report.disagree_with_file += label != row.preference_strength
            row = dataclasses.replace(row, preference_strength=label)
        out.append(row)
        labels[label] += 1
        report.ties += label == 0
    report.kept = len(out)
    report.label_counts = dict(sorted(labels.items()))
    return out, report


def aggregate_disagreements(rows: Iterable[DisagreementRow]) -> list[RatingRow]:
    """Turns per-annotator ratings into `RatingRow`s with `aggregate_rating` per attribute."""
    return [
        RatingRow(
            row.prompt, row.response, **{a: aggregate_rating(getattr(row, a)) for a in ATTRIBUTES}
        )
        for row in rows
    ]
