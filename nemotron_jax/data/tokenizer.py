"""Tokenizers and chat templates.

`Tokenizer` is the one interface the data pipeline needs. `Llama3Tokenizer` wraps Meta's own
Llama-3.1 tokenizer from the `llama-models` package (the `llama` extra), so the BPE file is
never copied into this repository; `SentencePieceTokenizer` trains a tiny model in memory for
tests and toy runs.

Two chat formats render `[{"role": "system" | "user" | "assistant", "content": str}, ...]`:

- `format_llama3_chat`: the Llama-3.1-Instruct template, as HF's Jinja template renders it
  without tools. The text starts with `<|begin_of_text|>`.
- `format_nemo_chat`: NeMo's `<extra_id_*>` template used for HelpSteer2 reward models. It has
  no BOS, and with the Llama-3 tokenizer its markers are ordinary text, not special tokens.

`encode_chat` tokenizes either string as is: special-token text is recognised and nothing is
added, so the Llama-3.1 template keeps its single BOS and the NeMo template gets none.
"""

from __future__ import annotations

import functools
import io
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import sentencepiece as spm

Message = Mapping[str, str]

NEMO_SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the user's questions."
)
_ROLES = ("system", "user", "assistant")
_NEMO_SYSTEM = "<extra_id_0>System\n"
_NEMO_TURN = {"user": "\n<extra_id_1>User\n", "assistant": "\n<extra_id_1>Assistant\n"}
_NEMO_END = "\n<extra_id_2>"
_NEMO_SPLIT = re.compile(r"\n<extra_id_1>(User|Assistant)\n")
# Byte fallback and identity normalization make decode(encode(s)) == s for any string.
_SPM_TRAIN_ARGS = dict(
    pad_id=0,
    unk_id=1,
    bos_id=2,
    eos_id=3,
    minloglevel=2,
    hard_vocab_limit=False,
    character_coverage=1.0,
    byte_fallback=True,
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
)


@runtime_checkable
class Tokenizer(Protocol):
    """What the data pipeline needs from a tokenizer."""

    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int
    stop_ids: tuple[int, ...]

    def encode(
        self, text: str, *, bos: bool = False, eos: bool = False, allow_special: bool = False
    ) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


@functools.lru_cache(maxsize=4)
def _load_meta_tokenizer(path: Path | None):
    try:
        from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer
    except ImportError as e:
        raise ImportError(
            "the Llama-3.1 tokenizer needs the `llama` extra: pip install 'nemotron_jax[llama]'"
        ) from e
    if path is None:
        return MetaTokenizer.get_instance()
    if not path.is_file():
        raise FileNotFoundError(f"tiktoken tokenizer file not found: {path}")
    return MetaTokenizer(path)


class Llama3Tokenizer:
    """Meta's Llama-3.1 tokenizer (128,256 ids) behind the `Tokenizer` interface.

    Args:
        model_path: a tiktoken-format BPE file; defaults to the `tokenizer.model` shipped in
            the `llama-models` package. Loaded files are cached per path.
    """

    def __init__(self, model_path: str | Path | None = None):
        self._tok = _load_meta_tokenizer(None if model_path is None else Path(model_path))
        self.special_tokens: dict[str, int] = dict(self._tok.special_tokens)
        self.vocab_size: int = self._tok.n_words
        self.bos_id: int = self._tok.bos_id
        self.eos_id: int = self._tok.eos_id
        self.eot_id: int = self._tok.eot_id
        self.eom_id: int = self._tok.eom_id
        # The model has no pad token; this reserved id is the one Meta fine-tunes with.
        self.pad_id: int = self._tok.pad_id
        self.stop_ids: tuple[int, ...] = (self.eos_id, self.eom_id, self.eot_id)

    def encode(
        self, text: str, *, bos: bool = False, eos: bool = False, allow_special: bool = False
    ) -> list[int]:
        """Tokenizes `text`.

        Without `allow_special`, text such as "<|eot_id|>" becomes ordinary pieces, so user
        content cannot inject control tokens.
        """
        allowed = "all" if allow_special else set()
        return self._tok.encode(text, bos=bos, eos=eos, allowed_special=allowed)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids])


