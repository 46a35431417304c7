"""A synthetic HelpSteer2: the official files and schemas, generated from a known ground truth.

`generate(out_dir)` writes, like the `nvidia/HelpSteer2` repository, `train.jsonl.gz`,
`validation.jsonl.gz`, `disagreements/disagreements.jsonl.gz` and
`preference/preference.jsonl.gz`, plus `rewardbench/filtered.jsonl` (held-out prompts in
RewardBench format), `tokenizer.model` (SentencePiece, pad 0, unk 1, bos 2, eos 3, at most 1,024
ids, matching the `tiny` model preset) and `truth.json` (the latent scores of every row).

Generative process (one numpy Generator seeded with `seed`):

1. **Prompt.** An instruction and 2-4 distinct words of one topic t (8 topics of 10 words):
   "explain reef tide shell". With probability `multi_turn_fraction` an earlier exchange on
   another topic comes first, joined with HelpSteer2's `<extra_id_1>` markers; only the last user
   turn sets t.
2. **Response.** n_on ~ U{0..6} words of topic t (each, with probability 0.7, one of the words
   the last user turn asked about, else any word of t), n_off ~ U{0..3} words of other topics,
   n_bad error words (0/1/2 w.p. .6/.3/.1) and 1-4 fillers, shuffled: 1-15 words.
3. **Latent attributes** (floats, stored in `truth.json`):
   helpfulness = 1.5 + 0.6 n_on - 0.6 n_off - 1.2 n_bad;
   correctness = 2 + 0.4 n_on - 1.5 n_bad; coherence = 3.6 - 0.5 n_off - 0.4 n_bad;
   complexity = 0.5 + 0.35 n_on + 0.1 n_words; verbosity = 0.25 n_words.
4. **Ratings.** 3 annotators rate latent + N(0, 0.5²) (a careless one, p = 0.1, N(0, 1.5²)),
   rounded and clipped to 0-4; 2 more join when the 3 helpfulness ratings span more than 2 (the
   card's rule). `disagreements` holds the lists; the rating files hold
   `aggregation.aggregate_rating` of them.
5. **Preferences.** 3, 4 or 5 annotators (p = .75/.05/.2) each see d = 0.8 (h_2 - h_1) + 0.2 +
   N(0, 0.8²), h the latent helpfulness; the +0.2 is a slight position bias towards response 2,
   as in the real data. Each picks round(d) clipped to ±3, never 0 (a forced choice, as the raw
   release looks). The label is `aggregation.aggregate_preference` of the raw strengths, and a
   pair it filters out (spread > 2) is left out of the file, as the release appears to do.
6. **Splits.** A `val_fraction` of prompts is validation (`"val"` in the preference file, whose
   train rows come first, as in the release).
7. **RewardBench file.** Single-turn prompts not used above, each with two responses whose
   latent helpfulness differs by at least 1; subset "synthetic-easy" when it differs by 2.5 or
   more, else "synthetic-hard".

`truth.json` holds, row for row, `ratings.{train,validation}` (topic, the five latent floats and
the word counts), `preference` (`helpfulness_1`, `helpfulness_2`), `rewardbench` (latents of
`chosen` and `rejected`) and the `summary` that `generate` returns.

A reward model must find the last user turn's topic and count on-topic, off-topic and error words
in the response; sequences stay under about 85 tokens with either template. `feature_counts`
recovers (n_on, n_off, n_bad) from text for baselines. Measured on `generate()` (1,500 prompts,
seed 0, 1,180 non-tie pairs): the count baseline n_on - n_off - n_bad orders 93% of them as
labelled (the latent helpfulness itself 96%), length alone 61%, error words alone 66%. The `tiny`
Llama preset (2 layers, hidden 64, 158k parameters with a scalar head on the last token) trained
with Scaled BT (AdamW 3e-4, weight decay 0.1, batches of 32 pairs, llama3 template, T = 96)
reached 81-83% on the validation pairs and 87-89% on the RewardBench file within 1-2 minutes on 2
CPU cores (84% and 90% with 3,000 prompts); without the echoes of step 2 it reached only 73-76%
and 76-78%.
"""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import sentencepiece as spm

from nemotron_jax.data.aggregation import aggregate_preference, aggregate_rating, closest_indices
from nemotron_jax.data.helpsteer2 import ATTRIBUTES
from nemotron_jax.data.tokenizer import (
    NEMO_SYSTEM_PROMPT,
    SentencePieceTokenizer,
    format_llama3_chat,
    format_nemo_chat,
    split_helpsteer2_prompt,
)

