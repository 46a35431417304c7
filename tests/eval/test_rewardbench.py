"""RewardBench scoring: the official constants and test vectors, the strict-win rule, partial
sections, the --scores tool, and a trained tiny model scored on real LLMBar (Chat Hard) rows."""

import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from experiments.configs import rm_bt
from nemotron_jax import checkpoint
from nemotron_jax.data.helpsteer2 import PreferenceRow, read_rewardbench
from nemotron_jax.data.pipeline import encode
from nemotron_jax.errors import CheckpointError, ConfigError, DataError
from nemotron_jax.eval import rewardbench as rb
from nemotron_jax.experiment import run_experiment
from nemotron_jax.models.reward import RewardModel
from tests import tolerances
from tests.conftest import REPO

CHAT_HARD_LLMBAR = [s for s in rb.SUBSET_MAPPING["Chat Hard"] if s.startswith("llmbar")]


@pytest.fixture(scope="module")
def meta(shared_data):
    return json.loads((shared_data / "rewardbench_meta" / "rewardbench_scoring.json").read_text())


def test_constants_equal_the_shared_file(meta):
    assert rb.EXAMPLE_COUNTS == meta["EXAMPLE_COUNTS"]
    assert rb.SUBSET_MAPPING == meta["SUBSET_MAPPING"]  # lists: order (summation order) too
    assert list(rb.SUBSET_MAPPING) == list(meta["SUBSET_MAPPING"])
    assert rb.ROWS_IN_FILTERED_SPLIT == meta["rows_in_filtered_split"]
    assert sum(rb.ROWS_IN_FILTERED_SPLIT.values()) == meta["rows_in_filtered_split_total"] == 2985
    assert rb.EXAMPLE_COUNTS["math-prm"] == 984 and rb.ROWS_IN_FILTERED_SPLIT["math-prm"] == 447


def test_beaver_section_scores_exact(meta):
    vector = meta["test_vector_sections"]
    got = rb.section_scores(vector["input_metrics"])
    want = vector["expected_sections_computed_with_calculate_scores_per_section"]
    assert {k: v["score"] for k, v in got.items()} == want  # bit-exact, reward-bench's order
    assert not any(v["partial"] for v in got.values())


def test_beaver_through_per_row_scores(meta):
    """Rows rebuilt with the filtered split's sizes reproduce the same sections from scores."""
    subsets, chosen, rejected = [], [], []
    for name, acc in meta["test_vector_sections"]["input_metrics"].items():
        n = rb.ROWS_IN_FILTERED_SPLIT[name]
        k = round(acc * n)
        assert k / n == pytest.approx(acc, abs=1e-12)
        subsets += [name] * n
        chosen += [1.0] * k + [0.0] * (n - k)
        rejected += [0.5] * n
    report = rb.rewardbench_report(subsets, chosen, rejected)
    want = meta["test_vector_sections"][
        "expected_sections_computed_with_calculate_scores_per_section"
    ]
    for section, score in want.items():
        assert report["sections"][section]["score"] == pytest.approx(score, abs=1e-12)
        assert not report["sections"][section]["partial"]
    assert not report["overall"]["partial"] and report["absent_sections"] == []
    assert report["overall"]["score"] == pytest.approx(sum(want.values()) / 4, abs=1e-12)
    # math-prm weighs 984 in Reasoning although it has 447 rows.
    assert report["sections"]["Reasoning"]["weight"] == 984 * 2


def test_nemotron_sections_average_to_published_overall(meta):
    vector = meta["test_vector_overall"]
    assert round(rb.overall_score(vector["sections"]), 1) == vector["overall_published"] == 94.1


def test_ties_and_unscored_rows_count_wrong():
    subsets = ["llmbar-natural"] * 4
    report = rb.rewardbench_report(subsets, [1.0, 1.0, math.nan, 2.0], [1.0, 0.0, 0.0, 3.0])
    s = report["subsets"]["llmbar-natural"]
    assert (s["n"], s["correct"], s["ties"], s["unscored"]) == (4, 1, 1, 1)
    assert s["accuracy"] == 0.25


