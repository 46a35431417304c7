"""Synthetic HelpSteer2: deterministic, parseable by the readers, and learnable."""

import json

import numpy as np
import pytest
import sentencepiece as spm

from nemotron_jax.data import aggregation as ag
from nemotron_jax.data import formatting as fm
from nemotron_jax.data import helpsteer2 as hs
from nemotron_jax.data import synthetic
from nemotron_jax.data.tokenizer import encode_chat

FILES = [
    "train.jsonl.gz",
    "validation.jsonl.gz",
    "disagreements/disagreements.jsonl.gz",
    "preference/preference.jsonl.gz",
    "rewardbench/filtered.jsonl",
    "tokenizer.model",
    "truth.json",
]


def test_same_seed_same_bytes(tmp_path):
    a, b, c = (tmp_path / n for n in "abc")
    synthetic.generate(a, num_prompts=40, seed=5, num_rewardbench=5)
    synthetic.generate(b, num_prompts=40, seed=5, num_rewardbench=5)
    synthetic.generate(c, num_prompts=40, seed=6, num_rewardbench=5)
    for name in FILES:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "train.jsonl.gz").read_bytes() != (c / "train.jsonl.gz").read_bytes()


def test_files_parse_and_agree_with_each_other(synthetic_dir):
    truth = json.loads((synthetic_dir / "truth.json").read_text())
    counts = truth["summary"]["rows"]
    train, _ = hs.read_ratings(synthetic_dir / "train.jsonl.gz")
    val, _ = hs.read_ratings(synthetic_dir / "validation.jsonl.gz")
    dis, _ = hs.read_disagreements(synthetic_dir / "disagreements" / "disagreements.jsonl.gz")
    prefs, report = hs.read_preferences(synthetic_dir / "preference" / "preference.jsonl.gz")
    assert (len(train), len(val)) == (counts["train"], counts["validation"]) == (540, 60)
    assert report.rows_read == report.rows_kept == len(prefs) and not report.skipped
    # Adjacent rating rows share a prompt; the ratings are the aggregated disagreements.
    assert all(train[i].prompt == train[i + 1].prompt for i in range(0, len(train), 2))
    assert ag.aggregate_disagreements(dis) == train + val
    assert {len(r.helpfulness) for r in dis} <= {3, 5}
    # Preference pairs are the two responses of one prompt, train rows first.
    splits = [r.split for r in prefs]
    assert splits == sorted(splits, key=lambda s: s != "train") and set(splits) == {"train", "val"}
    assert splits.count("train") == counts["preference_train"]
    responses = {(r.prompt, r.response) for r in train + val}
    assert all({(p.prompt, p.response_1), (p.prompt, p.response_2)} <= responses for p in prefs)
    assert (
        sum(counts[k] for k in ("preference_train", "preference_val", "preference_filtered_spread"))
        == 300
    )
    # Latent helpfulness in truth.json is the documented function of the word counts.
    for p, t in zip(prefs, truth["preference"], strict=True):
        f = synthetic.feature_counts(p.prompt, p.response_1)
        assert t["helpfulness_1"] == pytest.approx(
            1.5 + 0.6 * f["n_on"] - 0.6 * f["n_off"] - 1.2 * f["n_bad"]
        )


def test_aggregation_report_is_sane(synthetic_dir):
    prefs, _ = hs.read_preferences(synthetic_dir / "preference" / "preference.jsonl.gz")
    _, report = ag.aggregate_preferences(prefs)
    assert report.kept == report.compared == len(prefs)
    assert report.disagree_with_file == report.filtered_spread == 0
    assert 0.05 < report.ties / report.kept < 0.35
    assert set(report.label_counts) == set(range(-3, 4))
    assert {len(p.raw_strengths) for p in prefs} == {3, 4, 5}
    assert all(a.strength != 0 for p in prefs for a in p.all_preferences_unprocessed)
    # A slight position bias towards response 2, as in the real data: where the two responses
    # are equally helpful, annotators lean to response 2 (expected mean sign about 0.2).
    truth = json.loads((synthetic_dir / "truth.json").read_text())["preference"]
    equal = [
        s
        for p, t in zip(prefs, truth, strict=True)
        if abs(t["helpfulness_1"] - t["helpfulness_2"]) < 1e-9
        for s in p.raw_strengths
    ]
    assert len(equal) > 50 and np.mean(np.sign(equal)) > 0.1


def test_tokenizer_matches_tiny_preset_and_keeps_sequences_short(
    synthetic_dir, synthetic_tokenizer
):
    tok = synthetic_tokenizer
    assert tok.vocab_size <= 1024 and (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 2, 3)
    sp = spm.SentencePieceProcessor(model_file=str(synthetic_dir / "tokenizer.model"))
    assert sp.unk_id() == 1 and sp.get_piece_size() == tok.vocab_size
    for marker in synthetic.MARKERS:
        assert len(encode_chat(tok, marker)) <= 2  # a dummy-prefix piece at most, then one id
    rows, _ = hs.read_ratings(synthetic_dir / "train.jsonl.gz")
    for template in ("llama3", "nemo"):
        examples, report = fm.encode_rows(
            rows, kind="regression", tokenizer=tok, template=template, max_len=128
        )
        assert report.kept == len(rows) and report.truncated_turns == 0
        assert max(len(e["tokens"]) for e in examples) <= 96


def test_feature_count_baseline_beats_chance(synthetic_dir):
    prefs, _ = hs.read_preferences(synthetic_dir / "preference" / "preference.jsonl.gz")

    def accuracy(score):
        hits = [
            np.sign(score(p.prompt, p.response_2) - score(p.prompt, p.response_1) + 1e-9)
            == np.sign(p.preference_strength)
            for p in prefs
            if p.preference_strength != 0
        ]
        return float(np.mean(hits))

    def count(prompt, response):
        f = synthetic.feature_counts(prompt, response)
        return f["n_on"] - f["n_off"] - f["n_bad"]

    assert accuracy(count) > 0.85
    # Most on-topic words echo the prompt's last user turn (ECHO_FRACTION of them).
    feats = [synthetic.feature_counts(p.prompt, p.response_1) for p in prefs]
    echo = sum(f["n_echo"] for f in feats) / sum(f["n_on"] for f in feats)
    assert 0.6 < echo < 0.9
    assert accuracy(lambda p, r: len(r.split())) < 0.75  # length alone is not enough


def test_rewardbench_file(synthetic_dir):
    rows, _ = hs.read_rewardbench(synthetic_dir / "rewardbench" / "filtered.jsonl")
    truth = json.loads((synthetic_dir / "truth.json").read_text())["rewardbench"]
    assert len(rows) == 40 and [r.id for r in rows] == list(range(40))
    assert {r.subset for r in rows} <= {"synthetic-easy", "synthetic-hard"}
    assert all(t["chosen"]["helpfulness"] - t["rejected"]["helpfulness"] >= 1.0 for t in truth)
    train, _ = hs.read_ratings(synthetic_dir / "train.jsonl.gz")
    assert not {r.prompt for r in rows} & {r.prompt for r in train}  # held-out prompts
