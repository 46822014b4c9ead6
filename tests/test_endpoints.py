"""Every endpoint end to end through the CLI and the simulator: formats, streams, auth, errors."""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from aiohttp import web
from click.testing import Result

from batcher.simulate import SimConfig, SimulatorThread, answer_text, count_tokens
from batcher.simulator.wire import embedding_vector
from tests.conftest import prompts, read_output, run_cli, write_jsonl

SIM_ANSWER_TOKENS = SimConfig().answer_tokens
SIM_EMBEDDING_DIMENSIONS = 8
"""The simulator's vector size when a request names no ``dimensions``."""


def _run(base_url: str, input: Path, output: Path, *extra: str,
         model: str = "gpt-4o-mini", env: dict[str, str] | None = None) -> Result:
    return run_cli("run", input, "-o", output, "--base-url", base_url, "--model", model,
                   "--no-progress", *extra, env=env)


def _by_id(path: Path) -> dict[str, dict[str, Any]]:
    return {r["id"]: r for r in read_output(path)}


def _expected(prompt: str) -> str:
    """The simulator's full (uncut) answer to ``prompt``."""
    return answer_text(prompt, SIM_ANSWER_TOKENS)


def _assert_usage(row: dict[str, Any], prompt: str) -> None:
    """Usage as the simulator counts it (ceil(chars / 4)), mapped onto our columns."""
    assert row["prompt_tokens"] == count_tokens(prompt)
    assert row["completion_tokens"] == count_tokens(row["output"]) > 0
    assert row["total_tokens"] == row["prompt_tokens"] + row["completion_tokens"]


# --- completions and embeddings --------------------------------------------------------


def test_completions_endpoint_answers_prompt_rows(tmp_path: Path, sim: SimulatorThread) -> None:
    rows = [{**r, "max_tokens": 3 if i == 0 else 200} for i, r in enumerate(prompts(5))]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.parquet"
    result = _run(sim.base_url, src, out, "--endpoint", "completions", model="gpt-3.5-turbo-instruct")
    assert result.exit_code == 0, result.stderr
    got = _by_id(out)
    assert sorted(got) == [r["id"] for r in rows]
    for i, row in enumerate(rows):
        answer = got[row["id"]]
        assert answer["status"] == "ok" and answer["model"] == "gpt-3.5-turbo-instruct"
        _assert_usage(answer, row["prompt"])
        if i == 0:  # a 3-token cap cuts the answer
            assert answer["finish_reason"] == "length" and answer["finish_reason_raw"] == "length"
            assert _expected(row["prompt"]).startswith(answer["output"])
            assert answer["completion_tokens"] <= 3
        else:
            assert answer["finish_reason"] == "stop"
            assert answer["output"] == _expected(row["prompt"])
    assert sim.stats.by_path == {"/v1/completions": 5}


def test_completions_endpoint_refuses_messages_rows_as_row_errors(
        tmp_path: Path, sim: SimulatorThread) -> None:
    # the shape is detected per file: a messages file cannot be sent as text completions
    rows = [{"id": f"m{i}", "messages": [{"role": "user", "content": "hi"}]} for i in range(2)]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.parquet"
    result = _run(sim.base_url, src, out, "--endpoint", "completions")
    assert result.exit_code == 1, result.stderr
    for row in read_output(out):
        assert row["status"] == "error" and row["attempts"] == 0
        assert row["error_type"] == "input" and "chat" in row["error"]
    assert sim.stats.requests == 0


def test_embeddings_endpoint_writes_float32_vectors(tmp_path: Path, sim: SimulatorThread) -> None:
    rows = prompts(4)
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.parquet"
    # one row per request: each row's usage is its own
    result = _run(sim.base_url, src, out, "--endpoint", "embeddings", "--batch-size", "1",
                  model="text-embedding-3-small")
    assert result.exit_code == 0, result.stderr
    assert pq.read_schema(out).field("embedding").type == pa.list_(pa.float32())
    got = _by_id(out)
    for row in rows:
        answer = got[row["id"]]
        assert answer["status"] == "ok" and answer["model"] == "text-embedding-3-small"
        assert answer["output"] is None and answer["finish_reason"] is None
        assert answer["prompt_tokens"] == count_tokens(row["prompt"])
        assert answer["total_tokens"] == answer["prompt_tokens"]
        vector = answer["embedding"]
        assert len(vector) == SIM_EMBEDDING_DIMENSIONS
        # the simulator's vector for this very text (a unit vector), to float32 precision
        expected = embedding_vector(row["prompt"], SIM_EMBEDDING_DIMENSIONS)
        assert vector == pytest.approx(expected, abs=1e-6)
        assert math.isclose(math.fsum(v * v for v in vector), 1.0, rel_tol=1e-4)
    assert sim.stats.by_path == {"/v1/embeddings": 4}

    # the dimensions parameter reaches the server
    out16 = tmp_path / "out16.parquet"
    result = _run(sim.base_url, src, out16, "--endpoint", "embeddings", "-p", "dimensions=16",
                  "--batch-size", "1", model="text-embedding-3-small")
    assert result.exit_code == 0, result.stderr
    assert {len(r["embedding"]) for r in read_output(out16)} == {16}


