"""Formatting: exact NeMo text, truncation that keeps the response whole, padding, pairs, sft."""

import random

import numpy as np
import pytest

from nemotron_jax.data import formatting as fm
from nemotron_jax.data import helpsteer2 as hs
from nemotron_jax.data.tokenizer import (
    NEMO_SYSTEM_PROMPT,
    SentencePieceTokenizer,
    encode_chat,
    format_llama3_chat,
    format_nemo_chat,
)
from nemotron_jax.errors import ConfigError, DataError

LONG_TURNS = (
    "first question " + "alpha beta gamma " * 10,
    "first answer " + "delta epsilon " * 10,
    "second question please",
)
MULTI_PROMPT = (
    "\n<extra_id_1>Assistant\n".join(LONG_TURNS[:2]) + "\n<extra_id_1>User\n" + LONG_TURNS[2]
)


@pytest.fixture(scope="module")
def tok():
    rng = random.Random(0)
    words = "alpha beta gamma delta epsilon first second question answer please final words".split()
    lines = [" ".join(rng.choices(words, k=10)) for _ in range(300)]
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "final"}]
    lines += [format_llama3_chat(chat), format_nemo_chat(chat)] * 20  # short template pieces
    return SentencePieceTokenizer.train(lines, vocab_size=1000)


def _rating(prompt: str, response: str, h: int = 3) -> hs.RatingRow:
    return hs.RatingRow(prompt, response, h, 2, 4, 1, 0)


def _encode(rows, tok, **kw):
    kw = {"kind": "regression", "template": "nemo", "max_len": 4096, **kw}
    return fm.encode_rows(rows, tokenizer=tok, **kw)


def test_nemo_rows_encode_exactly_as_their_text(shared_data, tok):
    rows, _ = hs.read_nemo_regression(
        shared_data / "helpsteer2_nemo_aligner_test_rm" / "test-rm.jsonl"
    )
    examples, report = _encode(rows, tok, max_len=8192, attributes="all")
    assert report.kept == 8 and report.skipped == 0
    for ex, row in zip(examples, rows, strict=True):
        assert ex["tokens"].tolist() == encode_chat(tok, row.text)
        assert ex["labels"].tolist() == list(row.label)
    examples, _ = _encode(rows, tok, max_len=8192, attributes="helpfulness")
    labels = np.stack([e["labels"] for e in examples])  # [8, 9]
    assert (labels[:, 4] == [r.label[4] for r in rows]).all()
    assert (np.delete(labels, 4, axis=1) == hs.IGNORE_LABEL).all()


def test_regression_example_is_padded_to_max_len(tok):
    (ex,), _ = _encode([_rating("hi", "final words")], tok, template="llama3", attributes="all")
    length = len(ex["tokens"])
    out = fm.pad_example(ex, max_len=128, pad_id=tok.pad_id)
    assert {k: (v.shape, v.dtype) for k, v in out.items()} == {
        "tokens": ((128,), np.int32),
        "attention_mask": ((128,), np.int32),
        "labels": ((9,), np.float32),
        "index": ((), np.int32),
    }
    assert out["attention_mask"].tolist() == [1] * length + [0] * (128 - length)
    assert (out["tokens"][length:] == tok.pad_id).all()
    assert out["labels"].tolist() == [-100] * 4 + [3, 2, 4, 1, 0]


def test_truncation_drops_turns_then_cuts_tokens_keeping_the_response(tok):
    row, response = _rating(MULTI_PROMPT, "final words " * 3), "final words " * 3
    single = encode_chat(tok, fm._Renderer("nemo", None).text(LONG_TURNS[2:], response))
    full = encode_chat(tok, fm._Renderer("nemo", None).text(LONG_TURNS, response))
    assert len(full) > len(single) + 20

    (ex,), report = _encode([row], tok, max_len=len(single))
    assert ex["tokens"].tolist() == single  # whole earliest turns dropped, nothing cut
    assert (report.truncated_turns, report.truncated_tokens, report.kept) == (1, 0, 1)

    (ex,), report = _encode([row], tok, max_len=len(single) - 3)
    assert (report.truncated_turns, report.truncated_tokens) == (1, 1)
    # The 3 earliest tokens of the last user turn go; template head and response stay whole.
    head = len(encode_chat(tok, f"<extra_id_0>System\n{NEMO_SYSTEM_PROMPT}\n<extra_id_1>User\n"))
    assert ex["tokens"].tolist() == single[:head] + single[head + 3 :]
    assert tok.decode(ex["tokens"]).endswith(
        f"please\n<extra_id_1>Assistant\n{response}\n<extra_id_2>"
    )
    tail = encode_chat(tok, "\n<extra_id_1>Assistant\n" + response + "\n<extra_id_2>")

    examples, report = _encode([row], tok, max_len=len(tail) + 3)
    assert examples == [] and report.skipped_response_too_long == 1 and report.kept == 0

    examples, report = _encode([row], tok, max_len=len(full) - 1, truncation="skip")
    assert examples == [] and report.skipped_too_long == 1
    (ex,), report = _encode([row], tok, max_len=len(full), truncation="skip")
    assert ex["tokens"].tolist() == full and report.truncated_turns == 0


