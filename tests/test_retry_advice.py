"""Reading the server's wait advice from headers, and joining base URLs (pure functions)."""

from __future__ import annotations

import email.utils

import pytest

from batcher.errors import RateLimited, ServerError
from batcher.providers.base import (
    error_for_status,
    join_url,
    parse_duration,
    retry_after_seconds,
)
from batcher.types import HttpResponse


@pytest.mark.parametrize(("text", "seconds"), [
    ("20ms", 0.02), ("1s", 1.0), ("6m0s", 360.0), ("1m30.5s", 90.5), ("2h", 7200.0),
    ("1.5", 1.5), ("0", 0.0), ("", None), ("soon", None), ("5x", None), ("1s2", None),
])
def test_parse_duration(text: str, seconds: float | None) -> None:
    assert parse_duration(text) == (pytest.approx(seconds) if seconds is not None else None)


def test_retry_after_prefers_ms_then_seconds_then_http_date_then_resets() -> None:
    assert retry_after_seconds({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert retry_after_seconds({"retry-after": "3"}) == 3.0
    now = 1_800_000_000.0
    date = email.utils.formatdate(now + 42, usegmt=True)
    assert retry_after_seconds({"retry-after": date}, now=now) == pytest.approx(42, abs=1)
    assert retry_after_seconds({"retry-after": email.utils.formatdate(now - 10, usegmt=True)},
                               now=now) == 0.0
    assert retry_after_seconds({"x-ratelimit-reset-requests": "20ms",
                                "x-ratelimit-reset-tokens": "6m0s"}) == 360.0
    assert retry_after_seconds({"retry-after": "garbage"}) is None
    assert retry_after_seconds({}) is None



def test_litellm_upstream_retry_after_is_read() -> None:
    # LiteLLM's proxy forwards an upstream 429's advice only under its llm_provider- prefix.
    assert retry_after_seconds({"llm_provider-retry-after": "7"}) == 7.0
    assert retry_after_seconds({"llm_provider-retry-after-ms": "1500",
                                "llm_provider-retry-after": "9"}) == 1.5
    now = 1_800_000_000.0
    date = email.utils.formatdate(now + 30, usegmt=True)
    assert retry_after_seconds({"llm_provider-retry-after": date}, now=now) == \
        pytest.approx(30, abs=1)
    # Proxy and upstream both advise: the longer wait; either beats the reset headers.
    assert retry_after_seconds({"retry-after": "2", "llm_provider-retry-after": "5"}) == 5.0
    assert retry_after_seconds({"retry-after": "8", "llm_provider-retry-after": "5"}) == 8.0
    assert retry_after_seconds({"llm_provider-retry-after": "4",
                                "x-ratelimit-reset-requests": "6m0s"}) == 4.0
    assert retry_after_seconds({"llm_provider-retry-after": "garbage"}) is None
    # Not numbers of seconds: a NaN would mean "retry now", an infinity "never".
    assert retry_after_seconds({"retry-after-ms": "nan", "retry-after": "2"}) == 2.0
    assert retry_after_seconds({"retry-after": "nan"}) is None
    assert retry_after_seconds({"llm_provider-retry-after": "inf"}) is None


@pytest.mark.parametrize(("status", "kind"), [(429, RateLimited), (503, ServerError)])
def test_litellm_retry_after_reaches_the_typed_error(status: int, kind: type) -> None:
    error = error_for_status(HttpResponse(status, {"llm_provider-retry-after": "3"},
                                          b'{"error": {"message": "slow down"}}'))
    assert isinstance(error, kind) and error.retry_after == 3.0

def test_a_5xx_takes_only_a_stated_retry_after_but_a_429_also_the_windows_reset() -> None:
    resets = {"x-ratelimit-reset-requests": "20s", "x-ratelimit-reset-tokens": "6m0s"}
    body = b'{"error": {"message": "boom"}}'
    assert error_for_status(HttpResponse(500, resets, body)).retry_after is None
    assert error_for_status(HttpResponse(503, {**resets, "retry-after": "2"},
                                         body)).retry_after == 2.0
    assert error_for_status(HttpResponse(429, resets, body)).retry_after == 360.0


@pytest.mark.parametrize(("base", "path", "url"), [
    ("https://api.openai.com/v1", "/chat/completions", "https://api.openai.com/v1/chat/completions"),
    ("https://api.openai.com/v1/", "chat/completions", "https://api.openai.com/v1/chat/completions"),
    ("http://h/v1", "/v1/chat/completions", "http://h/v1/chat/completions"),
    ("http://h/v1beta", "/models/m:generateContent", "http://h/v1beta/models/m:generateContent"),
    ("http://gw/openai/v1", "/v1/embeddings", "http://gw/openai/v1/embeddings"),
    ("http://h", "/v1/chat/completions", "http://h/v1/chat/completions"),
])
def test_join_url_never_doubles_the_version(base: str, path: str, url: str) -> None:
    assert join_url(base, path) == url