class SentencePieceTokenizer:
    """A SentencePiece model with pad=0, unk=1, bos=2, eos=3, for tiny experiments."""

    def __init__(self, model_proto: bytes):
        self._proto = bytes(model_proto)
        self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
        self.vocab_size: int = self._sp.get_piece_size()
        self.pad_id: int = self._sp.pad_id()
        self.bos_id: int = self._sp.bos_id()
        self.eos_id: int = self._sp.eos_id()
        self.stop_ids: tuple[int, ...] = (self.eos_id,)

    @classmethod
    def train(
        cls, lines: Iterable[str], vocab_size: int, *, model_type: str = "bpe"
    ) -> SentencePieceTokenizer:
        """Trains in memory on `lines` (one sentence each).

        decode(encode(s)) == s for any string, newlines included. The 256 byte pieces mean
        `vocab_size` must exceed 260 plus the number of distinct characters; the vocabulary may
        come out smaller than asked.
        """
        model = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(lines),
                model_writer=model,
                vocab_size=vocab_size,
                model_type=model_type,
                **_SPM_TRAIN_ARGS,
            )
        except RuntimeError as e:
            raise ValueError(f"sentencepiece training failed: {str(e).splitlines()[0]}") from e
        return cls(model.getvalue())

    @classmethod
    def load(cls, path: str | Path) -> SentencePieceTokenizer:
        return cls(Path(path).read_bytes())

    def save(self, path: str | Path) -> None:
        Path(path).write_bytes(self._proto)

    def encode(
        self, text: str, *, bos: bool = False, eos: bool = False, allow_special: bool = False
    ) -> list[int]:
        """Tokenizes `text`; `allow_special` is accepted and ignored (text never holds controls)."""
        del allow_special
        return self._sp.encode(text, add_bos=bos, add_eos=eos)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])


def encode_chat(tokenizer: Tokenizer, text: str) -> list[int]:
    """Encodes a formatted chat string as is: special-token text allowed, no BOS/EOS added."""
    return tokenizer.encode(text, bos=False, eos=False, allow_special=True)


# The text that ends an assistant turn in each template: where generation stops.
END_OF_TURN = {"llama3": "<|eot_id|>", "nemo": "<extra_id_2>"}


def generation_stop_ids(tokenizer: Tokenizer, template: str) -> tuple[int, ...]:
    """Token ids that end a generated assistant turn in `template`, plus the tokenizer's own stop
    ids (end of text; for Llama-3.1 also eom and eot).

    The template's end-of-turn marker must be one token, since the sampler stops on token ids:
    NeMo's `<extra_id_2>` is one with the synthetic SentencePiece model but several ordinary
    tokens with the Llama-3.1 tokenizer, so that pairing raises.
    """
    from nemotron_jax.errors import ConfigError

    if template not in END_OF_TURN:
        raise ConfigError(f"template must be one of {sorted(END_OF_TURN)}, got {template!r}")
    marker = END_OF_TURN[template]
    # Encode after a plain character so that no dummy-prefix piece lands on the marker.
    ids = encode_chat(tokenizer, "x" + marker)[len(encode_chat(tokenizer, "x")) :]
    if len(ids) != 1:
        raise ConfigError(
            f"template {template!r} ends a turn with {marker!r}, which this tokenizer splits "
            f"into {len(ids)} tokens {ids}; generation needs a single stop token "
            f"(use template 'llama3' with the Llama-3.1 tokenizer)"
        )
    stops = tuple(getattr(tokenizer, "stop_ids", ()))
    return tuple(dict.fromkeys((ids[0], *stops)))


def _check_messages(messages: Sequence[Message]) -> None:
    if not messages:
        raise ValueError("chat has no messages")
    for i, m in enumerate(messages):
        role, content = m.get("role"), m.get("content")
        if role not in _ROLES:
            raise ValueError(f"message {i} has role {role!r}; expected one of {_ROLES}")
        if role == "system" and i != 0:
            raise ValueError(f"message {i} has role 'system'; only message 0 may be system")
        if not isinstance(content, str):
            raise ValueError(f"message {i} ({role}) content is {type(content).__name__}, not str")