def test_pairs_share_the_truncated_prompt(tok):
    def encode(prompt, max_len):
        row = hs.PreferenceRow("train", prompt, "final", "final words " * 4, -2)
        return fm.encode_rows(
            [row], kind="pairs", tokenizer=tok, template="llama3", max_len=max_len
        )

    (one_turn,), _ = encode(LONG_TURNS[2], 4096)
    lengths = [len(t) for t in one_turn["tokens"]]
    (ex,), report = encode(MULTI_PROMPT, lengths[1] - 2)
    assert (report.truncated_turns, report.truncated_tokens, report.kept) == (1, 1, 1)
    short, long = (t.tolist() for t in ex["tokens"])
    assert [len(short), len(long)] == [lengths[0] - 2, lengths[1] - 2]  # same cut on both sides
    prompt_len = len(short) - len(encode_chat(tok, "final<|eot_id|>"))
    assert short[:prompt_len] == long[:prompt_len]  # same context on both sides
    out = fm.pad_example(ex, max_len=lengths[1], pad_id=tok.pad_id)
    assert out["tokens"].shape == out["attention_mask"].shape == (2, lengths[1])
    assert out["tokens"].dtype == out["attention_mask"].dtype == np.int32
    assert out["strength"].shape == () and int(out["strength"]) == -2
    assert out["attention_mask"].sum(axis=1).tolist() == [len(short), len(long)]


def test_pair_dropped_when_one_side_cannot_fit(tok):
    rows = [
        hs.PreferenceRow("train", "hi", "final", "final words " * 30, 1),
        hs.PreferenceRow("val", "hi", "final", "words", 0),
    ]
    examples, report = fm.encode_rows(
        rows, kind="pairs", tokenizer=tok, template="nemo", max_len=80
    )
    assert [int(e["index"]) for e in examples] == [1] and int(examples[0]["strength"]) == 0
    assert (report.pairs_dropped, report.skipped_response_too_long, report.kept) == (1, 1, 1)
    examples, report = fm.encode_rows(
        rows, kind="pairs", tokenizer=tok, template="nemo", max_len=80, drop_ties=True
    )
    assert examples == [] and report.ties_dropped == 1 and report.pairs_dropped == 1


def test_sft_loss_mask_covers_response_and_end_of_turn(tok):
    rows = [
        _rating(MULTI_PROMPT, "final words"),
        hs.PreferenceRow("train", "hi", "alpha", "beta", 2),
        hs.PreferenceRow("train", "hi", "alpha", "beta", 0),
        hs.RewardBenchRow("hi", "gamma", "delta", "s", 7),
    ]
    examples, report = fm.encode_rows(
        rows, kind="sft", tokenizer=tok, template="llama3", max_len=256
    )
    assert report.ties_dropped == 1 and report.kept == 3
    responses = []
    for ex in examples:
        out = fm.pad_example(ex, max_len=256, pad_id=tok.pad_id)
        assert set(out) == {"tokens", "attention_mask", "loss_mask", "index"}
        assert (out["loss_mask"] <= out["attention_mask"]).all()
        responses.append(tok.decode(out["tokens"][out["loss_mask"] == 1]))
    assert responses == ["final words<|eot_id|>", "beta<|eot_id|>", "gamma<|eot_id|>"]


def test_rewardbench_row_is_a_chosen_first_pair(tok):
    (ex,), _ = fm.encode_rows(
        [hs.RewardBenchRow("hi", "good", "bad", "s", 3)],
        kind="pairs", tokenizer=tok, template="nemo", max_len=128,
    )  # fmt: skip
    assert int(ex["strength"]) == -1
    assert tok.decode(ex["tokens"][0]).endswith("good\n<extra_id_2>")


def test_bad_options_and_rows(tok):
    row = _rating("hi", "x")
    for kw, match in [
        ({"kind": "dpo"}, "kind"),
        ({"template": "chatml"}, "template"),
        ({"truncation": "cut"}, "truncation"),
        ({"attributes": "some"}, "attributes"),
        ({"max_len": 1}, "max_len"),
    ]:
        with pytest.raises(ConfigError, match=match):
            _encode([row], tok, **kw)
    with pytest.raises(DataError, match="aggregate_preferences"):
        _encode([hs.PreferenceRow("val", "p", "a", "b", None)], tok, kind="pairs")
    with pytest.raises(DataError, match="regression row 0: nemo chat must start with"):
        _encode([hs.NemoRegressionRow("plain", (0.0,) * 9)], tok)
    with pytest.raises(DataError, match="regression needs"):
        _encode([hs.RewardBenchRow("p", "a", "b", "s", 0)], tok)