TOPICS = {
    "ocean": "wave tide reef coral shell salt fish whale kelp shore",
    "space": "star orbit comet moon planet rocket galaxy nebula meteor asteroid",
    "garden": "seed soil bloom rose tulip weed root leaf compost sprout",
    "music": "melody rhythm chord tempo drum guitar piano lyric note harmony",
    "cooking": "recipe oven spice flour butter simmer roast sauce knead garlic",
    "sports": "goal team coach score pitch sprint league match trophy referee",
    "history": "empire treaty dynasty castle knight battle archive ruin throne relic",
    "weather": "rain storm cloud thunder breeze frost humid drizzle forecast sunny",
}
TOPIC_WORDS = {t: tuple(w.split()) for t, w in TOPICS.items()}
BAD_WORDS = ("wrong", "false", "broken", "nonsense", "confused", "error", "mistake", "invalid")
FILLER = ("the", "a", "and", "of", "with", "very", "also", "some", "more", "this", "that", "for")
ECHO_FRACTION = 0.7
INSTRUCTIONS = ("explain", "describe", "tell me about", "write about", "summarize", "list")
MARKERS = (
    "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
    "<extra_id_0>", "<extra_id_1>", "<extra_id_2>",
)  # fmt: skip
_WORD_TOPIC = {w: t for t, ws in TOPIC_WORDS.items() for w in ws}
_ASSISTANT, _USER = "\n<extra_id_1>Assistant\n", "\n<extra_id_1>User\n"
# SentencePieceTokenizer.train's ids and lossless settings, plus the markers as single pieces.
_SPM_ARGS = dict(
    model_type="bpe", pad_id=0, unk_id=1, bos_id=2, eos_id=3, minloglevel=2,
    hard_vocab_limit=False, character_coverage=1.0, byte_fallback=True,
    normalization_rule_name="identity", remove_extra_whitespaces=False, num_threads=1,
    user_defined_symbols=list(MARKERS),
)  # fmt: skip


def _response(
    rng: np.random.Generator, topic: str, asked: list[str], n_on: int | None = None
) -> dict[str, Any]:
    n_on = int(rng.integers(0, 7)) if n_on is None else n_on
    n_off, n_fill = int(rng.integers(0, 4)), int(rng.integers(1, 5))
    n_bad = int(rng.choice(3, p=[0.6, 0.3, 0.1]))
    others = [w for t, ws in TOPIC_WORDS.items() if t != topic for w in ws]
    # Echoes of the prompt's own words make "on topic" easy for attention to detect.
    on = [
        rng.choice(asked) if rng.random() < ECHO_FRACTION else rng.choice(TOPIC_WORDS[topic])
        for _ in range(n_on)
    ]
    words = [
        *on,
        *rng.choice(others, n_off),
        *rng.choice(BAD_WORDS, n_bad),
        *rng.choice(FILLER, n_fill),
    ]
    words = [str(w) for w in rng.permutation(words)]
    n = len(words)
    latent = {
        "helpfulness": 1.5 + 0.6 * n_on - 0.6 * n_off - 1.2 * n_bad,
        "correctness": 2.0 + 0.4 * n_on - 1.5 * n_bad,
        "coherence": 3.6 - 0.5 * n_off - 0.4 * n_bad,
        "complexity": 0.5 + 0.35 * n_on + 0.1 * n,
        "verbosity": 0.25 * n,
    }
    features = {"n_on": n_on, "n_off": n_off, "n_bad": n_bad, "n_words": n}
    return {"text": " ".join(words), "latent": latent, "features": features}


def _user_turn(rng: np.random.Generator, topic: str) -> tuple[str, list[str]]:
    words = [str(w) for w in rng.choice(TOPIC_WORDS[topic], int(rng.integers(2, 5)), replace=False)]
    return " ".join([str(rng.choice(INSTRUCTIONS)), *words]), words


def _prompt(rng: np.random.Generator, multi_turn_fraction: float) -> tuple[str, str, list[str]]:
    topics = list(TOPICS)
    topic = str(rng.choice(topics))
    prompt, asked = _user_turn(rng, topic)
    if rng.random() < multi_turn_fraction:
        earlier = str(rng.choice([t for t in topics if t != topic]))
        first, first_asked = _user_turn(rng, earlier)
        answer = _response(rng, earlier, first_asked, n_on=int(rng.integers(2, 5)))["text"]
        prompt = first + _ASSISTANT + answer + _USER + prompt
    return prompt, topic, asked