def format_llama3_chat(
    messages: Sequence[Message],
    *,
    add_generation_prompt: bool = False,
    date_string: str = "26 Jul 2024",
) -> str:
    """Renders `messages` exactly as the Llama-3.1-Instruct HF chat template does (no tools).

    The system block is always present (empty system message by default) and every content is
    stripped of surrounding whitespace, as the template's `trim` does.
    """
    _check_messages(messages)
    system = messages[0]["content"].strip() if messages[0]["role"] == "system" else ""
    parts = [
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        f"Cutting Knowledge Date: December 2023\nToday Date: {date_string}\n\n{system}<|eot_id|>"
    ]
    for m in messages[1:] if messages[0]["role"] == "system" else messages:
        parts.append(
            f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>"
        )
    if add_generation_prompt:
        parts.append("<|start_header_id|>assistant<|end_header_id|>\n\n")
    return "".join(parts)


def format_nemo_chat(
    messages: Sequence[Message],
    *,
    system: str = NEMO_SYSTEM_PROMPT,
    add_generation_prompt: bool = False,
) -> str:
    """Renders `messages` in NeMo's `<extra_id_*>` template (HelpSteer2 reward models).

    Turns must alternate user/assistant starting with user; a leading system message replaces
    `system`. Contents are used verbatim. A conversation ending with an assistant turn ends with
    `\\n<extra_id_2>` (the reward is read at its last token); one ending with a user turn needs
    `add_generation_prompt`, and then ends right after `<extra_id_1>Assistant\\n`. Joining the
    turns of a multi-turn HelpSteer2 `prompt` this way reproduces that prompt byte for byte.
    """
    _check_messages(messages)
    first = 1 if messages[0]["role"] == "system" else 0
    if first:
        system = messages[0]["content"]
    if len(messages) == first:
        raise ValueError("nemo chat has no user turn")
    parts = [_NEMO_SYSTEM, system]
    for i in range(first, len(messages)):
        role, expected = messages[i]["role"], ("user", "assistant")[(i - first) % 2]
        if role != expected:
            raise ValueError(f"message {i} has role {role!r}; nemo turns alternate, {expected} due")
        parts += [_NEMO_TURN[role], messages[i]["content"]]
    if role == "assistant" and add_generation_prompt:
        raise ValueError(f"message {i} is an assistant turn; no generation prompt can follow it")
    if role == "user" and not add_generation_prompt:
        raise ValueError(f"message {i} is a final user turn; pass add_generation_prompt=True")
    parts.append(_NEMO_END if role == "assistant" else _NEMO_TURN["assistant"])
    return "".join(parts)


def split_helpsteer2_prompt(prompt: str) -> list[dict[str, str]]:
    """Splits a HelpSteer2 `prompt` into user/assistant messages, user first.

    Multi-turn prompts join their turns with the literal `\\n<extra_id_1>Assistant\\n` and
    `\\n<extra_id_1>User\\n`; a single-turn prompt becomes one user message.
    """
    pieces = _NEMO_SPLIT.split(prompt)
    messages = [{"role": "user", "content": pieces[0]}]
    for i, (marker, content) in enumerate(zip(pieces[1::2], pieces[2::2], strict=True), start=1):
        expected = "user" if i % 2 == 0 else "assistant"
        if marker.lower() != expected:
            raise ValueError(
                f"turn {i} is marked {marker}; HelpSteer2 turns alternate, {expected} expected"
            )
        messages.append({"role": expected, "content": content})
    return messages


def parse_nemo_chat(text: str) -> list[dict[str, str]]:
    """Inverts `format_nemo_chat`: returns the system message followed by the turns.

    A text ending in a generation prompt gives messages ending with the user turn.
    """
    if not text.startswith(_NEMO_SYSTEM):
        raise ValueError(f"nemo chat must start with {_NEMO_SYSTEM!r}")
    system, sep, body = text[len(_NEMO_SYSTEM) :].partition(_NEMO_TURN["user"])
    if not sep:
        raise ValueError("nemo chat has no user turn")
    if body.endswith(_NEMO_END):
        body = body[: -len(_NEMO_END)]
    elif body.endswith(_NEMO_TURN["assistant"]):
        body = body[: -len(_NEMO_TURN["assistant"])]
    else:
        raise ValueError("nemo chat must end with '\\n<extra_id_2>' or a generation prompt")
    return [{"role": "system", "content": system}, *split_helpsteer2_prompt(body)]
