"""Token counts: fixed strings in both OpenAI encodings, chat accounting, request shapes."""

from __future__ import annotations

import math

import pytest

from batcher.tokens import (
    APPROX_FACTOR,
    DEFAULT_MAX_OUTPUT_TOKENS,
    batch_input_tokens,
    count_messages,
    count_text,
    encoding_for,
    request_input_tokens,
    request_max_output_tokens,
    row_model,
    tokenizer_name,
)
from batcher.types import RequestContext, RequestRow

# Expected counts were established with tiktoken 0.14 (encode_ordinary) fed OpenAI's own
# .tiktoken files (sha256 as pinned in tiktoken_ext.openai_public), not with toktok itself.
SAMPLES = {
    "ascii": "Hello, world! This is a test of the tokenizer.",
    "cjk": "我爱北京天安门。東京は日本の首都です。안녕하세요 세계",
    "emoji": "I ❤️ 🐍 and 🧠🚀👩‍💻!",
    "code": "def fib(n: int) -> int:\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "json": '{"id": 42, "tags": ["a", "b"], "nested": {"ok": true, "pi": 3.14159}}',
    "special": "<|endoftext|> is text here",
    "spaces": "a  b   c\n\n\n\td    ",
}
EXPECTED = {
    "o200k_base": {"ascii": 12, "cjk": 18, "emoji": 17, "code": 31, "json": 32, "special": 10,
                   "spaces": 8},
    "cl100k_base": {"ascii": 12, "cjk": 28, "emoji": 21, "code": 31, "json": 32, "special": 10,
                    "spaces": 8},
}
MODEL_OF = {"o200k_base": "gpt-4o-mini", "cl100k_base": "gpt-4"}


@pytest.mark.parametrize("encoding", ["o200k_base", "cl100k_base"])
@pytest.mark.parametrize("sample", list(SAMPLES))
def test_fixed_strings(encoding: str, sample: str) -> None:
    assert count_text(SAMPLES[sample], MODEL_OF[encoding]) == EXPECTED[encoding][sample]


def test_empty_text_is_zero() -> None:
    assert count_text("", "gpt-4o") == 0


@pytest.mark.parametrize(("model", "encoding"), [
    ("gpt-4o", "o200k_base"), ("gpt-4o-mini-2024-07-18", "o200k_base"),
    ("gpt-4.1-nano", "o200k_base"), ("gpt-5", "o200k_base"), ("o1", "o200k_base"),
    ("o3-mini", "o200k_base"), ("o4-mini", "o200k_base"), ("chatgpt-4o-latest", "o200k_base"),
    ("openai/gpt-4o-mini", "o200k_base"), ("ft:gpt-4o-mini-2024-07-18:acme::abc", "o200k_base"),
    ("gpt-oss-120b", "o200k_base"), ("GPT-4O", "o200k_base"),
    ("gpt-4", "cl100k_base"), ("gpt-4-turbo", "cl100k_base"), ("gpt-3.5-turbo", "cl100k_base"),
    ("gpt-35-turbo", "cl100k_base"), ("text-embedding-3-small", "cl100k_base"),
    ("text-embedding-ada-002", "cl100k_base"),
    ("claude-3-5-haiku-latest", None), ("gemini-1.5-flash", None), ("llama-3.1-8b", None),
    ("o1x", None), ("", None), (None, None),
])
def test_encoding_for(model: str | None, encoding: str | None) -> None:
    assert encoding_for(model) == encoding
    assert tokenizer_name(model) == (encoding or "approx")


def test_other_vendors_are_scaled_o200k_counts() -> None:
    text = SAMPLES["code"]
    assert count_text(text, "claude-3-5-haiku") == math.ceil(31 * APPROX_FACTOR)
    assert count_text(text, None) == math.ceil(31 * APPROX_FACTOR)


# OpenAI cookbook's example; the API reported 129 prompt tokens for gpt-4 / gpt-3.5-turbo-0613
# and 124 for gpt-4o / gpt-4o-mini.
COOKBOOK = [
    {"role": "system", "content": "You are a helpful, pattern-following assistant that "
                                  "translates corporate jargon into plain English."},
    {"role": "system", "name": "example_user",
     "content": "New synergies will help drive top-line growth."},
    {"role": "system", "name": "example_assistant",
     "content": "Things working well together will increase revenue."},
    {"role": "system", "name": "example_user",
     "content": "Let's circle back when we have more bandwidth to touch base on opportunities "
                "for increased leverage."},
    {"role": "system", "name": "example_assistant",
     "content": "Let's talk later when we're less busy about how to do better."},
    {"role": "user", "content": "This late pivot means we don't have time to boil the ocean "
                                "for the client deliverable."},
]


def test_chat_accounting_matches_openai_reported_counts() -> None:
    assert count_messages(COOKBOOK, "gpt-4") == 129
    assert count_messages(COOKBOOK, "gpt-4o-mini") == 124


