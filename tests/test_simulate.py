"""The simulator: wire formats of every endpoint, faults, limits, stats and its lifecycle."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import math
import os
import re
import signal
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from batcher.simulate import (
    SIM_OPTIONS,
    STATS_KEY,
    SimConfig,
    SimulatorThread,
    Stats,
    answer_text,
    count_tokens,
    make_app,
    sim_config_from,
)
from batcher.simulator.limits import IntervalLimiter, SliceLimiter
from batcher.simulator.run import SHUTDOWN_TIMEOUT_S

ROOT = Path(__file__).resolve().parents[1]
CHAT = "/v1/chat/completions"
USER_HELLO = {"messages": [{"role": "user", "content": "hello"}]}


Client = TestClient[web.Request, web.Application]


class FakeClock:
    """A monotonic clock the test moves by hand (seconds)."""

    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@asynccontextmanager
async def served(config: SimConfig | None = None,
                 clock: FakeClock | None = None) -> AsyncIterator[Client]:
    app = make_app(config or SimConfig(), **({"clock": clock} if clock else {}))
    server = TestServer(app, host="127.0.0.1")
    async with server, Client(server) as client:
        yield client


async def post(client: Client, path: str, body: Any,
               headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    async with client.post(path, data=data, headers={"Content-Type": "application/json",
                                                     **(headers or {})}) as resp:
        return resp.status, {k.lower(): v for k, v in resp.headers.items()}, await resp.read()


def stats_of(client: Client) -> Stats:
    return client.app[STATS_KEY]


def sse_data(raw: bytes) -> list[str]:
    return [line[len("data: "):] for line in raw.decode().split("\n") if line.startswith("data: ")]


def sse_events(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for block in raw.decode().split("\n\n"):
        if not block.strip():
            continue
        lines = dict(line.split(": ", 1) for line in block.split("\n"))
        out.append((lines["event"], orjson.loads(lines["data"])))
    return out


# --- normal answers ---------------------------------------------------------------------


async def test_chat_answer_shape_is_deterministic_and_counts_tokens() -> None:
    body = {"model": "gpt-test", "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the capital of France?"}]}
    async with served() as client:
        status, headers, raw = await post(client, CHAT, body)
        _, _, again = await post(client, CHAT, body)
        _, _, no_model = await post(client, CHAT, USER_HELLO)
    assert status == 200 and headers["content-type"].startswith("application/json")
    data, data2 = orjson.loads(raw), orjson.loads(again)
    assert data["id"].startswith("chatcmpl-") and data["id"] != data2["id"]
    assert data["object"] == "chat.completion" and isinstance(data["created"], int)
    assert data["model"] == "gpt-test"
    choice = data["choices"][0]
    tag = hashlib.sha1(b"What is the capital of France?").hexdigest()[:8]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"].startswith(f"Simulated answer #{tag}: ")
    assert choice["message"]["content"] == data2["choices"][0]["message"]["content"]
    assert choice["finish_reason"] == "stop"
    usage = data["usage"]
    assert usage["prompt_tokens"] == math.ceil(len("Be brief.What is the capital of France?") / 4)
    assert usage["completion_tokens"] == count_tokens(choice["message"]["content"])
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["prompt_tokens_details"] == {"cached_tokens": 0}
    assert usage["completion_tokens_details"] == {"reasoning_tokens": 0}
    assert orjson.loads(no_model)["model"] == "sim-model"


def test_answer_length_is_around_answer_tokens() -> None:
    for target in (8, 16, 64):
        lengths = [count_tokens(answer_text(f"prompt {i}", target)) for i in range(50)]
        assert all(0.75 * target - 1 <= n <= 1.25 * target + 1 for n in lengths), lengths
        assert len(set(lengths)) > 1  # varies with the prompt


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
async def test_chat_length_finish_when_max_tokens_is_small(field: str) -> None:
    async with served(SimConfig(answer_tokens=32)) as client:
        _, _, full = await post(client, CHAT, USER_HELLO)
        status, _, raw = await post(client, CHAT, {**USER_HELLO, field: 5})
        _, _, roomy = await post(client, CHAT, {**USER_HELLO, field: 1000})
    full_text = orjson.loads(full)["choices"][0]["message"]["content"]
    data = orjson.loads(raw)
    assert status == 200
    assert data["choices"][0]["finish_reason"] == "length"
    text = data["choices"][0]["message"]["content"]
    assert full_text.startswith(text) and len(text) < len(full_text)
    assert 1 <= data["usage"]["completion_tokens"] <= 5
    assert orjson.loads(roomy)["choices"][0]["finish_reason"] == "stop"


async def test_chat_rejects_bad_requests_with_openai_errors() -> None:
    async with served() as client:
        no_messages = await post(client, CHAT, {"model": "m"})
        bad_messages = await post(client, CHAT, {"messages": "hi"})
        not_json = await post(client, CHAT, b"{not json")
        bad_max = await post(client, CHAT, {**USER_HELLO, "max_tokens": 0})
    for status, _, raw in (no_messages, bad_messages, not_json, bad_max):
        assert status == 400
        err = orjson.loads(raw)["error"]
        assert err["type"] == "invalid_request_error" and err["message"]
    assert orjson.loads(no_messages[2])["error"]["param"] == "messages"
    assert orjson.loads(bad_max[2])["error"]["param"] == "max_tokens"


async def test_chat_stream_with_usage_and_done() -> None:
    async with served() as client:
        _, _, plain = await post(client, CHAT, {**USER_HELLO, "model": "m"})
        status, headers, raw = await post(client, CHAT, {
            **USER_HELLO, "model": "m", "stream": True,
            "stream_options": {"include_usage": True}})
        _, _, bare = await post(client, CHAT, {**USER_HELLO, "stream": True})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    data = sse_data(raw)
    assert data[-1] == "[DONE]"
    chunks = [orjson.loads(d) for d in data[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "m" for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    expected = orjson.loads(plain)["choices"][0]["message"]["content"]
    assert text == expected
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == count_tokens(expected)
    bare_chunks = [orjson.loads(d) for d in sse_data(bare)[:-1]]
    assert sse_data(bare)[-1] == "[DONE]"
    assert all(c["choices"] and "usage" not in c for c in bare_chunks)


async def test_omit_stream_usage_ignores_include_usage() -> None:
    asked = {"stream": True, "stream_options": {"include_usage": True}}
    async with served(SimConfig(omit_stream_usage=True)) as client:
        _, _, chat = await post(client, CHAT, {**USER_HELLO, "model": "m", **asked})
        _, _, plain = await post(client, CHAT, {**USER_HELLO, "model": "m"})
    data = sse_data(chat)
    assert data[-1] == "[DONE]"
    chunks = [orjson.loads(d) for d in data[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert all(c["choices"] and not c.get("usage") for c in chunks)
    assert orjson.loads(plain)["usage"]["total_tokens"] > 0  # only streams lose it


async def test_legacy_completions() -> None:
    async with served() as client:
        status, _, raw = await post(client, "/v1/completions",
                                    {"model": "inst", "prompt": "天气非常好", "logprobs": 1})
        _, _, many = await post(client, "/v1/completions",
                                {"prompt": ["a", "b"], "max_tokens": 2})
        missing = await post(client, "/v1/completions", {"model": "inst"})
    data = orjson.loads(raw)
    assert status == 200 and data["object"] == "text_completion" and data["model"] == "inst"
    assert data["choices"][0]["text"] == answer_text("天气非常好", 16)
    assert data["choices"][0]["finish_reason"] == "stop"
    assert data["usage"]["prompt_tokens"] == 2  # 5 characters
    two = orjson.loads(many)
    assert [c["index"] for c in two["choices"]] == [0, 1]
    assert all(c["finish_reason"] == "length" for c in two["choices"])
    assert missing[0] == 400


async def test_embeddings_are_deterministic_unit_vectors() -> None:
    async with served() as client:
        status, _, raw = await post(client, "/v1/embeddings", {"model": "emb", "input": "x"})
        _, _, listed = await post(client, "/v1/embeddings",
                                  {"input": ["x", "other"], "dimensions": 3})
        _, _, b64 = await post(client, "/v1/embeddings",
                               {"input": ["x"], "dimensions": 3, "encoding_format": "base64"})
        bad = await post(client, "/v1/embeddings", {"input": 5})
    data = orjson.loads(raw)
    assert status == 200 and data["object"] == "list" and data["model"] == "emb"
    vector = data["data"][0]["embedding"]
    assert data["data"][0]["object"] == "embedding" and data["data"][0]["index"] == 0
    assert len(vector) == 8 and abs(sum(v * v for v in vector) - 1) < 1e-4
    assert data["usage"] == {"prompt_tokens": 1, "total_tokens": 1}
    two = orjson.loads(listed)["data"]
    assert [len(d["embedding"]) for d in two] == [3, 3]
    assert two[0]["embedding"] != two[1]["embedding"]
    decoded = struct.unpack("<3f", base64.b64decode(orjson.loads(b64)["data"][0]["embedding"]))
    assert decoded == pytest.approx(two[0]["embedding"], abs=1e-6)
    assert bad[0] == 400


async def test_anthropic_messages() -> None:
    body = {"model": "claude-x", "max_tokens": 100, "system": [{"type": "text", "text": "Sys"}],
            "messages": [{"role": "user", "content": [{"type": "text", "text": "Hello!"}]}]}
    headers = {"anthropic-version": "2023-06-01"}
    async with served() as client:
        status, _, raw = await post(client, "/v1/messages", body, headers)
        _, _, short = await post(client, "/v1/messages", {**body, "max_tokens": 3}, headers)
        missing = await post(client, "/v1/messages", {"model": "c", "messages": body["messages"]})
    data = orjson.loads(raw)
    assert status == 200 and data["id"].startswith("msg_")
    assert (data["type"], data["role"], data["model"]) == ("message", "assistant", "claude-x")
    assert data["content"][0]["type"] == "text"
    assert data["content"][0]["text"] == answer_text("Hello!", 16)
    assert data["stop_reason"] == "end_turn" and data["stop_sequence"] is None
    assert data["usage"]["input_tokens"] == math.ceil(len("SysHello!") / 4)
    assert data["usage"]["output_tokens"] == count_tokens(data["content"][0]["text"])
    assert data["usage"]["cache_read_input_tokens"] == 0
    assert orjson.loads(short)["stop_reason"] == "max_tokens"
    assert missing[0] == 400
    err = orjson.loads(missing[2])
    assert err["type"] == "error" and err["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in err["error"]["message"]


async def test_anthropic_stream_events() -> None:
    body = {"model": "claude-x", "max_tokens": 100, "stream": True,
            "messages": [{"role": "user", "content": "Hi"}]}
    async with served() as client:
        status, headers, raw = await post(client, "/v1/messages", body)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = sse_events(raw)
    names = [name for name, _ in events]
    assert names[:2] == ["message_start", "content_block_start"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert all(data["type"] == name for name, data in events)
    text = "".join(d["delta"]["text"] for n, d in events if n == "content_block_delta")
    assert text == answer_text("Hi", 16)
    delta = events[-2][1]
    assert delta["delta"]["stop_reason"] == "end_turn"
    assert delta["usage"]["output_tokens"] == count_tokens(text)
    assert events[0][1]["message"]["usage"]["input_tokens"] == 1


async def test_gemini_generate_content_and_stream() -> None:
    body = {"systemInstruction": {"parts": [{"text": "Sys"}]},
            "contents": [{"role": "user", "parts": [{"text": "Hello"}]}],
            "generationConfig": {"maxOutputTokens": 500, "temperature": 0}}
    path = "/v1beta/models/gemini-test:generateContent"
    async with served(SimConfig(require_key="g-key")) as client:
        status, _, raw = await post(client, path + "?key=g-key", body)
        _, _, short = await post(client, path, {**body, "generationConfig": {
            "maxOutputTokens": 2}}, {"x-goog-api-key": "g-key"})
        _, headers, streamed = await post(
            client, "/v1beta/models/gemini-test:streamGenerateContent?alt=sse", body,
            {"x-goog-api-key": "g-key"})
        no_contents = await post(client, path + "?key=g-key", {"contents": []})
        unauthorised = await post(client, path + "?key=wrong", body)
    data = orjson.loads(raw)
    assert status == 200
    candidate = data["candidates"][0]
    assert candidate["content"]["role"] == "model"
    assert candidate["content"]["parts"][0]["text"] == answer_text("Hello", 16)
    assert candidate["finishReason"] == "STOP"
    usage = data["usageMetadata"]
    assert usage["promptTokenCount"] == 2
    assert usage["totalTokenCount"] == usage["promptTokenCount"] + usage["candidatesTokenCount"]
    assert data["modelVersion"] == "gemini-test" and data["responseId"]
    assert orjson.loads(short)["candidates"][0]["finishReason"] == "MAX_TOKENS"
    assert headers["content-type"].startswith("text/event-stream")
    chunks = [orjson.loads(d) for d in sse_data(streamed)]
    text = "".join(c["candidates"][0]["content"]["parts"][0]["text"] for c in chunks)
    assert text == answer_text("Hello", 16)
    assert chunks[-1]["candidates"][0]["finishReason"] == "STOP"
    assert no_contents[0] == 400
    assert orjson.loads(no_contents[2])["error"]["status"] == "INVALID_ARGUMENT"
    assert unauthorised[0] == 401 and b"wrong" not in unauthorised[2]


# --- faults -----------------------------------------------------------------------------


async def test_scripted_faults_come_in_order_then_normal() -> None:
    script = ("500", "429:retry-after=2", "429:retry-after-ms=50", "429", "524",
              "invalid-json", "401", "400", "ok", "503")
    async with served(SimConfig(script=script)) as client:
        answers = [await post(client, CHAT, USER_HELLO) for _ in range(len(script) + 1)]
        stats = stats_of(client)
    statuses = [status for status, _, _ in answers]
    assert statuses == [500, 429, 429, 429, 524, 200, 401, 400, 200, 503, 200]
    assert orjson.loads(answers[0][2])["error"]["type"] == "server_error"
    assert answers[1][1]["retry-after"] == "2" and "retry-after-ms" not in answers[1][1]
    assert answers[2][1]["retry-after-ms"] == "50" and "retry-after" not in answers[2][1]
    assert "retry-after" not in answers[3][1] and "retry-after-ms" not in answers[3][1]
    assert orjson.loads(answers[1][2])["error"]["code"] == "rate_limit_exceeded"
    assert answers[4][1]["content-type"].startswith("text/html")
    assert b"524" in answers[4][2] and b"<html" in answers[4][2]
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(answers[5][2])
    assert orjson.loads(answers[6][2])["error"]["code"] == "invalid_api_key"
    assert orjson.loads(answers[8][2])["choices"][0]["finish_reason"] == "stop"
    assert stats.ok == 2 and stats.requests == 11
    assert stats.faults["429"] == 3 and stats.faults["invalid-json"] == 1
    assert stats.by_status[429] == 3 and stats.by_status[200] == 3


async def test_scripted_drop_closes_the_connection() -> None:
    async with served(SimConfig(script=("drop",))) as client:
        with pytest.raises(aiohttp.ServerDisconnectedError):
            await post(client, CHAT, USER_HELLO)
        status, _, _ = await post(client, CHAT, USER_HELLO)
        assert status == 200
        assert stats_of(client).faults == {"drop": 1}


async def test_cut_stream_ends_without_done() -> None:
    chat = {**USER_HELLO, "stream": True}
    anthropic = {"max_tokens": 50, "stream": True, "messages": USER_HELLO["messages"]}
    async with served(SimConfig(script=("cut-stream", "cut-stream", "cut-stream"))) as client:
        for path, body, marker in ((CHAT, chat, b"[DONE]"),
                                   ("/v1/messages", anthropic, b"message_stop")):
            received = b""
            with pytest.raises(aiohttp.ClientPayloadError):
                async with client.post(path, json=body) as resp:
                    assert resp.status == 200
                    async for line in resp.content:
                        received += line
            assert received.startswith(b"data: {") or received.startswith(b"event: ")
            assert marker not in received
        with pytest.raises(aiohttp.ClientPayloadError):  # not streamed: the body is cut
            await post(client, CHAT, USER_HELLO)
        assert stats_of(client).ok == 0


async def test_random_faults_are_seeded_and_one_per_request() -> None:
    config = SimConfig(fail_rate=0.2, rate_429=0.2, rate_429_bare=0.1, rate_524=0.1,
                       rate_invalid_json=0.1, seed=7, retry_after_s=0.5)

    async def statuses() -> tuple[list[tuple[int, str | None, bool]], int]:
        async with served(config) as client:
            out = []
            for i in range(60):
                status, headers, raw = await post(client, CHAT, {
                    "messages": [{"role": "user", "content": f"q{i}"}]})
                try:
                    valid = isinstance(orjson.loads(raw), dict)
                except orjson.JSONDecodeError:
                    valid = False
                out.append((status, headers.get("retry-after"), valid))
            return out, stats_of(client).ok

    (first, ok), (second, _) = await statuses(), await statuses()
    assert first == second  # the same seed gives the same faults
    counts = {s: sum(1 for status, _, _ in first if status == s) for s in (200, 429, 500, 524)}
    assert all(counts[s] > 0 for s in counts), counts
    assert {(s, r) for s, r, _ in first} >= {(429, "0.5"), (429, None)}
    invalid = sum(1 for status, _, valid in first if status == 200 and not valid)
    assert 0 < invalid < counts[200]
    assert ok == counts[200] - invalid


async def test_fail_rate_on_anthropic_answers_overloaded() -> None:
    body = {"max_tokens": 10, "messages": [{"role": "user", "content": "x"}]}
    async with served(SimConfig(fail_rate=1.0)) as client:
        status, _, raw = await post(client, "/v1/messages", body)
        openai = await post(client, CHAT, USER_HELLO)
    assert status == 529
    assert orjson.loads(raw) == {"type": "error", "error": {
        "type": "overloaded_error", "message": orjson.loads(raw)["error"]["message"]}}
    assert openai[0] == 500


async def test_require_key_never_echoes_the_key() -> None:
    sent = "sk-wrong-secret-123456"
    async with served(SimConfig(require_key="sk-right")) as client:
        wrong = await post(client, CHAT, USER_HELLO, {"Authorization": f"Bearer {sent}"})
        missing = await post(client, CHAT, USER_HELLO)
        bearer = await post(client, CHAT, USER_HELLO, {"Authorization": "Bearer sk-right"})
        anthropic_wrong = await post(client, "/v1/messages",
                                     {"max_tokens": 5, "messages": USER_HELLO["messages"]},
                                     {"x-api-key": sent})
        anthropic_ok = await post(client, "/v1/messages",
                                  {"max_tokens": 5, "messages": USER_HELLO["messages"]},
                                  {"x-api-key": "sk-right"})
    for status, headers, raw in (wrong, missing):
        assert status == 401
        assert orjson.loads(raw)["error"]["code"] == "invalid_api_key"
        assert sent.encode() not in raw and "sk-right" not in raw.decode()
        assert all(sent not in v for v in headers.values())
    assert bearer[0] == 200 and anthropic_ok[0] == 200
    assert anthropic_wrong[0] == 401
    assert orjson.loads(anthropic_wrong[2])["error"]["type"] == "authentication_error"
    assert sent.encode() not in anthropic_wrong[2]


async def test_quota_exhausted_in_each_shape() -> None:
    async with served(SimConfig(quota_exhausted=True)) as client:
        openai = await post(client, CHAT, USER_HELLO)
        anthropic = await post(client, "/v1/messages",
                               {"max_tokens": 5, "messages": USER_HELLO["messages"]})
        gemini = await post(client, "/v1beta/models/g:generateContent",
                            {"contents": [{"parts": [{"text": "x"}]}]})
        assert stats_of(client).ok == 0
    assert openai[0] == anthropic[0] == gemini[0] == 429
    assert orjson.loads(openai[2])["error"]["code"] == "insufficient_quota"
    assert orjson.loads(anthropic[2])["error"]["type"] == "billing_error"
    assert orjson.loads(gemini[2])["error"]["status"] == "RESOURCE_EXHAUSTED"
    assert "retry-after" not in openai[1]


# --- rate limits ------------------------------------------------------------------------


async def test_rpm_is_enforced_in_one_second_slices() -> None:
    clock = FakeClock(100.2)
    async with served(SimConfig(rpm=600), clock) as client:
        first = await asyncio.gather(*(post(client, CHAT, USER_HELLO) for _ in range(30)))
        clock.now = 101.0  # the next slice
        second = await asyncio.gather(*(post(client, CHAT, USER_HELLO) for _ in range(12)))
        assert stats_of(client).rate_limited == 22
    ok = [a for a in first if a[0] == 200]
    limited = [a for a in first if a[0] == 429]
    assert len(ok) == 10 and len(limited) == 20
    for _, headers, raw in limited:
        assert headers["retry-after"] == "0.8" and headers["retry-after-ms"] == "800"
        assert headers["x-ratelimit-remaining-requests"] == "0"
        err = orjson.loads(raw)["error"]
        assert err["code"] == "rate_limit_exceeded" and err["type"] == "requests"
    assert {h["x-ratelimit-limit-requests"] for _, h, _ in ok} == {"600"}
    assert {h["x-ratelimit-reset-requests"] for _, h, _ in ok} == {"800ms"}
    remaining = sorted(int(h["x-ratelimit-remaining-requests"]) for _, h, _ in ok)
    assert remaining == list(range(10))
    assert sum(1 for a in second if a[0] == 200) == 10


async def test_rpm_with_the_real_clock() -> None:
    with SimulatorThread(SimConfig(rpm=600)) as sim:
        async with aiohttp.ClientSession() as session:
            async def one() -> tuple[int, str | None]:
                async with session.post(sim.base_url + "/chat/completions",
                                        json=USER_HELLO) as resp:
                    await resp.read()
                    return resp.status, resp.headers.get("retry-after")

            answers = await asyncio.gather(*(one() for _ in range(30)))
    ok = sum(1 for status, _ in answers if status == 200)
    assert 10 <= ok <= 20  # 10 per slice; the burst may straddle two slices
    for status, retry_after in answers:
        if status == 429:
            assert retry_after is not None and 0 <= float(retry_after) <= 1


async def test_tpm_counts_prompt_plus_max_tokens() -> None:
    clock = FakeClock(50.0)
    body = {"messages": [{"role": "user", "content": "abcd"}], "max_tokens": 5}  # 1 + 5
    async with served(SimConfig(tpm=600), clock) as client:  # 10 tokens per slice
        first = await post(client, CHAT, body)
        second = await post(client, CHAT, body)
        clock.now = 51.0
        big = await post(client, CHAT, {**body, "max_tokens": 25})  # 26 > 10: admitted alone
        clock.now = 52.0
        in_debt = await post(client, CHAT, body)
        clock.now = 54.0
        paid = await post(client, CHAT, body)
    assert first[0] == 200 and first[1]["x-ratelimit-remaining-tokens"] == "4"
    assert second[0] == 429
    assert orjson.loads(second[2])["error"]["type"] == "tokens"
    assert big[0] == 200
    assert in_debt[0] == 429 and float(in_debt[1]["retry-after"]) >= 1.0
    assert paid[0] == 200


async def test_rate_limit_shapes_on_anthropic_and_gemini_paths() -> None:
    clock = FakeClock(7.75)
    anthropic = {"max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}
    gemini = {"contents": [{"parts": [{"text": "x"}]}]}
    async with served(SimConfig(rpm=60), clock) as client:  # one request per slice
        a_ok = await post(client, "/v1/messages", anthropic)
        a_limited = await post(client, "/v1/messages", anthropic)
        g_limited = await post(client, "/v1beta/models/g:generateContent", gemini)
        clock.now = 8.0
        g_ok = await post(client, "/v1beta/models/g:generateContent", gemini)
    assert a_ok[0] == 200 and a_ok[1]["anthropic-ratelimit-requests-limit"] == "60"
    assert a_ok[1]["anthropic-ratelimit-requests-remaining"] == "0"
    assert a_ok[1]["anthropic-ratelimit-requests-reset"].endswith("Z")
    assert a_limited[0] == 429 and a_limited[1]["retry-after"] == "0.25"
    assert orjson.loads(a_limited[2])["error"]["type"] == "rate_limit_error"
    assert g_limited[0] == 429 and "retry-after" not in g_limited[1]
    error = orjson.loads(g_limited[2])["error"]
    assert error["status"] == "RESOURCE_EXHAUSTED"
    assert error["details"][0]["retryDelay"] == "0.25s"
    assert g_ok[0] == 200 and not any(h.startswith("x-ratelimit") for h in g_ok[1])


def test_slice_limiter_averages_fractional_rates() -> None:
    limiter = SliceLimiter(90)  # 1.5 per second
    admitted = []
    for second in range(10):
        admitted.append(sum(limiter.try_take(second + 0.5, 1) for _ in range(5)))
    assert sorted(set(admitted)) == [1, 2] and sum(admitted) == 15
    slow = SliceLimiter(30)  # one every other second
    assert sum(slow.try_take(s + 0.1, 1) for s in range(10)) == 5
    assert not slow.try_take(3.5, 1) or not slow.try_take(3.6, 1)


def test_interval_limiter_admits_one_per_interval_since_the_last_admitted() -> None:
    limiter = IntervalLimiter(1200)  # nginx rate=20r/s: one per 50 ms, no burst
    assert limiter.interval == pytest.approx(0.05)
    assert limiter.try_take(100.0)
    assert not limiter.try_take(100.0)  # back to back: refused
    assert not limiter.try_take(100.049)
    assert limiter.wait(100.02) == pytest.approx(0.03)
    assert limiter.try_take(100.05)  # exactly one interval later (despite float rounding)
    assert limiter.wait(100.05) == pytest.approx(0.05)
    assert not limiter.try_take(100.06)
    assert not limiter.try_take(100.099)
    assert limiter.try_take(100.1)  # 50 ms after the last *admitted*: refusals moved nothing
    assert limiter.wait(100.2) == 0.0


def test_interval_limiter_refusals_do_not_move_the_clock() -> None:
    # A client sending every 10 ms gets exactly every fifth request through, no more and no
    # fewer; were refusals to restart the interval, nothing after the first would pass.
    limiter = IntervalLimiter(1200)
    admitted = [i for i in range(101) if limiter.try_take(100.0 + i * 0.01)]
    assert admitted == list(range(0, 101, 5))
    # Unlike the one-second slices, which admit a slice's 20 requests at once.
    slices = SliceLimiter(1200)
    assert sum(slices.try_take(7.0, 1) for _ in range(25)) == 20
    strict = IntervalLimiter(1200)
    assert sum(strict.try_take(7.0) for _ in range(25)) == 1


def test_interval_limiter_slow_rates() -> None:
    limiter = IntervalLimiter(30)  # one per 2 s
    assert [limiter.try_take(t) for t in (0.0, 1.0, 1.999, 2.0, 3.9, 4.0)] == [
        True, False, False, True, False, True]
    with pytest.raises(ValueError):
        IntervalLimiter(0)


async def test_strict_rpm_answers_429_without_headers_unless_asked() -> None:
    clock = FakeClock(100.0)
    async with served(SimConfig(strict_rpm=1200), clock) as client:
        first = await post(client, CHAT, USER_HELLO)
        second = await post(client, CHAT, USER_HELLO)
        clock.now = 100.03
        third = await post(client, CHAT, USER_HELLO)
        clock.now = 100.05
        fourth = await post(client, CHAT, USER_HELLO)
        stats = stats_of(client)
        assert (stats.strict_admitted, stats.strict_refused, stats.rate_limited) == (2, 2, 0)
        assert stats.by_status == {200: 2, 429: 2}
        assert client.app[STATS_KEY].as_dict()["strict_refused"] == 2
    assert [a[0] for a in (first, second, third, fourth)] == [200, 429, 429, 200]
    for _, headers, raw in (second, third):
        assert "retry-after" not in headers and "retry-after-ms" not in headers
        assert not any(h.startswith("x-ratelimit") for h in headers)
        assert orjson.loads(raw)["error"]["code"] == "rate_limit_exceeded"


async def test_strict_retry_after_is_sent_when_asked_in_each_shape() -> None:
    clock = FakeClock(5.0)
    anthropic = {"max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}
    gemini = {"contents": [{"parts": [{"text": "x"}]}]}
    async with served(SimConfig(strict_rpm=60, strict_retry_after=1.5), clock) as client:
        ok = await post(client, CHAT, USER_HELLO)
        openai = await post(client, CHAT, USER_HELLO)
        claude = await post(client, "/v1/messages", anthropic)
        google = await post(client, "/v1beta/models/g:generateContent", gemini)
    assert ok[0] == 200
    assert openai[0] == 429 and openai[1]["retry-after"] == "1.5"
    assert claude[0] == 429 and claude[1]["retry-after"] == "1.5"
    assert orjson.loads(claude[2])["error"]["type"] == "rate_limit_error"
    assert google[0] == 429 and "retry-after" not in google[1]
    assert orjson.loads(google[2])["error"]["details"][0]["retryDelay"] == "1.5s"


async def test_strict_rpm_limits_before_the_key_check_and_the_slices() -> None:
    # A gateway refuses before anything behind it looks at the request: a refused request
    # with a wrong key gets 429, not 401, and takes nothing from the --rpm slices.
    clock = FakeClock(10.0)
    config = SimConfig(strict_rpm=600, rpm=60, require_key="sk-right")
    async with served(config, clock) as client:
        good = {"Authorization": "Bearer sk-right"}
        admitted = await post(client, CHAT, USER_HELLO, good)
        refused = await post(client, CHAT, USER_HELLO, {"Authorization": "Bearer sk-wrong"})
        clock.now = 11.0
        next_slice = await post(client, CHAT, USER_HELLO, good)
        clock.now = 11.5  # the strict interval (0.1 s) has passed, the slice is used up
        sliced = await post(client, CHAT, USER_HELLO, good)
        stats = stats_of(client)
        assert (stats.strict_admitted, stats.strict_refused, stats.rate_limited) == (3, 1, 1)
    assert [a[0] for a in (admitted, refused, next_slice, sliced)] == [200, 429, 200, 429]
    assert "retry-after" in sliced[1] and "retry-after" not in refused[1]


def test_strict_rpm_end_to_end_back_to_back(make_sim: Callable[..., SimulatorThread]) -> None:
    sim = make_sim(strict_rpm=60)  # one request per second: back to back is surely too soon

    def send() -> tuple[int, str | None]:
        request = urllib.request.Request(
            sim.base_url + "/chat/completions", data=orjson.dumps(USER_HELLO),
            headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=10) as resp:
                resp.read()
                return resp.status, resp.headers.get("retry-after")
        except urllib.error.HTTPError as exc:
            exc.read()
            return exc.code, exc.headers.get("retry-after")

    assert [send(), send()] == [(200, None), (429, None)]
    with urllib.request.urlopen(sim.root_url + "/_stats", timeout=10) as resp:
        stats = orjson.loads(resp.read())
    assert (stats["strict_admitted"], stats["strict_refused"]) == (1, 1)
    assert stats["by_status"] == {"200": 1, "429": 1} and stats["rate_limited"] == 0


# --- stats ------------------------------------------------------------------------------


async def test_resent_after_ok_counts_only_bodies_answered_ok_before() -> None:
    async with served(SimConfig(script=("500",))) as client:
        failed = await post(client, CHAT, {"messages": [{"role": "user", "content": "a"}]})
        retried = await post(client, CHAT, {"messages": [{"role": "user", "content": "a"}]})
        assert stats_of(client).resent_after_ok == 0  # a retry after a failure is not paid twice
        await post(client, CHAT, {"messages": [{"role": "user", "content": "b"}]})
        assert stats_of(client).resent_after_ok == 0
        await post(client, CHAT, {"messages": [{"role": "user", "content": "a"}]})
        await post(client, CHAT, {"messages": [{"role": "user", "content": "a"}]})
        assert stats_of(client).resent_after_ok == 2
    assert (failed[0], retried[0]) == (500, 200)


async def test_retry_delays_time_each_resend_of_a_body_answered_5xx() -> None:
    clock = FakeClock(10.0)
    a = {"messages": [{"role": "user", "content": "a"}]}
    b = {"messages": [{"role": "user", "content": "b"}]}
    async with served(SimConfig(script=("500", "ok", "503", "502")), clock) as client:
        assert (await post(client, CHAT, a))[0] == 500
        clock.now = 10.25
        await post(client, CHAT, b)                    # another body: not a retry
        clock.now = 10.5
        assert (await post(client, CHAT, a))[0] == 503   # a retry, 500 ms late; fails again
        clock.now = 10.52
        assert (await post(client, CHAT, a))[0] == 502   # 20 ms after that 503
        await post(client, CHAT, b)                    # b was answered ok: not a retry
        assert stats_of(client).retry_delays_ms == pytest.approx([500.0, 20.0])
        async with client.get("/_stats") as resp:
            summary = (await resp.json())["retry_delay_ms"]
    assert summary == {"count": 2, "p50": 20.0, "p90": 500.0, "p99": 500.0, "max": 500.0}


async def test_stats_endpoint_through_a_thread() -> None:
    with SimulatorThread(SimConfig(latency_ms=40)) as sim:
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/v1", sim.base_url)
        async with aiohttp.ClientSession() as session:
            async def one(model: str) -> int:
                async with session.post(sim.base_url + "/chat/completions",
                                        json={**USER_HELLO, "model": model}) as resp:
                    await resp.read()
                    return resp.status

            started = time.monotonic()
            statuses = await asyncio.gather(*(one("a" if i < 3 else "b") for i in range(5)))
            elapsed = time.monotonic() - started
            async with session.get(sim.root_url + "/_stats") as resp:
                remote = await resp.json()
            async with session.get(sim.base_url + "/models") as resp:
                models = {m["id"] for m in (await resp.json())["data"]}
        local = sim.stats.as_dict()
    assert statuses == [200] * 5 and elapsed >= 0.035
    assert remote == local
    assert remote["requests"] == remote["ok"] == 5 and remote["by_status"] == {"200": 5}
    assert remote["by_path"] == {"/v1/chat/completions": 5}
    assert remote["max_in_flight"] == 5 and remote["in_flight"] == 0
    assert remote["usage_by_model"]["a"]["requests"] == 3
    assert remote["usage_by_model"]["b"]["requests"] == 2
    per_answer = count_tokens(answer_text("hello", 16))
    assert remote["completion_tokens"] == 5 * per_answer
    assert remote["prompt_tokens"] == 5 * 2
    assert {"a", "b", "sim-model"} <= models


def test_thread_stops_quickly_with_a_hung_request() -> None:
    sim = SimulatorThread(SimConfig(script=("hang",))).start()
    outcome: list[str] = []

    def client() -> None:
        async def go() -> None:
            async with aiohttp.ClientSession() as session:
                try:
                    async with session.post(sim.base_url + "/chat/completions",
                                            json=USER_HELLO,
                                            timeout=aiohttp.ClientTimeout(total=10)) as resp:
                        outcome.append(str(resp.status))
                except aiohttp.ClientError as exc:
                    outcome.append(type(exc).__name__)
        asyncio.run(go())

    waiter = threading.Thread(target=client, daemon=True)
    waiter.start()
    deadline = time.monotonic() + 5
    while sim.stats.in_flight == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sim.stats.in_flight == 1
    started = time.monotonic()
    sim.stop()
    # Well under SHUTDOWN_TIMEOUT_S: the hang was released at shutdown, not timed out.
    assert time.monotonic() - started < 0.9 * SHUTDOWN_TIMEOUT_S
    assert sim._thread is not None and not sim._thread.is_alive()
    waiter.join(5)
    assert outcome and outcome[0] != "200"  # the client saw the connection close
    assert sim.stats.faults == {"hang": 1}


def test_thread_start_raises_when_the_port_is_taken() -> None:
    with SimulatorThread() as first:
        second = SimulatorThread(port=first.port)
        with pytest.raises(OSError):
            second.start()


async def test_unknown_path_answers_openai_404_json() -> None:
    async with served() as client:
        status, _, raw = await post(client, "/chat/completions", USER_HELLO)
        assert stats_of(client).requests == 0
    assert status == 404
    assert orjson.loads(raw)["error"]["message"] == "Invalid URL (POST /chat/completions)"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_prints_its_url_and_stops_on_a_signal(sig: signal.Signals) -> None:
    code = ("from batcher.simulate import serve, SimConfig; "
            "serve(SimConfig(answer_tokens=4), port=0)")
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True,
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        match = re.fullmatch(r"batcher simulate: listening on (http://127\.0\.0\.1:\d+/v1)\n",
                             line)
        assert match, line

        async def fetch() -> dict[str, Any]:
            async with aiohttp.ClientSession() as session:
                async with session.post(match.group(1) + "/chat/completions",
                                        json=USER_HELLO) as resp:
                    assert resp.status == 200
                async with session.get(match.group(1).removesuffix("/v1") + "/_stats") as resp:
                    data: dict[str, Any] = await resp.json()
                    return data

        assert asyncio.run(fetch())["ok"] == 1
        proc.send_signal(sig)
        assert proc.wait(5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --- configuration ----------------------------------------------------------------------


def test_sim_config_from_validates_and_names_the_option() -> None:
    config = sim_config_from(latency_ms=5.0, rpm=None, rate_429=0.25,
                             script=("429:retry-after=1,500", "ok"))
    assert config.latency_ms == 5.0 and config.rpm is None and config.rate_429 == 0.25
    assert config.script == ("429:retry-after=1", "500", "ok")
    assert sim_config_from(script="drop hang").script == ("drop", "hang")
    with pytest.raises(ValueError, match="--rate-429"):
        sim_config_from(rate_429=1.5)
    with pytest.raises(ValueError, match="sum must be at most 1"):
        sim_config_from(fail_rate=0.6, rate_drop=0.6)
    with pytest.raises(ValueError, match="--latency-ms"):
        sim_config_from(latency_ms=-1)
    with pytest.raises(ValueError, match="--rpm"):
        sim_config_from(rpm=0)
    assert sim_config_from(strict_rpm=1200.0).strict_rpm == 1200.0
    with pytest.raises(ValueError, match="--strict-rpm"):
        sim_config_from(strict_rpm=0)
    with pytest.raises(ValueError, match="--strict-retry-after needs --strict-rpm"):
        sim_config_from(strict_retry_after=1.0)
    with pytest.raises(ValueError, match="--strict-retry-after"):
        sim_config_from(strict_rpm=60, strict_retry_after=-1)
    with pytest.raises(ValueError, match="--script"):
        sim_config_from(script=("429:retry-after=soon",))
    with pytest.raises(ValueError, match="--script"):
        SimConfig(script=("teapot",))
    with pytest.raises(ValueError, match="--port"):
        sim_config_from(port=8000)
    assert {opt.name for opt in SIM_OPTIONS} <= set(SimConfig.__dataclass_fields__)