def test_partial_sections_and_other_subsets_are_flagged():
    full = {name: rb.ROWS_IN_FILTERED_SPLIT[name] for name in CHAT_HARD_LLMBAR}
    subsets = [name for name, n in full.items() for _ in range(n)] + ["synthetic-easy"] * 3
    chosen = np.ones(len(subsets))
    report = rb.rewardbench_report(subsets, chosen, np.zeros(len(subsets)))
    chat_hard = report["sections"]["Chat Hard"]
    assert chat_hard["partial"] and chat_hard["missing"] == ["mt-bench-hard"]
    assert chat_hard["incomplete"] == [] and chat_hard["score"] == 1.0
    assert set(report["sections"]) == {"Chat Hard"}
    assert report["absent_sections"] == ["Chat", "Safety", "Reasoning"]
    assert report["overall"]["partial"] and report["overall"]["sections"] == ["Chat Hard"]
    # Non-RewardBench subsets are reported on their own, never folded into a section.
    assert report["subsets"]["synthetic-easy"]["section"] == "other"
    assert report["other"] == {"subsets": ["synthetic-easy"], "n": 3, "correct": 3, "accuracy": 1.0}
    text = rb.format_report(report)
    assert "PARTIAL: missing mt-bench-hard" in text and "ABSENT" in text
    assert "Overall" in text and "other (not RewardBench)" in text