def test_embeddings_rows_sharing_a_request_each_get_their_own_vector(
        tmp_path: Path, sim: SimulatorThread) -> None:
    rows = prompts(40)
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.parquet"
    result = _run(sim.base_url, src, out, "--endpoint", "embeddings", "--batch-size", "8",
                  "--concurrency", "2", model="text-embedding-3-small")
    assert result.exit_code == 0, result.stderr
    got = _by_id(out)
    assert sorted(got) == sorted(r["id"] for r in rows)
    for row in rows:
        answer = got[row["id"]]
        assert answer["status"] == "ok"
        expected = embedding_vector(row["prompt"], SIM_EMBEDDING_DIMENSIONS)
        assert answer["embedding"] == pytest.approx(expected, abs=1e-6)   # not a neighbour's
    assert 5 <= sim.stats.requests < 40             # rows did share requests, 8 at most each
    # each request's usage is shared out among its rows, none lost or counted twice
    assert sum(r["prompt_tokens"] for r in got.values()) == sim.stats.prompt_tokens


def test_batch_lines_pick_their_endpoint_from_url(tmp_path: Path, sim: SimulatorThread) -> None:
    lines = [
        {"custom_id": "chat", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}]}},
        {"custom_id": "cmpl", "method": "POST", "url": "/v1/completions",
         "body": {"model": "gpt-3.5-turbo-instruct", "prompt": "Once upon", "max_tokens": 2}},
        {"custom_id": "emb", "method": "POST", "url": "/v1/embeddings",
         "body": {"model": "text-embedding-3-small", "input": "a sentence", "dimensions": 4}},
    ]
    src = write_jsonl(tmp_path / "batch.jsonl", lines)
    out = tmp_path / "out.parquet"
    # --endpoint says chat, yet each line goes where its own url says
    result = _run(sim.base_url, src, out, "--endpoint", "chat")
    assert result.exit_code == 0, result.stderr
    got = _by_id(out)
    assert got["chat"]["output"] == _expected("hello") and got["chat"]["embedding"] is None
    assert got["cmpl"]["finish_reason"] == "length"
    assert _expected("Once upon").startswith(got["cmpl"]["output"])
    assert got["cmpl"]["model"] == "gpt-3.5-turbo-instruct"
    assert got["emb"]["output"] is None and len(got["emb"]["embedding"]) == 4
    assert sim.stats.by_path == {"/v1/chat/completions": 1, "/v1/completions": 1,
                                 "/v1/embeddings": 1}


def test_batch_line_with_unsupported_url_is_a_row_error(
        tmp_path: Path, sim: SimulatorThread) -> None:
    lines = [{"custom_id": "x", "method": "POST", "url": "/v1/responses",
              "body": {"model": "m", "input": "hi"}},
             {"custom_id": "y", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "m", "messages": [{"role": "user", "content": "hi"}]}}]
    src = write_jsonl(tmp_path / "batch.jsonl", lines)
    out = tmp_path / "out.parquet"
    result = _run(sim.base_url, src, out)
    assert result.exit_code == 1, result.stderr
    got = _by_id(out)
    assert got["x"]["status"] == "error" and "/v1/responses" in got["x"]["error"]
    assert got["y"]["status"] == "ok"
    assert sim.stats.requests == 1


# --- anthropic and gemini ----------------------------------------------------------------


