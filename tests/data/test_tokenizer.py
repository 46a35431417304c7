"""Tokenizers and chat templates against Meta's vectors, HF's template and real HelpSteer2 rows."""

import json
import random
import sys
from pathlib import Path

import pytest

from nemotron_jax.data import tokenizer as tk

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"

# The `chat_template` of meta-llama/Llama-3.1-8B-Instruct (tokenizer_config.json, before the
# `strftime_now` revision), kept verbatim as an independent reference for format_llama3_chat.
LLAMA31_CHAT_TEMPLATE = r"""{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message + builtin tools #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if builtin_tools is defined or tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{%- if builtin_tools is defined %}
    {{- "Tools: " + builtin_tools | reject('equalto', 'code_interpreter') | join(", ") + "\n\n"}}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- "<|python_tag|>" + tool_call.name + ".call(" }}
            {%- for arg_name, arg_val in tool_call.arguments | items %}
                {{- arg_name + '="' + arg_val + '"' }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- endif %}
                {%- endfor %}
            {{- ")" }}
        {%- else  %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- '{"name": "' + tool_call.name + '", ' }}
            {{- '"parameters": ' }}
            {{- tool_call.arguments | tojson }}
            {{- "}" }}
        {%- endif %}
        {%- if builtin_tools is defined %}
            {#- This means we're in ipython mode #}
            {{- "<|eom_id|>" }}
        {%- else %}
            {{- "<|eot_id|>" }}
        {%- endif %}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""  # noqa: E501

SYS = {"role": "system", "content": "You are terse."}
USER = {"role": "user", "content": "What is 2+2?"}
ASSISTANT = {"role": "assistant", "content": "4"}
LLAMA_CASES = {
    "system_user": ([SYS, USER], False),
    "user_only": ([USER], False),
    "multi_turn": ([SYS, USER, ASSISTANT, {"role": "user", "content": "And 3+3?"}], False),
    "generation_prompt": ([USER, ASSISTANT, USER], True),
    "whitespace": (
        [{"role": "system", "content": "\n  Be brief. \t"}, {"role": "user", "content": " hi\n\n"}],
        True,
    ),
}


@pytest.fixture(scope="module")
def llama():
    pytest.importorskip("llama_models", reason="the Llama-3.1 tokenizer needs the `llama` extra")
    return tk.Llama3Tokenizer()


def test_llama3_meta_vectors(llama):
    ids = [128000, 2028, 374, 264, 1296, 11914, 13, 128001]
    assert llama.encode("This is a test sentence.", bos=True, eos=True) == ids
    assert llama.decode(ids) == "<|begin_of_text|>This is a test sentence.<|end_of_text|>"
    message = "<|start_header_id|>user<|end_header_id|>\n\nThis is a test sentence.<|eot_id|>"
    assert tk.encode_chat(llama, message) == [
        *(128006, 882, 128007, 271),
        *(2028, 374, 264, 1296, 11914, 13, 128009),
    ]
    text = "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHello, world!<|eot_id|>"
    ids = [128000, 128006, 882, 128007, 271, 9906, 11, 1917, 0, 128009]
    assert llama.encode(text, allow_special=True) == ids
    assert llama.decode(ids) == text


def test_llama3_ids_and_round_trip(llama):
    assert isinstance(llama, tk.Tokenizer)
    assert llama.vocab_size == 128256
    assert (llama.bos_id, llama.eos_id) == (128000, 128001)
    assert (llama.eot_id, llama.eom_id) == (128009, 128008)
    assert llama.pad_id == 128004 == llama.special_tokens["<|finetune_right_pad_id|>"]
    assert llama.stop_ids == (128001, 128008, 128009)
    text = "Grüße, 世界! def f(x):\n\treturn x ** 2  # 🙂\n\n"
    assert llama.decode(llama.encode(text)) == text
    # Without allow_special the marker is plain text, so user content cannot end a turn.
    ids = llama.encode("<|eot_id|>")
    assert llama.eot_id not in ids and llama.decode(ids) == "<|eot_id|>"


def test_llama3_model_path(llama, tmp_path):
    import llama_models

    path = Path(llama_models.__file__).parent / "llama3" / "tokenizer.model"
    assert tk.Llama3Tokenizer(str(path)).encode("Hello, world!") == [9906, 11, 1917, 0]
    with pytest.raises(FileNotFoundError, match="missing.model"):
        tk.Llama3Tokenizer(tmp_path / "missing.model")


def test_llama3_without_extra_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "llama_models.llama3.tokenizer", None)
    with pytest.raises(ImportError, match=r"nemotron_jax\[llama\]"):
        tk.Llama3Tokenizer(tmp_path / "other.model")


def test_llama3_chat_literal():
    text = tk.format_llama3_chat([USER], add_generation_prompt=True)
    assert text == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


@pytest.mark.parametrize("case", sorted(LLAMA_CASES))
@pytest.mark.parametrize("date_string", [None, "02 Jan 2025"])
def test_llama3_chat_matches_hf_template(case, date_string):
    pytest.importorskip("transformers", reason="the reference rendering needs transformers")
    from transformers.utils.chat_template_utils import render_jinja_template

    messages, gen = LLAMA_CASES[case]
    extra = {} if date_string is None else {"date_string": date_string}
    rendered, _ = render_jinja_template(
        conversations=[messages],
        chat_template=LLAMA31_CHAT_TEMPLATE,
        add_generation_prompt=gen,
        bos_token="<|begin_of_text|>",
        **extra,
    )
    assert tk.format_llama3_chat(messages, add_generation_prompt=gen, **extra) == rendered[0]


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ([], "no messages"),
        ([USER, SYS], "message 1 has role 'system'"),
        ([USER, {"role": "tool", "content": "x"}], "message 1 has role 'tool'"),
        ([{"role": "user", "content": None}], "message 0 .user. content is NoneType"),
    ],
)
def test_llama3_chat_rejects_bad_messages(messages, match):
    with pytest.raises(ValueError, match=match):
        tk.format_llama3_chat(messages)


def _jsonl(path: Path) -> list[dict]:
    if not path.exists():
        pytest.skip(f"shared test data not found at {path.parent}")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_nemo_chat_reproduces_nemo_aligner_rows():
    rows = _jsonl(SHARED_DATA / "helpsteer2_nemo_aligner_test_rm" / "test-rm.jsonl")
    assert len(rows) == 8
    for row in rows:
        text = row["text"]
        messages = tk.parse_nemo_chat(text)
        assert [m["role"] for m in messages] == ["system", "user", "assistant"]
        assert messages[0]["content"] == tk.NEMO_SYSTEM_PROMPT
        assert tk.format_nemo_chat(messages) == text
        assert tk.format_nemo_chat(messages[1:]) == text
        prompt = tk.format_nemo_chat(messages[:2], add_generation_prompt=True)
        assert text.startswith(prompt) and prompt.endswith("\n<extra_id_1>Assistant\n")
        assert tk.parse_nemo_chat(prompt) == messages[:2]


def test_split_helpsteer2_card_prompts():
    folder = SHARED_DATA / "helpsteer2_card_examples"
    rows = [r for f in sorted(folder.glob("*.jsonl")) for r in _jsonl(f)]
    if not rows:
        pytest.skip(f"shared test data not found at {folder}")
    # The card's example rows are all single-turn.
    for row in rows:
        assert tk.split_helpsteer2_prompt(row["prompt"]) == [
            {"role": "user", "content": row["prompt"]}
        ]


def test_split_helpsteer2_multi_turn():
    prompt = "Hi there\n<extra_id_1>Assistant\nHello! How can I help?\n<extra_id_1>User\nA joke."
    messages = tk.split_helpsteer2_prompt(prompt)
    assert messages == [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "A joke."},
    ]
    # NeMo puts the whole joined prompt in one user turn; splitting it first gives the same text.
    single = [{"role": "user", "content": prompt}, {"role": "assistant", "content": "No."}]
    assert tk.format_nemo_chat(single) == tk.format_nemo_chat([*messages, single[1]])
    assert tk.format_nemo_chat(messages, add_generation_prompt=True) == (
        f"<extra_id_0>System\n{tk.NEMO_SYSTEM_PROMPT}\n<extra_id_1>User\n{prompt}"
        "\n<extra_id_1>Assistant\n"
    )


@pytest.mark.parametrize(
    ("prompt", "match"),
    [
        ("Hi\n<extra_id_1>User\nHello", "turn 1 is marked User"),
        ("a\n<extra_id_1>Assistant\nb\n<extra_id_1>Assistant\nc", "turn 2 is marked Assistant"),
    ],
)
def test_split_helpsteer2_rejects_bad_alternation(prompt, match):
    with pytest.raises(ValueError, match=match):
        tk.split_helpsteer2_prompt(prompt)


@pytest.mark.parametrize(
    ("messages", "gen", "match"),
    [
        ([USER, ASSISTANT], True, "message 1 is an assistant turn"),
        ([SYS, USER], False, "message 1 is a final user turn"),
        ([USER, USER], True, "message 1 has role 'user'"),
        ([SYS, ASSISTANT], False, "message 1 has role 'assistant'"),
        ([SYS], True, "no user turn"),
    ],
)
def test_nemo_chat_rejects_bad_messages(messages, gen, match):
    with pytest.raises(ValueError, match=match):
        tk.format_nemo_chat(messages, add_generation_prompt=gen)


def test_parse_nemo_chat_rejects_other_text():
    with pytest.raises(ValueError, match="must start with"):
        tk.parse_nemo_chat("<|begin_of_text|>hi")
    with pytest.raises(ValueError, match="must end with"):
        tk.parse_nemo_chat("<extra_id_0>System\nS\n<extra_id_1>User\nhi")


@pytest.fixture(scope="module")
def spm_tok():
    rng = random.Random(0)
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"]
    words = ["".join(rng.choices(syllables, k=rng.randint(1, 4))) for _ in range(3000)]
    lines = [" ".join(rng.choices(words, k=12)) for _ in range(2000)]
    return tk.SentencePieceTokenizer.train(lines, vocab_size=500)


def test_sentencepiece_ids_and_round_trip(spm_tok):
    assert isinstance(spm_tok, tk.Tokenizer)
    assert spm_tok.vocab_size == 500
    assert (spm_tok.pad_id, spm_tok.bos_id, spm_tok.eos_id) == (0, 2, 3)
    assert spm_tok.stop_ids == (3,)
    text = tk.format_nemo_chat([USER, {"role": "assistant", "content": "  bada kiso\n\nQ!"}])
    ids = tk.encode_chat(spm_tok, text)
    assert spm_tok.decode(ids) == text
    wrapped = spm_tok.encode("bada kiso", bos=True, eos=True)
    assert wrapped[0] == 2 and wrapped[-1] == 3 and spm_tok.decode(wrapped) == "bada kiso"


def test_sentencepiece_save_load(spm_tok, tmp_path):
    spm_tok.save(tmp_path / "tiny.model")
    loaded = tk.SentencePieceTokenizer.load(tmp_path / "tiny.model")
    text = "zuba meko tiraso"
    assert loaded.encode(text) == spm_tok.encode(text)
    assert loaded.vocab_size == spm_tok.vocab_size


def test_sentencepiece_too_small_vocab_is_a_value_error():
    with pytest.raises(ValueError, match="Vocabulary size is smaller"):
        tk.SentencePieceTokenizer.train(["hello world"] * 10, vocab_size=100)