def _rate(rng: np.random.Generator, latent: dict[str, float]) -> dict[str, list[int]]:
    def one(n: int) -> list[dict[str, int]]:
        out = []
        for _ in range(n):
            sigma = 1.5 if rng.random() < 0.1 else 0.5
            out.append(
                {
                    a: int(np.clip(np.rint(latent[a] + rng.normal(0, sigma)), 0, 4))
                    for a in ATTRIBUTES
                }
            )
        return out

    annotators = one(3)
    helpful = [a["helpfulness"] for a in annotators]
    if max(helpful) - min(helpful) > 2:
        annotators += one(2)
    return {a: [x[a] for x in annotators] for a in ATTRIBUTES}


def _justification(strength: int) -> tuple[str, str]:
    better, worse = (1, 2) if strength < 0 else (2, 1)
    degree = {1: "slightly better", 2: "better", 3: "much better"}[abs(strength)]
    statement = f"@Response {better} is {degree} than @Response {worse}."
    return statement, f"It stays closer to the topic and has fewer errors than @Response {worse}."


def _annotate(rng: np.random.Generator, h1: float, h2: float) -> list[int]:
    n = int(rng.choice([3, 4, 5], p=[0.75, 0.05, 0.2]))
    strengths = []
    for _ in range(n):
        d = 0.8 * (h2 - h1) + 0.2 + rng.normal(0, 0.8)
        s = int(np.clip(np.rint(d), -3, 3))
        strengths.append(s if s != 0 else (1 if d >= 0 else -1))
    return strengths


def _preference_row(split: str, prompt: str, r1: str, r2: str, raw: list[int], label: int) -> dict:
    texts = [_justification(s) for s in raw]
    similar = [
        {"statement": texts[i][0], "elaboration": texts[i][1], "strength": raw[i]}
        for i in closest_indices(raw)
    ]
    # As observed in the release: the row's statement is that of the first similar annotation
    # whose strength equals the label, and empty when none does.
    match = next((s for s in similar if s["strength"] == label), None)
    return {
        "split": split,
        "prompt": prompt,
        "response_1": r1,
        "response_2": r2,
        "preference_strength": label,
        "preference_statement": match["statement"] if match else "",
        "preference_elaboration": match["elaboration"] if match else "",
        "three_most_similar_preferences": similar,
        "all_preferences_unprocessed": [
            {"strength": s, "justification": " ".join(t)} for s, t in zip(raw, texts, strict=True)
        ],
    }


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
    if path.suffix == ".gz":
        # mtime=0 and no file name keep the bytes a function of the seed alone.
        with open(path, "wb") as raw, gzip.GzipFile("", "wb", fileobj=raw, mtime=0) as f:
            f.write(data)
    else:
        path.write_bytes(data)


def _train_tokenizer(lines: list[str], vocab_size: int) -> SentencePieceTokenizer:
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size, **_SPM_ARGS
    )
    return SentencePieceTokenizer(model.getvalue())


def _rewardbench(rng: np.random.Generator, n: int, seen: set[str]) -> tuple[list[dict], list[dict]]:
    rows, truth = [], []
    while len(rows) < n:
        prompt, topic, asked = _prompt(rng, multi_turn_fraction=0.0)
        a, b = _response(rng, topic, asked), _response(rng, topic, asked)
        margin = a["latent"]["helpfulness"] - b["latent"]["helpfulness"]
        if abs(margin) < 1.0 or prompt in seen:  # held out: no prompt of the rating files
            continue
        chosen, rejected = (a, b) if margin > 0 else (b, a)
        subset = "synthetic-easy" if abs(margin) >= 2.5 else "synthetic-hard"
        row = {"prompt": prompt, "chosen": chosen["text"], "rejected": rejected["text"]}
        rows.append({**row, "subset": subset, "id": len(rows)})
        truth.append({"chosen": chosen["latent"], "rejected": rejected["latent"]})
    return rows, truth


