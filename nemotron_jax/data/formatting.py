"""Rows → token ids: chat templates, the length limit, and fixed-shape numpy examples.

**Rendering.** A conversation is the prompt turns (user, assistant, ..., user) followed by the
response as the final assistant turn. `template="llama3"` renders it with `format_llama3_chat`
(no system message unless `system` is given); `template="nemo"` with `format_nemo_chat` (system
prompt `NEMO_SYSTEM_PROMPT` unless given, or the one a NeMo row was written with). The whole
string is tokenized at once with `encode_chat`, so an example that fits is exactly what NeMo or
HF would feed the model.

**Length limit** `max_len` (counted in tokens):

- `truncation="skip"`: an over-long example is skipped.
- `truncation="truncate"`: drop whole earliest prompt turns (a user turn with the assistant turn
  answering it) until the example fits, keeping at least the last user turn; if it is still too
  long, cut the earliest tokens of that last user turn. The response and the template around it
  are always kept whole: when they alone, plus one prompt token, exceed `max_len`, the example is
  skipped. Both sides of a pair get the same truncated prompt, so their rewards compare the
  responses on the same context; a pair is dropped when either side cannot fit.
- `truncation="right"` (pairs only; reward-bench's own, for numbers comparable with its
  leaderboard at its `max_length=2048`): keep each side's first `max_len` tokens, cutting the end
  of a long response (or all of it after a long prompt). The default keeps the response whole,
  which scores what was written; this one scores what reward-bench's models saw.

Every skip and truncation is counted in a `FormatReport`.

**Examples**, right-padded with `tokenizer.pad_id` to T = `max_len`:

| kind | keys |
|---|---|
| regression | tokens int32 [T], attention_mask int32 [T], labels float32 [9] |
| pairs | tokens int32 [2, T], attention_mask int32 [2, T], strength int32 [] |
| lm_pairs | as pairs, plus loss_mask int32 [2, T]: each side's response targets (DPO) |
| sft | tokens int32 [T], attention_mask int32 [T], loss_mask int32 [T] |
| prompts | tokens int32 [T], attention_mask int32 [T]: the prompt ready for generation |

All carry `index` int32 [], the row's position in the input. `labels` use NeMo's 9 slots
(4 helpfulness, 5 correctness, 6 coherence, 7 complexity, 8 verbosity; -100 unset);
`attributes="helpfulness"` sets slot 4 only, `"all"` slots 4-8. `strength` is the signed
`preference_strength` (< 0: response_1 better; 0: tie); row 0 is response_1, row 1 response_2.
A RewardBench row becomes the pair (chosen, rejected) with strength -1. `prompts` (the rollout
prompts of online RL) render the turns with the template's generation prompt (the text up to
where the assistant's answer starts); under "truncate" an over-long prompt loses whole earliest
turns, and one that is still too long is skipped (counted as `skipped_too_long`).
`loss_mask[t] = 1` marks token t as a response target (through the end-of-turn marker); a causal
LM predicts it at t - 1.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import numpy as np

from nemotron_jax.data.helpsteer2 import (
    ATTRIBUTES,
    IGNORE_LABEL,
    LABEL_SLOTS,
    NUM_LABEL_SLOTS,
    NemoRegressionRow,
    PreferenceRow,
    RatingRow,
    RewardBenchRow,
)
from nemotron_jax.data.tokenizer import (
    NEMO_SYSTEM_PROMPT,
    Tokenizer,
    encode_chat,
    format_llama3_chat,
    format_nemo_chat,
)
from nemotron_jax.errors import ConfigError, DataError

Kind = Literal["regression", "pairs", "lm_pairs", "sft", "prompts"]
Template = Literal["llama3", "nemo"]
Truncation = Literal["truncate", "skip"]
Attributes = Literal["helpfulness", "all"]
_SENTINEL = "\x00content\x00"


@dataclasses.dataclass
class FormatReport:
    """What encoding did to the rows; a pair counts once.

    Attributes:
        kind: "regression", "pairs" or "sft".
        examples: rows offered.
        kept: examples produced.
        truncated_turns: kept examples that lost whole earliest prompt turns.
        truncated_tokens: kept examples whose last user turn lost its earliest tokens.
        skipped_too_long: skipped over `max_len` under `truncation="skip"` (prompts: also a
            single-turn prompt still over `max_len` under "truncate").
        skipped_response_too_long: skipped because the response and template alone do not fit.
        pairs_dropped: pairs dropped because a side did not fit (a subset of the two above).
        ties_dropped: tie pairs dropped (`drop_ties`), or ties offered to sft (no better side).
    """

    kind: str
    examples: int = 0
    kept: int = 0
    truncated_turns: int = 0
    truncated_tokens: int = 0
    skipped_too_long: int = 0
    skipped_response_too_long: int = 0
    pairs_dropped: int = 0
    ties_dropped: int = 0

    @property
    def skipped(self) -> int:
        return self.examples - self.kept

    def summary(self) -> str:
        fields = dataclasses.asdict(self)
        return f"{fields.pop('kind')}: " + ", ".join(f"{k}={v}" for k, v in fields.items())


class _Renderer:
    """Renders conversations in one template; `turns` alternate user/assistant, user first."""

    def __init__(self, template: Template, system: str | None):
        if template not in ("llama3", "nemo"):
            raise ConfigError(f"template must be 'llama3' or 'nemo', got {template!r}")
        self.template, self.system = template, system
        probe = self.prefix((_SENTINEL,))
        i = probe.index(_SENTINEL)
        # Text before the first user turn's content, and between it and the response.
        self.head, self.closing = probe[:i], probe[i + len(_SENTINEL) :]

    def _messages(self, turns: Sequence[str], response: str | None) -> list[dict[str, str]]:
        contents = [*turns] if response is None else [*turns, response]
        messages = [
            {"role": ("user", "assistant")[i % 2], "content": c} for i, c in enumerate(contents)
        ]
        if self.template == "llama3" and self.system is not None:
            messages.insert(0, {"role": "system", "content": self.system})
        return messages

    def _render(self, messages: list[dict[str, str]], generation: bool) -> str:
        if self.template == "llama3":
            return format_llama3_chat(messages, add_generation_prompt=generation)
        system = NEMO_SYSTEM_PROMPT if self.system is None else self.system
        return format_nemo_chat(messages, system=system, add_generation_prompt=generation)

    def text(self, turns: Sequence[str], response: str) -> str:
        return self._render(self._messages(turns, response), generation=False)

    def prefix(self, turns: Sequence[str]) -> str:
        return self._render(self._messages(turns, None), generation=True)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    mismatch = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(mismatch[0]) if mismatch.size else n


def _fit(
    tok: Tokenizer,
    render: _Renderer,
    turns: Sequence[str],
    responses: Sequence[str],
    max_len: int,
    truncation: Truncation,
) -> tuple[list[tuple[list[int], int]] | None, str | None, bool, bool]:
    """Encodes each response after `turns` within `max_len`, sharing one truncated prompt.

    Returns:
        (sides, skip_reason, turns_dropped, tokens_cut): sides are (ids, response_start) pairs,
        None when skipped for `skip_reason`.
    """
    turns, dropped = tuple(turns), False
    while True:
        prefix = render.prefix(turns)
        prefix_ids = encode_chat(tok, prefix)
        sides = []
        for response in responses:
            ids = encode_chat(tok, render.text(turns, response))
            sides.append((ids, _common_prefix(prefix_ids, ids)))
        if all(len(ids) <= max_len for ids, _ in sides):
            return sides, None, dropped, False
        if truncation == "right":  # reward-bench's: keep the first max_len tokens of each side
            cut = [(ids[:max_len], min(start, max_len)) for ids, start in sides]
            return cut, None, False, True
        if truncation == "skip":
            return None, "too_long", False, False
        if len(turns) == 1:
            break
        turns, dropped = turns[2:], True
    # One user turn left: its content spans [n_head, n_end) of each side; BPE merges across a
    # boundary only move that boundary into the content, which is what gets cut.
    head_ids = encode_chat(tok, render.head)
    content_end_ids = encode_chat(tok, prefix[: len(prefix) - len(render.closing)])
    spans = []
    for ids, _ in sides:
        n_head = _common_prefix(head_ids, ids)
        spans.append((n_head, max(n_head, _common_prefix(content_end_ids, ids))))
    keep = min(
        max_len - n_head - (len(ids) - n_end)
        for (ids, _), (n_head, n_end) in zip(sides, spans, strict=True)
    )
    if keep < 1:
        return None, "response_too_long", dropped, False
    out = []
    for (ids, start), (n_head, n_end) in zip(sides, spans, strict=True):
        k = min(keep, n_end - n_head)
        out.append((ids[:n_head] + ids[n_end - k :], start - (n_end - n_head - k)))
    return out, None, dropped, True


def _fit_prompt(
    tok: Tokenizer, render: _Renderer, turns: Sequence[str], max_len: int, truncation: Truncation
) -> tuple[list[int] | None, bool]:
    """(generation-prompt ids within `max_len` or None, whether earliest turns were dropped)."""
    turns, dropped = tuple(turns), False
    while True:
        ids = encode_chat(tok, render.prefix(turns))
        if len(ids) <= max_len:
            return ids, dropped
        if truncation == "skip" or len(turns) == 1:
            return None, False
        turns, dropped = turns[2:], True


def _prompt_turns(row: Any) -> tuple[str, ...]:
    if isinstance(row, RatingRow | PreferenceRow):
        return tuple(row.turns)
    if isinstance(row, RewardBenchRow):
        return (row.prompt,)
    raise DataError(
        f"prompts need RatingRow, PreferenceRow or RewardBenchRow, got {type(row).__name__}"
    )


def _check_options(kind: str, truncation: str, attributes: str, max_len: int) -> None:
    if kind not in ("regression", "pairs", "lm_pairs", "sft", "prompts"):
        raise ConfigError(f"kind must be 'regression', 'pairs', 'sft' or 'prompts', got {kind!r}")
    if truncation == "right" and kind != "pairs":
        raise ConfigError("truncation 'right' (reward-bench's) is for scoring pairs only")
    if truncation not in ("truncate", "skip", "right"):
        raise ConfigError(f"truncation must be 'truncate' or 'skip', got {truncation!r}")
    if attributes not in ("helpfulness", "all"):
        raise ConfigError(f"attributes must be 'helpfulness' or 'all', got {attributes!r}")
    if max_len < 2:
        raise ConfigError(f"max_len must be at least 2, got {max_len}")


def _regression_target(
    row: Any, attributes: Attributes
) -> tuple[tuple[str, ...], str, str | None, np.ndarray]:
    slots = (
        [LABEL_SLOTS["helpfulness"]] if attributes == "helpfulness" else list(LABEL_SLOTS.values())
    )
    labels = np.full([NUM_LABEL_SLOTS], IGNORE_LABEL, np.float32)
    if isinstance(row, NemoRegressionRow):
        system, turns, response = row.conversation()
        labels[slots] = np.asarray(row.label, np.float32)[slots]
        return turns, response, system, labels
    if isinstance(row, RatingRow):
        values = row.ratings()
        labels[slots] = [values[a] for a in ATTRIBUTES][: len(slots)]
        return row.turns, row.response, None, labels
    raise DataError(f"regression needs RatingRow or NemoRegressionRow, got {type(row).__name__}")


def _pair_target(row: Any) -> tuple[tuple[str, ...], tuple[str, str], int]:
    if isinstance(row, PreferenceRow):
        if row.preference_strength is None:
            raise DataError("preference row has no label; run aggregation.aggregate_preferences")
        return row.turns, (row.response_1, row.response_2), row.preference_strength
    if isinstance(row, RewardBenchRow):
        return (row.prompt,), (row.chosen, row.rejected), -1
    raise DataError(f"pairs need PreferenceRow or RewardBenchRow, got {type(row).__name__}")


def _sft_target(row: Any) -> tuple[tuple[str, ...], str | None]:
    if isinstance(row, RatingRow):
        return row.turns, row.response
    if isinstance(row, RewardBenchRow):
        return (row.prompt,), row.chosen
    if isinstance(row, PreferenceRow):
        s = row.preference_strength
        return row.turns, None if not s else (row.response_1 if s < 0 else row.response_2)
    raise DataError(
        f"sft needs RatingRow, PreferenceRow or RewardBenchRow, got {type(row).__name__}"
    )


def encode_rows(
    rows: Iterable[Any],
    *,
    kind: Kind,
    tokenizer: Tokenizer,
    template: Template,
    max_len: int,
    truncation: Truncation = "truncate",
    attributes: Attributes = "helpfulness",
    drop_ties: bool = False,
    system: str | None = None,
) -> tuple[list[dict[str, Any]], FormatReport]:
    """Tokenizes rows into unpadded examples; `pad_example` gives them their fixed shape.

    Args:
        rows: `RatingRow`/`NemoRegressionRow` (regression), `PreferenceRow`/`RewardBenchRow`
            (pairs), `RatingRow`/`PreferenceRow` (its better response)/`RewardBenchRow` (chosen)
            for sft; any of the three for prompts.
        kind: "regression", "pairs", "sft" or "prompts".
        tokenizer: any `Tokenizer`.
        template: "llama3" or "nemo".
        max_len: T, the token budget of one sequence.
        truncation: "truncate" or "skip" (module docstring).
        attributes: regression label slots, "helpfulness" (slot 4) or "all" (slots 4-8).
        drop_ties: pairs only; drop strength-0 pairs (counted) instead of keeping them.
        system: system prompt; None is the template's default.

    Returns:
        (examples, report). Each example holds `index` and `tokens` (int32 [L], or a list of two
        for pairs) plus `labels`, `strength` or `response_start`.
    """
    _check_options(kind, truncation, attributes, max_len)
    report = FormatReport(kind=kind)
    renderers: dict[str | None, _Renderer] = {}
    examples = []
    for index, row in enumerate(rows):
        report.examples += 1
        row_system = system
        extra: dict[str, Any] = {}
        try:
            if kind == "regression":
                turns, response, nemo_system, labels = _regression_target(row, attributes)
                # A NeMo row keeps the system prompt it was written with.
                row_system = nemo_system if system is None and template == "nemo" else system
                responses, extra["labels"] = [response], labels
            elif kind in ("pairs", "lm_pairs"):
                turns, responses, strength = _pair_target(row)
                extra["strength"] = np.asarray(strength, np.int32)
            elif kind == "sft":
                turns, response = _sft_target(row)
                responses = [response]
            else:
                turns, responses = _prompt_turns(row), []
        except DataError:
            raise
        except ValueError as e:
            raise DataError(f"{kind} row {index}: {e}") from e
        paired = kind in ("pairs", "lm_pairs")
        if (paired and drop_ties and strength == 0) or None in responses:
            report.ties_dropped += 1
            continue
        if row_system not in renderers:
            renderers[row_system] = _Renderer(template, row_system)
        if kind == "prompts":
            ids, dropped = _fit_prompt(tokenizer, renderers[row_system], turns, max_len, truncation)
            if ids is None:
                report.skipped_too_long += 1
                continue
            report.truncated_turns += dropped
            tokens = np.asarray(ids, np.int32)
            examples.append({"index": np.asarray(index, np.int32), "tokens": tokens})
            continue
        sides, reason, dropped, cut = _fit(
            tokenizer, renderers[row_system], turns, responses, max_len, truncation
        )
        if sides is None:
            setattr(report, f"skipped_{reason}", getattr(report, f"skipped_{reason}") + 1)
            report.pairs_dropped += paired
            continue
        report.truncated_turns += dropped
        report.truncated_tokens += cut
        tokens = [np.asarray(ids, np.int32) for ids, _ in sides]
        example = {"index": np.asarray(index, np.int32), **extra}
        example["tokens"] = tokens if paired else tokens[0]
        if kind == "sft":
            example["response_start"] = sides[0][1]
        if kind == "lm_pairs":
            example["response_start"] = [start for _, start in sides]
        examples.append(example)
    report.kept = len(examples)
    return examples, report


def _pad(tokens: np.ndarray, max_len: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    out = np.full([max_len], pad_id, np.int32)
    mask = np.zeros([max_len], np.int32)
    out[: len(tokens)], mask[: len(tokens)] = tokens, 1
    return out, mask


def pad_example(example: dict[str, Any], *, max_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """Pads one `encode_rows` example to the fixed shapes in the module docstring."""
    out = {k: v for k, v in example.items() if k not in ("tokens", "response_start")}
    if isinstance(example["tokens"], list):  # pairs: [2, T]
        padded = [_pad(t, max_len, pad_id) for t in example["tokens"]]
        out["tokens"] = np.stack([p[0] for p in padded])
        out["attention_mask"] = np.stack([p[1] for p in padded])
        if "response_start" in example:  # lm_pairs
            out["loss_mask"] = out["attention_mask"].copy()
            for side, start in enumerate(example["response_start"]):
                out["loss_mask"][side, :start] = 0
        return out
    out["tokens"], out["attention_mask"] = _pad(example["tokens"], max_len, pad_id)
    if "response_start" in example:
        out["loss_mask"] = out["attention_mask"].copy()
        out["loss_mask"][: example["response_start"]] = 0
    return out