def test_chat_overhead_arithmetic() -> None:
    hello = count_text("hello world", "gpt-4o")  # 2
    assert hello == 2
    # 3 per message + role (1) + content, 3 to prime the reply
    assert count_messages([{"role": "user", "content": "hello world"}], "gpt-4o") == 3 + 1 + 2 + 3
    two = [{"role": "system", "content": "hello world"}, {"role": "user", "content": "hello world"}]
    assert count_messages(two, "gpt-4o") == 2 * (3 + 1 + 2) + 3
    # a name costs its tokens plus 1
    named = [{"role": "user", "name": "bob", "content": "hello world"}]
    assert count_messages(named, "gpt-4o") == 3 + 1 + 1 + 1 + 2 + 3
    # list-of-parts content: text parts counted, images not
    parts = [{"role": "user", "content": [
        {"type": "text", "text": "hello world"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        {"type": "text", "text": "hello world"},
    ]}]
    assert count_messages(parts, "gpt-4o") == 3 + 1 + 2 + 2 + 3
    assert count_messages([], "gpt-4o") == 3


CTX = RequestContext(base_url="http://127.0.0.1:1/v1", model="gpt-4o-mini")


def _row(**kw: object) -> RequestRow:
    base: dict[str, object] = {"id": "r", "shape": "prompt", "source": "t.jsonl", "line": 1}
    base.update(kw)
    return RequestRow(**base)  # type: ignore[arg-type]


def test_prompt_row_with_system() -> None:
    ctx = RequestContext(base_url="http://x/v1", model="gpt-4o", system="hello world")
    row = _row(prompt="hello world")
    # system message (3 + 1 + 2) + user message (3 + 1 + 2) + 3
    assert request_input_tokens(row, ctx, "chat") == 15
    assert request_input_tokens(row, CTX, "chat") == 9
    # completions: "{system}\n\n{prompt}" as one text, no chat overhead
    assert request_input_tokens(row, ctx, "completions") == \
        count_text("hello world\n\nhello world", "gpt-4o") == 5
    assert request_input_tokens(row, CTX, "embeddings") == 2


def test_messages_row_gets_job_system_only_when_it_has_none() -> None:
    ctx = RequestContext(base_url="http://x/v1", model="gpt-4o", system="hello world")
    msgs = [{"role": "user", "content": "hello world"}]
    assert request_input_tokens(_row(shape="messages", messages=msgs), ctx, "chat") == 15
    own = [{"role": "system", "content": "hello"}, {"role": "user", "content": "hello world"}]
    assert request_input_tokens(_row(shape="messages", messages=own), ctx, "chat") == \
        count_messages(own, "gpt-4o")


def test_batch_rows_count_their_body() -> None:
    msgs = [{"role": "user", "content": "hello world"}]
    chat = _row(shape="batch", url="/v1/chat/completions",
                body={"model": "gpt-4", "messages": msgs, "max_tokens": 7})
    assert row_model(chat, CTX) == "gpt-4"
    assert request_input_tokens(chat, CTX, "chat") == count_messages(msgs, "gpt-4") == 9
    assert request_max_output_tokens(chat, CTX, "chat") == 7
    emb = _row(shape="batch", url="/v1/embeddings",
               body={"model": "text-embedding-3-small", "input": ["hello world", "hello"]})
    assert request_input_tokens(emb, CTX, "chat") == 3
    assert request_max_output_tokens(emb, CTX, "chat") == 0
    comp = _row(shape="batch", url="/v1/completions",
                body={"model": "gpt-3.5-turbo-instruct", "prompt": "hello world"})
    assert request_input_tokens(comp, CTX, "chat") == 2
    assert request_max_output_tokens(comp, CTX, "chat") == DEFAULT_MAX_OUTPUT_TOKENS


def test_max_output_tokens_precedence() -> None:
    ctx = RequestContext(base_url="http://x/v1", model="gpt-4o", params={"max_tokens": 100})
    assert request_max_output_tokens(_row(prompt="x"), ctx, "chat") == 100
    assert request_max_output_tokens(_row(prompt="x", params={"max_tokens": 5}), ctx, "chat") == 5
    assert request_max_output_tokens(
        _row(prompt="x", params={"max_completion_tokens": 9}), CTX, "chat") == 9
    assert request_max_output_tokens(_row(prompt="x"), CTX, "chat") == DEFAULT_MAX_OUTPUT_TOKENS
    # a row's null lifts the job's limit (the request is sent without one)
    assert request_max_output_tokens(
        _row(prompt="x", params={"max_tokens": None}), ctx, "chat") == DEFAULT_MAX_OUTPUT_TOKENS
    assert request_max_output_tokens(_row(prompt="x"), ctx, "embeddings") == 0
    gem = RequestContext(base_url="http://x/v1beta", model="gemini-1.5-flash",
                         params={"generationConfig": {"maxOutputTokens": 64}})
    assert request_max_output_tokens(_row(prompt="x"), gem, "gemini") == 64


def test_batch_counting_equals_one_by_one() -> None:
    rows = [_row(id=str(i), prompt=text, model=model)
            for i, (text, model) in enumerate(
                (t, m) for t in SAMPLES.values() for m in ("gpt-4o", "gpt-4", "claude-3-opus", None))]
    rows = rows * 5  # more than the small-batch threshold: the threaded path
    together = batch_input_tokens(rows, CTX, "chat")
    assert together == [request_input_tokens(r, CTX, "chat") for r in rows]
    assert together[0] == 3 + 1 + EXPECTED["o200k_base"]["ascii"] + 3
    assert together[1] == 3 + 1 + EXPECTED["cl100k_base"]["ascii"] + 3
