"""Golden tests of the OpenAI-compatible adapters (chat, completions, embeddings) and routing."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from batcher import errors
from batcher.errors import InputError, InvalidResponse, ProviderError
from batcher.providers import get_provider, provider_for_row, provider_names
from batcher.providers.base import normalise_finish_reason
from batcher.providers.openai import parse_embeddings
from batcher.types import HttpRequest, HttpResponse, RequestContext, RequestRow
from tests.golden_cases import (
    GOLDEN_ROOT,
    answer_dict,
    assert_request_matches,
    load,
    make_row,
    response_of,
)

GOLDEN = GOLDEN_ROOT / "openai"


def make_ctx(spec: dict[str, Any]) -> RequestContext:
    return RequestContext(**spec)


def request_for(case: dict[str, Any]) -> HttpRequest:
    return HttpRequest("POST", "http://h/v1/x", {}, b"{}", model="m",
                       stream=bool(case.get("stream")))


REQUESTS = load(GOLDEN, "requests.json")
RESPONSES = load(GOLDEN, "responses.json")
ERRORS = load(GOLDEN, "errors.json")


@pytest.mark.parametrize("case", REQUESTS, ids=[c["name"] for c in REQUESTS])
def test_build_request_golden(case: dict[str, Any]) -> None:
    request = get_provider(case["endpoint"]).build_request(make_row(case["row"], line=7),
                                                          make_ctx(case["ctx"]))
    assert_request_matches(request, case["expected"])


@pytest.mark.parametrize("case", RESPONSES, ids=[c["name"] for c in RESPONSES])
def test_parse_response_golden(case: dict[str, Any]) -> None:
    provider = get_provider(case["endpoint"])
    answer = provider.parse_response(request_for(case), response_of(GOLDEN, case))
    assert answer_dict(answer) == case["answer"]


@pytest.mark.parametrize("case", ERRORS, ids=[c["name"] for c in ERRORS])
def test_error_golden(case: dict[str, Any]) -> None:
    provider = get_provider(case.get("endpoint", "chat"))
    expected = case["error"]
    with pytest.raises(ProviderError) as info:
        provider.parse_response(request_for(case), response_of(GOLDEN, case))
    exc = info.value
    assert type(exc) is getattr(errors, expected["class"]), exc
    assert exc.status == expected["status"]
    if "retry_after" in expected:
        assert getattr(exc, "retry_after", None) == expected["retry_after"]


def test_crlf_stream_parses_like_lf() -> None:
    lf = (GOLDEN / "chat_stream_complete.sse").read_bytes()
    crlf = lf.replace(b"\n", b"\r\n")
    chat = get_provider("chat")
    req = HttpRequest("POST", "u", {}, b"", stream=True)
    a = chat.parse_response(req, HttpResponse(200, {}, lf))
    b = chat.parse_response(req, HttpResponse(200, {}, crlf))
    assert a == b
    assert a.output == "你好!有什么可以帮你?"


def test_stream_cut_at_every_byte_is_never_ok() -> None:
    """Any prefix of a stream that ends before its finish chunk is an error, never an answer."""
    full = (GOLDEN / "chat_stream_no_usage.sse").read_bytes()
    finish_at = full.index(b'"finish_reason":"length"')
    chat = get_provider("chat")
    req = HttpRequest("POST", "u", {}, b"", stream=True)
    for cut in range(0, finish_at, 7):
        with pytest.raises(InvalidResponse):
            chat.parse_response(req, HttpResponse(200, {}, full[:cut]))


def test_a_stream_ended_by_done_without_a_finish_reason_is_cut() -> None:
    """llama-cpp-python ends a stream it interrupts with [DONE] and no finish_reason."""
    chunk = (b'data: {"id":"c1","model":"m","object":"chat.completion.chunk","choices":'
             b'[{"index":0,"delta":{"content":"The capital"},"finish_reason":null}]}\n\n')
    chat = get_provider("chat")
    req = HttpRequest("POST", "u", {}, b"", stream=True)
    with pytest.raises(InvalidResponse, match=r"\[DONE\] but no finish_reason"):
        chat.parse_response(req, HttpResponse(200, {}, chunk + b"data: [DONE]\n\n"))
    finished = chunk.replace(b'"finish_reason":null', b'"finish_reason":"stop"')
    answer = chat.parse_response(req, HttpResponse(200, {}, finished + b"data: [DONE]\n\n"))
    assert (answer.output, answer.finish_reason) == ("The capital", "stop")


def test_error_message_never_holds_the_key() -> None:
    row = RequestRow(id="1", shape="prompt", source="s", line=1, prompt="hi")
    ctx = RequestContext(base_url="http://h/v1", model="m", api_key="sk-SECRET-123")
    chat = get_provider("chat")
    request = chat.build_request(row, ctx)
    assert request.headers["Authorization"] == "Bearer sk-SECRET-123"
    for status in (200, 401, 429, 500):
        with pytest.raises(ProviderError) as info:
            chat.parse_response(request, HttpResponse(status, {}, b'{"error":{"code":"x"}}'))
        assert "sk-SECRET" not in str(info.value)


def test_missing_model_is_an_input_error() -> None:
    row = RequestRow(id="1", shape="prompt", source="p.jsonl", line=4, prompt="hi")
    for name in ("chat", "completions", "embeddings"):
        with pytest.raises(InputError) as info:
            get_provider(name).build_request(row, RequestContext(base_url="http://h/v1",
                                                                 model=None))
        assert info.value.field == "model"
        assert info.value.line == 4


@pytest.mark.parametrize("endpoint", ["completions", "embeddings"])
def test_messages_rows_are_refused_where_a_prompt_is_needed(endpoint: str) -> None:
    row = RequestRow(id="1", shape="messages", source="m.jsonl", line=2,
                     messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(InputError) as info:
        get_provider(endpoint).build_request(row, RequestContext(base_url="http://h/v1",
                                                                 model="m"))
    assert info.value.field == "prompt"
    assert "m.jsonl:2" in str(info.value)


def test_row_without_prompt_or_messages() -> None:
    row = RequestRow(id="1", shape="prompt", source="x", line=1)
    with pytest.raises(InputError):
        get_provider("chat").build_request(row, RequestContext(base_url="http://h/v1",
                                                               model="m"))


def test_row_messages_are_not_mutated_by_system() -> None:
    messages: list[dict[str, Any]] = [{"role": "user", "content": "hi"}]
    row = RequestRow(id="1", shape="messages", source="x", line=1, messages=messages)
    ctx = RequestContext(base_url="http://h/v1", model="m", system="S")
    body = orjson.loads(get_provider("chat").build_request(row, ctx).body)
    assert body["messages"][0] == {"role": "system", "content": "S"}
    assert messages == [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(("url", "name"), [
    ("/v1/chat/completions", "chat"),
    ("/v1/completions", "completions"),
    ("/v1/embeddings", "embeddings"),
    ("/chat/completions", "chat"),
    ("https://api.openai.com/v1/embeddings", "embeddings"),
])
def test_provider_for_batch_rows(url: str, name: str) -> None:
    row = RequestRow(id="1", shape="batch", source="b.jsonl", line=3, url=url, body={})
    assert provider_for_row(row, "anthropic").name == name


def test_provider_for_unknown_batch_url() -> None:
    row = RequestRow(id="1", shape="batch", source="b.jsonl", line=3, url="/v1/responses",
                     body={})
    with pytest.raises(InputError) as info:
        provider_for_row(row, "chat")
    assert info.value.field == "url"
    assert info.value.line == 3
    assert info.value.source == "b.jsonl"


def test_provider_for_other_rows_is_the_jobs() -> None:
    row = RequestRow(id="1", shape="prompt", source="p", line=1, prompt="x")
    assert provider_for_row(row, "gemini").name == "gemini"
    assert provider_for_row(row, "chat").name == "chat"


def test_all_endpoints_registered() -> None:
    assert set(provider_names()) >= {"chat", "completions", "embeddings", "anthropic", "gemini"}


def test_parse_embeddings_orders_by_index() -> None:
    body = {"data": [{"index": 1, "embedding": [1.0, 2.0]}, {"index": 0, "embedding": [3, 4]}]}
    assert parse_embeddings(body) == [[3.0, 4.0], [1.0, 2.0]]
    with pytest.raises(InvalidResponse):
        parse_embeddings({"data": None})


@pytest.mark.parametrize(("raw", "expected"), [
    ("stop", ("stop", "stop")),
    ("length", ("length", "length")),
    ("function_call", ("tool_calls", "function_call")),
    ("content_filter", ("content_filter", "content_filter")),
    ("abort", ("error", "abort")),
    ("something_new", ("stop", "something_new")),
    (None, (None, None)),
])
def test_finish_reason_table(raw: str | None, expected: tuple[str | None, str | None]) -> None:
    assert normalise_finish_reason(raw) == expected