def test_anthropic_endpoint_default_max_tokens_finish_reasons_and_usage(
        tmp_path: Path, sim: SimulatorThread) -> None:
    rows = [{**r, "max_tokens": 2} if i == 1 else r for i, r in enumerate(prompts(4))]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.parquet"
    # No max_tokens in the job: the simulator, like the real API, answers 400 without one,
    # so every ok row proves the default was sent.
    result = _run(sim.base_url, src, out, "--endpoint", "anthropic", "--system", "Be brief.",
                  model="claude-3-5-haiku-latest")
    assert result.exit_code == 0, result.stderr
    got = _by_id(out)
    for i, row in enumerate(rows):
        answer = got[row["id"]]
        assert answer["status"] == "ok" and answer["model"] == "claude-3-5-haiku-latest"
        assert answer["response_id"].startswith("msg_")
        # the system prompt travels as Anthropic's top-level system and is counted as input
        assert answer["prompt_tokens"] == count_tokens("Be brief." + row["prompt"])
        assert answer["completion_tokens"] == count_tokens(answer["output"])
        assert answer["total_tokens"] == answer["prompt_tokens"] + answer["completion_tokens"]
        if i == 1:
            assert (answer["finish_reason"], answer["finish_reason_raw"]) == ("length", "max_tokens")
            assert answer["completion_tokens"] <= 2
        else:
            assert (answer["finish_reason"], answer["finish_reason_raw"]) == ("stop", "end_turn")
            assert answer["output"] == _expected(row["prompt"])
    assert sim.stats.by_path == {"/v1/messages": 4}
    assert sim.stats.by_status == {200: 4}


def test_gemini_endpoint_finish_reasons_and_usage(tmp_path: Path, sim: SimulatorThread) -> None:
    rows = [{**r, "max_tokens": 2} if i == 0 else r for i, r in enumerate(prompts(3))]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.parquet"
    result = _run(sim.gemini_base_url, src, out, "--endpoint", "gemini", "-p", "temperature=0",
                  model="gemini-2.0-flash")
    assert result.exit_code == 0, result.stderr
    got = _by_id(out)
    for i, row in enumerate(rows):
        answer = got[row["id"]]
        assert answer["status"] == "ok" and answer["model"] == "gemini-2.0-flash"
        _assert_usage(answer, row["prompt"])
        if i == 0:
            assert (answer["finish_reason"], answer["finish_reason_raw"]) == ("length", "MAX_TOKENS")
        else:
            assert (answer["finish_reason"], answer["finish_reason_raw"]) == ("stop", "STOP")
            assert answer["output"] == _expected(row["prompt"])
    assert sim.stats.by_path == {"/v1beta/models/gemini-2.0-flash:generateContent": 3}


# --- streaming ---------------------------------------------------------------------------


@pytest.mark.parametrize(("endpoint", "model"), [("chat", "gpt-4o-mini"),
                                                 ("anthropic", "claude-3-5-haiku-latest")])
def test_streamed_answers_equal_plain_ones_with_ttft(
        tmp_path: Path, make_sim: Callable[..., SimulatorThread], endpoint: str,
        model: str) -> None:
    sim = make_sim(latency_ms=20)
    rows = prompts(6)
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    plain, streamed = tmp_path / "plain.parquet", tmp_path / "streamed.parquet"
    result = _run(sim.base_url, src, plain, "--endpoint", endpoint, model=model)
    assert result.exit_code == 0, result.stderr
    result = _run(sim.base_url, src, streamed, "--endpoint", endpoint, "-p", "stream=true",
                  "--keep-raw", model=model)
    assert result.exit_code == 0, result.stderr
    a, b = _by_id(plain), _by_id(streamed)
    for row in rows:
        p, s = a[row["id"]], b[row["id"]]
        assert s["status"] == "ok"
        for column in ("output", "finish_reason", "finish_reason_raw", "model",
                       "prompt_tokens", "completion_tokens", "total_tokens"):
            assert s[column] == p[column], column
        assert s["output"] == _expected(row["prompt"])
        assert p["ttft_ms"] is None                      # only streams have a first token
        assert s["ttft_ms"] is not None and 0 < s["ttft_ms"] <= s["latency_ms"]
        raw = s["raw"]                                   # --keep-raw keeps the SSE text
        if endpoint == "chat":
            assert raw.startswith("data: ") and raw.rstrip().endswith("data: [DONE]")
        else:
            assert raw.startswith("event: message_start") and "event: message_stop" in raw


@pytest.mark.parametrize(("endpoint", "model"), [("chat", "gpt-4o-mini"),
                                                 ("anthropic", "claude-3-5-haiku-latest")])
def test_cut_stream_is_retried_never_a_truncated_ok_row(
        tmp_path: Path, make_sim: Callable[..., SimulatorThread], endpoint: str,
        model: str) -> None:
    sim = make_sim(script=("cut-stream", "ok"))
    [row] = prompts(1)
    src = write_jsonl(tmp_path / "in.jsonl", [row])
    out = tmp_path / "out.parquet"
    result = _run(sim.base_url, src, out, "--endpoint", endpoint, "-p", "stream=true",
                  "--concurrency", "1", model=model)
    assert result.exit_code == 0, result.stderr
    [answer] = read_output(out)
    assert answer["status"] == "ok" and answer["attempts"] == 2
    assert answer["output"] == _expected(row["prompt"])
    assert sim.stats.faults == {"cut-stream": 1} and sim.stats.ok == 1