def run_tool(*args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    return subprocess.run(
        [sys.executable, str(REPO / "tools" / "eval_rewardbench.py"), *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_scores_cli_aggregates_and_rejects_a_bad_line(tmp_path):
    rows = [
        {"subset": "llmbar-natural", "score_chosen": 1.0, "score_rejected": 0.0, "id": 0},
        {"subset": "llmbar-natural", "score_chosen": 0.0, "score_rejected": 0.0},
        {"subset": "synthetic-hard", "score_chosen": None, "score_rejected": 0.5},
    ]
    good = tmp_path / "scores.jsonl"
    good.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = run_tool("--scores", good, "--out", tmp_path / "report.json")
    assert r.returncode == 0, r.stderr
    assert "Chat Hard" in r.stdout and "PARTIAL" in r.stdout and "Overall" in r.stdout
    report = json.loads((tmp_path / "report.json").read_text())["report"]
    assert report["subsets"]["llmbar-natural"]["accuracy"] == 0.5  # the tie is wrong
    assert report["subsets"]["synthetic-hard"]["unscored"] == 1

    bad = tmp_path / "bad.jsonl"
    lines = [json.dumps(rows[0]), json.dumps(rows[1]), '{"subset": "x", "score_chosen": "high"']
    bad.write_text("\n".join(lines) + "\n")
    r = run_tool("--scores", bad)
    assert r.returncode == 2
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    assert str(bad) in err and "line 3" in err

    bad.write_text(json.dumps({"subset": "x", "score_chosen": "high", "score_rejected": 0}) + "\n")
    r = run_tool("--scores", bad)
    assert r.returncode == 2 and "line 1" in r.stderr and "score_chosen" in r.stderr


# --- a trained tiny model on real Chat Hard rows ---------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    config = rm_bt.get_config("smoke")
    config.progress = False
    workdir = tmp_path_factory.mktemp("rm_bt")
    run_experiment(config, str(workdir))
    return workdir / "params"


@pytest.fixture(scope="module")
def llmbar_rows(shared_data):
    rows, _ = read_rewardbench(shared_data / "llmbar" / "rewardbench_format.jsonl")
    assert len(rows) == 419
    return rows[::10][:40]  # 40 rows spread over all five llmbar subsets


def test_model_scores_match_unsharded_apply(trained, llmbar_rows):
    bundle = rb.load_reward_model(trained)
    assert bundle.template == "nemo" and bundle.num_attributes == 9
    assert len(jax.devices()) == 8
    assert "fsdp" in bundle.params["layers"]["mlp"]["up_proj"].sharding.spec
    max_len = 512  # the checkpoint's 64 would leave most LLMBar responses unscored
    chosen, rejected, fmt = rb.score_pairs(
        bundle, llmbar_rows, batch_size=8, max_len=max_len, progress=False
    )
    assert chosen.shape == rejected.shape == (40,)

    encoded = encode(
        llmbar_rows, kind="pairs", tokenizer=bundle.tokenizer, template="nemo", max_len=max_len
    )
    assert fmt == encoded.report and fmt.kept % 8 != 0  # a padded last batch was exercised
    assert 0 < fmt.skipped < 40
    examples = [encoded[i] for i in range(len(encoded))]
    tokens = np.stack([e["tokens"] for e in examples])  # [K, 2, T]
    mask = np.stack([e["attention_mask"] for e in examples])
    index = np.array([e["index"] for e in examples])
    params = jax.device_get(bundle.params)  # host numpy: the reference runs on one device
    model = RewardModel(bundle.config, 9)
    out = jax.jit(model.apply)({"params": params}, tokens, attention_mask=mask)
    want = np.asarray(out)[..., 4]  # [K, 2]: row 0 chosen, row 1 rejected
    np.testing.assert_allclose(chosen[index], want[:, 0], atol=tolerances.SHARDED_F32, rtol=0)
    np.testing.assert_allclose(rejected[index], want[:, 1], atol=tolerances.SHARDED_F32, rtol=0)
    # Rows too long even after truncation are NaN (scored wrong), never dropped.
    unscored = np.setdiff1d(np.arange(40), index)
    assert len(unscored) == fmt.skipped and np.isnan(chosen[unscored]).all()

    # Preference rows put the winner by strength sign: > 0 means response_2 (here the chosen).
    swapped = [PreferenceRow("val", r.prompt, r.rejected, r.chosen, 2) for r in llmbar_rows[:8]]
    pref_chosen, pref_rejected, _ = rb.score_pairs(bundle, swapped, max_len=max_len, progress=False)
    np.testing.assert_allclose(pref_chosen, chosen[:8], atol=tolerances.SHARDED_F32, rtol=0)
    np.testing.assert_allclose(pref_rejected, rejected[:8], atol=tolerances.SHARDED_F32, rtol=0)
    with pytest.raises(DataError, match="no chosen response"):
        rb.score_pairs(bundle, [PreferenceRow("val", "q", "a", "b", 0)], progress=False)
    with pytest.raises(ConfigError, match="slot 9"):
        rb.score_pairs(bundle, llmbar_rows[:1], slot=9, progress=False)

    report = rb.rewardbench_report([r.subset for r in llmbar_rows], chosen, rejected)
    assert list(report["subsets"]) == CHAT_HARD_LLMBAR
    assert sum(s["n"] for s in report["subsets"].values()) == 40  # the denominator keeps all
    assert report["unscored"] == fmt.skipped
    chat_hard = report["sections"]["Chat Hard"]
    assert chat_hard["partial"] and chat_hard["missing"] == ["mt-bench-hard"]
    assert chat_hard["incomplete"] == CHAT_HARD_LLMBAR  # 40 of their 419 rows
    assert report["overall"]["partial"]
    correct = np.sum(chosen > rejected)
    assert report["overall"]["score"] == pytest.approx(
        sum(
            report["subsets"][s]["correct"] / report["subsets"][s]["n"] * rb.EXAMPLE_COUNTS[s]
            for s in CHAT_HARD_LLMBAR
        )
        / chat_hard["weight"]
    )
    print(f"tiny model on 40 LLMBar rows: {correct}/40 correct ({fmt.skipped} unscored)")
    print(rb.format_report(report))


def test_eval_tool_end_to_end_and_scores_roundtrip(trained, llmbar_rows, tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text(
        "".join(
            json.dumps(
                {
                    "prompt": r.prompt,
                    "chosen": r.chosen,
                    "rejected": r.rejected,
                    "subset": r.subset,
                    "id": r.id,
                }
            )
            + "\n"
            for r in llmbar_rows[:10]
        )
    )
    args = ["--ckpt", trained, "--data", data, "--max-len", 256, "--no-progress"]
    r = run_tool(*args, "--out", tmp_path / "a.json", "--save-scores", tmp_path / "s.jsonl")
    assert r.returncode == 0, r.stderr
    assert "Chat Hard" in r.stdout and "PARTIAL" in r.stdout
    r2 = run_tool("--scores", tmp_path / "s.jsonl", "--out", tmp_path / "b.json")
    assert r2.returncode == 0, r2.stderr
    a = json.loads((tmp_path / "a.json").read_text())
    b = json.loads((tmp_path / "b.json").read_text())
    assert a["report"] == b["report"] and a["encoding"]["examples"] == 10


def test_not_a_reward_model_is_a_clear_error(tmp_path):
    checkpoint.save_params(
        tmp_path / "lm", {"norm": {"scale": np.ones(4, np.float32)}}, metadata={"kind": "causal_lm"}
    )
    with pytest.raises(CheckpointError, match="not a reward model"):
        rb.load_reward_model(tmp_path / "lm")
