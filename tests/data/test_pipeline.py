"""Grain pipeline: batch shapes, deterministic shuffling, resumable iterators, TFDS sources."""

import numpy as np
import pytest

from nemotron_jax.data import aggregation as ag
from nemotron_jax.data import helpsteer2 as hs
from nemotron_jax.data import pipeline as pl
from nemotron_jax.data import tfds_builders as tb
from nemotron_jax.errors import ConfigError, DataError

T = 96


@pytest.fixture(scope="module")
def ratings(synthetic_dir):
    return hs.read_ratings(synthetic_dir / "train.jsonl.gz")[0]


@pytest.fixture(scope="module")
def prefs(synthetic_dir):
    return hs.read_preferences(synthetic_dir / "preference" / "preference.jsonl.gz")[0]


@pytest.fixture(scope="module")
def encoded_pairs(prefs, synthetic_tokenizer):
    return pl.encode(prefs, kind="pairs", tokenizer=synthetic_tokenizer, template="nemo", max_len=T)


def _shapes(batch):
    return {k: (v.shape, v.dtype) for k, v in batch.items()}


def test_batch_shapes_for_every_kind(ratings, prefs, synthetic_tokenizer):
    common = dict(tokenizer=synthetic_tokenizer, template="llama3", max_len=T, batch_size=4, seed=0)
    reg = next(iter(pl.make_dataset(ratings, kind="regression", attributes="all", **common)))
    assert _shapes(reg) == {
        "tokens": ((4, T), np.int32),
        "attention_mask": ((4, T), np.int32),
        "labels": ((4, 9), np.float32),
        "index": ((4,), np.int32),
    }
    assert (reg["labels"][:, 4:] >= 0).all() and (reg["labels"][:, :4] == -100).all()
    pairs = next(iter(pl.make_dataset(prefs, kind="pairs", **common)))
    assert _shapes(pairs) == {
        "tokens": ((4, 2, T), np.int32),
        "attention_mask": ((4, 2, T), np.int32),
        "strength": ((4,), np.int32),
        "index": ((4,), np.int32),
    }
    expected = [prefs[i].preference_strength for i in pairs["index"]]
    assert pairs["strength"].tolist() == expected
    sft = next(iter(pl.make_dataset(ratings, kind="sft", **common)))
    assert sft["loss_mask"].shape == (4, T) and (sft["loss_mask"] <= sft["attention_mask"]).all()
    # Right padding: real tokens first, then pad_id.
    mask = reg["attention_mask"].astype(bool)
    assert (np.sort(mask, axis=1)[:, ::-1] == mask).all()
    assert (reg["tokens"][~mask] == synthetic_tokenizer.pad_id).all()


def test_shuffle_is_deterministic_per_seed(encoded_pairs):
    def first(seed, n=3):
        it = iter(pl.make_dataset(encoded_pairs, batch_size=8, seed=seed))
        return np.concatenate([next(it)["index"] for _ in range(n)])

    assert (first(1) == first(1)).all()
    assert not (first(1) == first(2)).all()
    unshuffled = pl.make_dataset(encoded_pairs, batch_size=8, seed=0, shuffle=False)
    assert next(iter(unshuffled))["index"].tolist() == list(range(8))


def test_iterator_state_resumes_exactly(encoded_pairs):
    ds = pl.make_dataset(encoded_pairs, batch_size=8, seed=3)
    it = iter(ds)
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(2)]
    resumed = iter(ds)
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        assert all((got[k] == want[k]).all() for k in want)


def test_epochs_cover_every_example_once(encoded_pairs):
    n = len(encoded_pairs)
    ds = pl.make_dataset(encoded_pairs, batch_size=16, seed=0, num_epochs=2, drop_remainder=False)
    seen = np.concatenate([b["index"] for b in ds])
    assert len(seen) == 2 * n
    every = np.sort([int(e["index"]) for e in encoded_pairs.examples])
    assert (np.sort(seen[:n]) == every).all() and (np.sort(seen[n:]) == every).all()
    assert not (seen[:n] == seen[n:]).all()  # reshuffled each epoch
    dropped = pl.make_dataset(encoded_pairs, batch_size=16, seed=0, num_epochs=1)
    assert sum(len(b["index"]) for b in dropped) == n // 16 * 16


def test_report_counts_truncation_and_skips(prefs, synthetic_tokenizer):
    enc = pl.encode(prefs, kind="pairs", tokenizer=synthetic_tokenizer, template="nemo", max_len=60)
    report = enc.report
    assert report.examples == len(prefs) and report.kept == len(enc)
    assert report.truncated_turns > 0  # multi-turn synthetic prompts do not fit in 60
    assert report.kept + report.pairs_dropped == report.examples
    skip = pl.encode(
        prefs, kind="pairs", tokenizer=synthetic_tokenizer, template="nemo", max_len=60,
        truncation="skip",
    )  # fmt: skip
    assert skip.report.skipped_too_long > 0 and skip.report.truncated_turns == 0
    assert len(skip) == len(prefs) - skip.report.skipped_too_long


def test_from_tfds_data_source(synthetic_dir, synthetic_tokenizer, tmp_path, prefs):
    sources = tb.data_sources("helpsteer2_preference", data_dir=tmp_path, source=synthetic_dir)
    splits = pl.preference_splits(prefs)
    assert {k: len(v) for k, v in splits.items()} == {k: len(v) for k, v in sources.items()}
    ds = pl.make_dataset(
        sources["validation"], kind="pairs", tokenizer=synthetic_tokenizer, template="llama3",
        max_len=T, batch_size=2, seed=0, num_epochs=1,
    )  # fmt: skip
    batch = next(iter(ds))
    assert batch["tokens"].shape == (2, 2, T)
    val = splits["validation"]
    assert batch["strength"].tolist() == [val[i].preference_strength for i in batch["index"]]


def test_preference_splits(shared_data):
    rows, _ = hs.read_preferences(
        shared_data / "helpsteer2_preference_val18" / "preference_val18.jsonl"
    )
    rows, _ = ag.aggregate_preferences(rows)
    assert {k: len(v) for k, v in pl.preference_splits(rows).items()} == {
        "train": 0, "validation": 18,
    }  # fmt: skip


def test_make_dataset_errors(prefs, encoded_pairs, synthetic_tokenizer):
    with pytest.raises(ConfigError, match="EncodedDataset fixes"):
        pl.make_dataset(encoded_pairs, kind="sft", batch_size=2, seed=0)
    with pytest.raises(ConfigError, match="required"):
        pl.make_dataset(prefs, batch_size=2, seed=0)
    with pytest.raises(ConfigError, match="num_epochs"):
        pl.make_dataset(encoded_pairs, batch_size=2, seed=0, num_epochs=0)
    with pytest.raises(DataError, match="no examples left"):
        pl.make_dataset(
            prefs, kind="pairs", tokenizer=synthetic_tokenizer, template="nemo", max_len=8,
            batch_size=2, seed=0,
        )  # fmt: skip