def test_randomly_cut_streams_never_leave_a_truncated_answer(
        tmp_path: Path, make_sim: Callable[..., SimulatorThread]) -> None:
    sim = make_sim(rate_cut_stream=0.3, seed=7)
    rows = prompts(40)
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.parquet"
    result = _run(sim.base_url, src, out, "-p", "stream=true", "--max-attempts", "10")
    assert result.exit_code == 0, result.stderr
    got = _by_id(out)
    assert sim.stats.faults.get("cut-stream", 0) >= 5
    for row in rows:
        answer = got[row["id"]]
        assert answer["status"] == "ok"
        assert answer["output"] == _expected(row["prompt"])
        assert answer["finish_reason"] == "stop"
    assert sum(r["attempts"] for r in got.values()) == sim.stats.requests


# --- auth and headers --------------------------------------------------------------------


@pytest.fixture
def recording_sim() -> Iterator[tuple[SimulatorThread, list[dict[str, str]]]]:
    """A simulator requiring key ``k-secret`` that also records every API request's headers."""
    seen: list[dict[str, str]] = []

    @web.middleware
    async def record(request: web.Request,
                     handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
                     ) -> web.StreamResponse:
        if request.path != "/_stats":
            seen.append({":query": request.query_string,
                         **{k.lower(): v for k, v in request.headers.items()}})
        return await handler(request)

    sim = SimulatorThread(SimConfig(require_key="k-secret"))
    sim.app.middlewares.append(record)  # the app is frozen only when it starts
    with sim:
        yield sim, seen


@pytest.mark.parametrize(("endpoint", "key_header", "model"), [
    ("chat", "authorization", "gpt-4o-mini"),
    ("completions", "authorization", "gpt-3.5-turbo-instruct"),
    ("embeddings", "authorization", "text-embedding-3-small"),
    ("anthropic", "x-api-key", "claude-3-5-haiku-latest"),
    ("gemini", "x-goog-api-key", "gemini-2.0-flash"),
])
def test_key_from_env_goes_in_each_vendors_header(
        tmp_path: Path, recording_sim: tuple[SimulatorThread, list[dict[str, str]]],
        endpoint: str, key_header: str, model: str) -> None:
    sim, seen = recording_sim
    base = sim.gemini_base_url if endpoint == "gemini" else sim.base_url
    src = write_jsonl(tmp_path / "in.jsonl", prompts(2))
    out = tmp_path / "out.parquet"
    result = _run(base, src, out, "--endpoint", endpoint, "--api-key-env", "VENDOR_KEY",
                  "--header", "X-Gateway: yes", model=model, env={"VENDOR_KEY": "k-secret"})
    assert result.exit_code == 0, result.stderr
    assert [r["status"] for r in read_output(out)] == ["ok", "ok"]
    assert seen and len(seen) == sim.stats.requests      # (embeddings may share one request)
    expected = "Bearer k-secret" if key_header == "authorization" else "k-secret"
    other_key_headers = {"authorization", "x-api-key", "x-goog-api-key"} - {key_header}
    for headers in seen:
        assert headers[key_header] == expected
        assert not other_key_headers & set(headers)       # the key goes in one place only
        assert headers["x-gateway"] == "yes"
        assert "k-secret" not in headers[":query"]           # never in the URL
        if endpoint == "anthropic":
            assert headers["anthropic-version"]


def test_wrong_key_aborts_every_vendor_with_exit_3(
        tmp_path: Path, make_sim: Callable[..., SimulatorThread]) -> None:
    sim = make_sim(require_key="k-secret")
    src = write_jsonl(tmp_path / "in.jsonl", prompts(20))
    for endpoint, base in (("anthropic", sim.base_url), ("gemini", sim.gemini_base_url)):
        result = _run(base, src, tmp_path / f"{endpoint}.parquet", "--endpoint", endpoint,
                      "--api-key-env", "VENDOR_KEY", "--concurrency", "2",
                      env={"VENDOR_KEY": "k-wrong"})
        assert result.exit_code == 3, (endpoint, result.stderr)
        assert "401" in result.stderr
        assert "k-wrong" not in result.stderr + result.stdout
    assert sim.stats.requests <= 8


