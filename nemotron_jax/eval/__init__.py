"""Evaluation of trained reward models: RewardBench scoring and aggregation."""

from nemotron_jax.eval.rewardbench import (
    EXAMPLE_COUNTS,
    ROWS_IN_FILTERED_SPLIT,
    SUBSET_MAPPING,
    encode_pairs,
    evaluate,
    format_report,
    load_reward_model,
    overall_score,
    read_scores,
    rewardbench_report,
    score_pairs,
    section_scores,
    write_scores,
)

__all__ = [
    "EXAMPLE_COUNTS",
    "ROWS_IN_FILTERED_SPLIT",
    "SUBSET_MAPPING",
    "encode_pairs",
    "evaluate",
    "format_report",
    "load_reward_model",
    "overall_score",
    "read_scores",
    "rewardbench_report",
    "score_pairs",
    "section_scores",
    "write_scores",
]