def generate(
    out_dir: str | Path,
    *,
    num_prompts: int = 1500,
    seed: int = 0,
    val_fraction: float = 0.1,
    multi_turn_fraction: float = 0.25,
    num_rewardbench: int = 200,
    vocab_size: int = 1024,
) -> dict[str, Any]:
    """Writes the synthetic dataset (module docstring) under `out_dir`.

    Args:
        out_dir: created if needed; existing files of the same names are overwritten.
        num_prompts: prompts; each gives 2 rating rows and at most one preference pair.
        seed: the one seed; equal seeds give byte-identical files.
        val_fraction: share of prompts in the validation split.
        multi_turn_fraction: share of prompts with an earlier exchange.
        num_rewardbench: pairs in `rewardbench/filtered.jsonl`, from held-out prompts.
        vocab_size: upper bound on the tokenizer's ids (the corpus may yield fewer).

    Returns:
        A summary: row counts per file and the paths written.
    """
    out, rng = Path(out_dir), np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    is_val = rng.permutation(num_prompts) < round(val_fraction * num_prompts)
    ratings = {"train": [], "validation": []}
    disagreements = {"train": [], "validation": []}
    truth = {"ratings": {"train": [], "validation": []}, "preference": []}
    pairs = {"train": [], "val": []}
    filtered = 0
    for p in range(num_prompts):
        split = "validation" if is_val[p] else "train"
        prompt, topic, asked = _prompt(rng, multi_turn_fraction)
        responses = [_response(rng, topic, asked), _response(rng, topic, asked)]
        for r in responses:
            raw = _rate(rng, r["latent"])
            disagreements[split].append({"prompt": prompt, "response": r["text"], **raw})
            labels = {a: aggregate_rating(v) for a, v in raw.items()}
            ratings[split].append({"prompt": prompt, "response": r["text"], **labels})
            truth["ratings"][split].append({"topic": topic, **r["latent"], **r["features"]})
        h1, h2 = (r["latent"]["helpfulness"] for r in responses)
        raw = _annotate(rng, h1, h2)
        label = aggregate_preference(raw)
        if label is None:
            filtered += 1
            continue
        pref_split = "val" if is_val[p] else "train"
        row = _preference_row(
            pref_split, prompt, responses[0]["text"], responses[1]["text"], raw, label
        )
        pairs[pref_split].append((row, {"helpfulness_1": h1, "helpfulness_2": h2}))
    seen = {r["prompt"] for rows in ratings.values() for r in rows}
    rb_rows, truth["rewardbench"] = _rewardbench(rng, num_rewardbench, seen)

    _write_jsonl(out / "train.jsonl.gz", ratings["train"])
    _write_jsonl(out / "validation.jsonl.gz", ratings["validation"])
    _write_jsonl(
        out / "disagreements" / "disagreements.jsonl.gz",
        disagreements["train"] + disagreements["validation"],
    )
    ordered = pairs["train"] + pairs["val"]
    _write_jsonl(out / "preference" / "preference.jsonl.gz", [r for r, _ in ordered])
    truth["preference"] = [t for _, t in ordered]
    _write_jsonl(out / "rewardbench" / "filtered.jsonl", rb_rows)

    lines = [r["prompt"] + "\n" + r["response"] for s in ratings.values() for r in s]
    lines += [r["prompt"] + "\n" + r["chosen"] + "\n" + r["rejected"] for r in rb_rows]
    example = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    # Template text in the corpus gives its words whole pieces, keeping sequences short.
    lines += [format_llama3_chat(example), format_nemo_chat(example)] * 50
    tokenizer = _train_tokenizer(lines, vocab_size)
    tokenizer.save(out / "tokenizer.model")

    summary = {
        "seed": seed,
        "num_prompts": num_prompts,
        "rows": {
            "train": len(ratings["train"]),
            "validation": len(ratings["validation"]),
            "preference_train": len(pairs["train"]),
            "preference_val": len(pairs["val"]),
            "preference_filtered_spread": filtered,
            "rewardbench": len(rb_rows),
        },
        "vocab_size": tokenizer.vocab_size,
        "system_prompt": NEMO_SYSTEM_PROMPT,
    }
    truth["summary"] = summary
    (out / "truth.json").write_text(json.dumps(truth, indent=1, sort_keys=True) + "\n")
    return summary


def feature_counts(prompt: str, response: str) -> dict[str, int]:
    """Word counts of a response, the topic read from the prompt's last user turn.

    Returns:
        n_on, n_off, n_bad as in the module docstring, and n_echo: the response words that the
        last user turn contains (a subset of n_on).
    """
    last = split_helpsteer2_prompt(prompt)[-1]["content"].split()
    topics = {_WORD_TOPIC[w] for w in last if w in _WORD_TOPIC}
    words = response.split()
    return {
        "n_echo": sum(w in _WORD_TOPIC and w in last for w in words),
        "n_on": sum(_WORD_TOPIC.get(w) in topics for w in words),
        "n_off": sum(w in _WORD_TOPIC and _WORD_TOPIC[w] not in topics for w in words),
        "n_bad": sum(w in BAD_WORDS for w in words),
    }