# --- vendor errors -----------------------------------------------------------------------


def test_anthropic_overloaded_529_is_retried(
        tmp_path: Path, make_sim: Callable[..., SimulatorThread]) -> None:
    sim = make_sim(fail_rate=0.3, seed=3)
    rows = prompts(20)
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.parquet"
    result = _run(sim.base_url, src, out, "--endpoint", "anthropic", "--max-attempts", "10",
                  model="claude-3-5-haiku-latest")
    assert result.exit_code == 0, result.stderr
    got = read_output(out)
    assert sim.stats.faults.get("529", 0) >= 3 and 500 not in sim.stats.by_status
    assert sim.stats.by_status[529] == sim.stats.faults["529"]
    assert all(r["status"] == "ok" for r in got)
    assert sum(r["attempts"] for r in got) == sim.stats.requests
    assert max(r["attempts"] for r in got) >= 2


def test_anthropic_overloaded_rows_become_errors_when_attempts_run_out(
        tmp_path: Path, make_sim: Callable[..., SimulatorThread]) -> None:
    sim = make_sim(fail_rate=1.0)
    src = write_jsonl(tmp_path / "in.jsonl", prompts(2))
    out = tmp_path / "out.parquet"
    result = _run(sim.base_url, src, out, "--endpoint", "anthropic", "--max-attempts", "2")
    assert result.exit_code == 1, result.stderr
    for row in read_output(out):
        assert row["status"] == "error" and row["attempts"] == 2
        assert row["http_status"] == 529 and "529" in row["error"]
        assert row["error_type"] == "server_error"


def test_gemini_429_with_retry_delay_is_retried_after_that_delay(
        tmp_path: Path, make_sim: Callable[..., SimulatorThread]) -> None:
    # Gemini gives no retry header: the wait is only in the body's RetryInfo.retryDelay
    sim = make_sim(script=("429:retry-after=0.6",))
    [row] = prompts(1)
    src = write_jsonl(tmp_path / "in.jsonl", [row])
    out = tmp_path / "out.parquet"
    result = _run(sim.gemini_base_url, src, out, "--endpoint", "gemini", "--concurrency", "1",
                  model="gemini-2.0-flash")
    assert result.exit_code == 0, result.stderr
    [answer] = read_output(out)
    assert answer["status"] == "ok" and answer["attempts"] == 2
    assert answer["output"] == _expected(row["prompt"])
    # the advised 0.6 s was honoured (random backoff alone would be at most 0.5 s)
    assert answer["wait_ms"] >= 590 and answer["latency_ms"] < 590
    assert sim.stats.by_status == {429: 1, 200: 1}


def test_gemini_rpm_limit_429s_are_absorbed(
        tmp_path: Path, make_sim: Callable[..., SimulatorThread]) -> None:
    sim = make_sim(rpm=300)                  # 5 requests per one-second slice
    rows = prompts(14)
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.parquet"
    result = _run(sim.gemini_base_url, src, out, "--endpoint", "gemini", "--concurrency", "14",
                  "--max-attempts", "10", model="gemini-2.0-flash")
    assert result.exit_code == 0, result.stderr
    got = read_output(out)
    assert sim.stats.rate_limited > 0
    assert all(r["status"] == "ok" for r in got) and len(got) == 14
    assert sum(r["attempts"] for r in got) == sim.stats.requests


@pytest.mark.parametrize("endpoint", ["anthropic", "gemini"])
def test_vendor_quota_exhausted_aborts_with_exit_3(
        tmp_path: Path, make_sim: Callable[..., SimulatorThread], endpoint: str) -> None:
    sim = make_sim(quota_exhausted=True)
    base = sim.gemini_base_url if endpoint == "gemini" else sim.base_url
    src = write_jsonl(tmp_path / "in.jsonl", prompts(3))
    out = tmp_path / "out.parquet"
    # All rows go out at once and --max-attempts is 1: an error taken for a rate limit
    # fails its row at once (exit 1, fast, no global cooldown in the way); only an error
    # recognised as exhausted quota aborts the job (exit 3).
    result = _run(base, src, out, "--endpoint", endpoint, "--concurrency", "4",
                  "--max-attempts", "1", model="some-model")
    assert result.exit_code == 3, result.stderr
    assert "quota" in result.stderr.lower() or "credit" in result.stderr.lower()
    assert "server looks down" not in result.stderr
    assert sim.stats.requests <= 3                         # nothing retried
    assert not out.exists() or all(r["status"] != "ok" for r in read_output(out))
