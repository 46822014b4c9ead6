"""Golden tests of the Anthropic Messages adapter: requests, answers, errors and streams."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from batcher import errors
from batcher.errors import InputError, InvalidResponse, ProviderError
from batcher.providers import get_provider
from batcher.providers.anthropic import DEFAULT_ANTHROPIC_MAX_TOKENS
from batcher.types import HttpRequest, HttpResponse, RequestContext, RequestRow
from tests.golden_cases import (
    GOLDEN_ROOT,
    answer_dict,
    assert_request_matches,
    load,
    make_row,
    response_of,
)

GOLDEN = GOLDEN_ROOT / "anthropic"
PROVIDER = get_provider("anthropic")


def request_for(case: dict[str, Any]) -> HttpRequest:
    return HttpRequest("POST", "http://h/v1/messages", {}, b"{}", model="m",
                       stream=bool(case.get("stream")))


REQUESTS = load(GOLDEN, "requests.json")
RESPONSES = load(GOLDEN, "responses.json")
ERRORS = load(GOLDEN, "errors.json")


@pytest.mark.parametrize("case", REQUESTS, ids=[c["name"] for c in REQUESTS])
def test_build_request_golden(case: dict[str, Any]) -> None:
    request = PROVIDER.build_request(make_row(case["row"], line=5), RequestContext(**case["ctx"]))
    assert_request_matches(request, case["expected"])


@pytest.mark.parametrize("case", RESPONSES, ids=[c["name"] for c in RESPONSES])
def test_parse_response_golden(case: dict[str, Any]) -> None:
    assert answer_dict(PROVIDER.parse_response(request_for(case), response_of(GOLDEN, case))) \
        == case["answer"]


@pytest.mark.parametrize("case", ERRORS, ids=[c["name"] for c in ERRORS])
def test_error_golden(case: dict[str, Any]) -> None:
    expected = case["error"]
    with pytest.raises(ProviderError) as info:
        PROVIDER.parse_response(request_for(case), response_of(GOLDEN, case))
    assert type(info.value) is getattr(errors, expected["class"]), info.value
    assert info.value.status == expected["status"]
    if "retry_after" in expected:
        assert getattr(info.value, "retry_after", None) == expected["retry_after"]


def test_default_max_tokens_is_the_stated_constant() -> None:
    assert DEFAULT_ANTHROPIC_MAX_TOKENS == 1024
    row = RequestRow(id="1", shape="prompt", source="s", line=1, prompt="x")
    request = PROVIDER.build_request(row, RequestContext(base_url="http://h/v1", model="c"))
    assert orjson.loads(request.body)["max_tokens"] == DEFAULT_ANTHROPIC_MAX_TOKENS


def test_stream_cut_at_any_point_before_message_stop_is_an_error() -> None:
    full = (GOLDEN / "stream_complete.sse").read_bytes()
    stop_at = full.index(b"event: message_stop")
    req = HttpRequest("POST", "u", {}, b"", stream=True)
    for cut in range(0, stop_at, 11):
        with pytest.raises(InvalidResponse):
            PROVIDER.parse_response(req, HttpResponse(200, {}, full[:cut]))
    assert PROVIDER.parse_response(req, HttpResponse(200, {}, full)).output == "Hello!你好"


def test_crlf_stream() -> None:
    full = (GOLDEN / "stream_tool_use.sse").read_bytes()
    req = HttpRequest("POST", "u", {}, b"", stream=True)
    assert PROVIDER.parse_response(req, HttpResponse(200, {}, full.replace(b"\n", b"\r\n"))) \
        == PROVIDER.parse_response(req, HttpResponse(200, {}, full))


def test_batch_rows_and_missing_model_are_input_errors() -> None:
    ctx = RequestContext(base_url="http://h/v1", model=None)
    with pytest.raises(InputError) as info:
        PROVIDER.build_request(RequestRow(id="1", shape="prompt", source="s", line=2,
                                          prompt="x"), ctx)
    assert info.value.field == "model"
    with pytest.raises(InputError):
        PROVIDER.build_request(RequestRow(id="1", shape="batch", source="s", line=2,
                                          url="/v1/chat/completions", body={}), ctx)
    only_system = RequestRow(id="1", shape="messages", source="s", line=3,
                             messages=[{"role": "system", "content": "x"}])
    with pytest.raises(InputError):
        PROVIDER.build_request(only_system, RequestContext(base_url="http://h/v1", model="c"))
