"""Golden tests of the Gemini generateContent adapter: requests, answers and errors."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from batcher import errors
from batcher.errors import InputError, ProviderError
from batcher.providers import get_provider
from batcher.providers.gemini import retry_info_seconds
from batcher.types import HttpRequest, HttpResponse, RequestContext, RequestRow
from tests.golden_cases import (
    GOLDEN_ROOT,
    answer_dict,
    assert_request_matches,
    load,
    make_row,
    response_of,
)

GOLDEN = GOLDEN_ROOT / "gemini"
PROVIDER = get_provider("gemini")


REQUEST = HttpRequest("POST", "http://h/v1beta/models/m:generateContent", {}, b"{}", model="m")


REQUESTS = load(GOLDEN, "requests.json")
RESPONSES = load(GOLDEN, "responses.json")
ERRORS = load(GOLDEN, "errors.json")


@pytest.mark.parametrize("case", REQUESTS, ids=[c["name"] for c in REQUESTS])
def test_build_request_golden(case: dict[str, Any]) -> None:
    request = PROVIDER.build_request(make_row(case["row"], line=9), RequestContext(**case["ctx"]))
    assert_request_matches(request, case["expected"])


@pytest.mark.parametrize("case", RESPONSES, ids=[c["name"] for c in RESPONSES])
def test_parse_response_golden(case: dict[str, Any]) -> None:
    assert answer_dict(PROVIDER.parse_response(REQUEST, response_of(GOLDEN, case))) == case["answer"]


@pytest.mark.parametrize("case", ERRORS, ids=[c["name"] for c in ERRORS])
def test_error_golden(case: dict[str, Any]) -> None:
    expected = case["error"]
    with pytest.raises(ProviderError) as info:
        PROVIDER.parse_response(REQUEST, response_of(GOLDEN, case))
    assert type(info.value) is getattr(errors, expected["class"]), info.value
    assert info.value.status == expected["status"]
    if "retry_after" in expected:
        assert getattr(info.value, "retry_after", None) == expected["retry_after"]


@pytest.mark.parametrize(("delay", "seconds"), [
    ("2s", 2.0), ("1.5s", 1.5), ("0.250s", 0.25), ({"seconds": 3, "nanos": 500000000}, 3.5),
    ("soon", None),
])
def test_retry_info_delays(delay: Any, seconds: float | None) -> None:
    err = {"details": [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": delay}]}
    assert retry_info_seconds(err) == seconds


def test_key_goes_in_a_header_not_the_url() -> None:
    row = RequestRow(id="1", shape="prompt", source="s", line=1, prompt="x")
    request = PROVIDER.build_request(row, RequestContext(base_url="http://h/v1beta",
                                                         model="gemini-2.0-flash",
                                                         api_key="AIza-SECRET"))
    assert "AIza-SECRET" not in request.url
    assert request.headers["x-goog-api-key"] == "AIza-SECRET"


@pytest.mark.parametrize("messages", [
    [{"role": "tool", "content": "x"}],
    [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}],
    [{"role": "system", "content": "only a system message"}],
    [{"role": "user", "content": 5}],
])
def test_unsendable_messages_are_input_errors(messages: list[dict[str, Any]]) -> None:
    row = RequestRow(id="1", shape="messages", source="m.jsonl", line=4, messages=messages)
    with pytest.raises(InputError) as info:
        PROVIDER.build_request(row, RequestContext(base_url="http://h/v1beta", model="g"))
    assert info.value.field == "messages"
    assert info.value.line == 4


def test_missing_model() -> None:
    row = RequestRow(id="1", shape="prompt", source="s", line=1, prompt="x")
    with pytest.raises(InputError) as info:
        PROVIDER.build_request(row, RequestContext(base_url="http://h/v1beta", model=None))
    assert info.value.field == "model"


def test_daily_quota_failure_without_retry_info_is_quota_exhausted() -> None:
    from batcher.errors import QuotaExhausted, RateLimited
    from batcher.providers.gemini import gemini_error
    from batcher.types import HttpResponse

    def answer(details: list[dict[str, object]]) -> HttpResponse:
        body = {"error": {"code": 429, "status": "RESOURCE_EXHAUSTED", "message": "quota",
                          "details": details}}
        return HttpResponse(429, {}, orjson.dumps(body))

    daily = {"@type": "type.googleapis.com/google.rpc.QuotaFailure",
             "violations": [{"quotaId": "GenerateRequestsPerDayPerProjectPerModel"}]}
    minute = {"@type": "type.googleapis.com/google.rpc.QuotaFailure",
              "violations": [{"quotaId": "GenerateRequestsPerMinutePerProjectPerModel"}]}
    retry = {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "3s"}
    assert isinstance(gemini_error(answer([daily])), QuotaExhausted)
    per_minute = gemini_error(answer([minute, retry]))
    assert isinstance(per_minute, RateLimited) and per_minute.retry_after == 3.0
    assert isinstance(gemini_error(answer([daily, retry])), RateLimited)
