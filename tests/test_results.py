"""Result rows are pure functions of what came back: tested without a server."""

from __future__ import annotations

import pytest

from batcher.pricing import Price
from batcher.results import RowBuilder, Sent, split
from batcher.secrets import redactor
from batcher.types import Answer, HttpRequest, HttpResponse, RequestRow, Usage

KEY = "sk-test-0123456789abcdef"
PRICES = {"gpt-4o-mini": Price(input_per_m=0.15, output_per_m=0.60, cached_input_per_m=None,
                                source="override",
                                matched="gpt-4o-mini")}


def _builder(keep_raw: bool = False) -> RowBuilder:
    return RowBuilder(price_of=PRICES.get, redact=redactor(KEY, {}), keep_raw=keep_raw,
                      default_model="gpt-4o-mini")


def _row(i: int = 0, model: str | None = None) -> RequestRow:
    return RequestRow(id=f"r{i}", shape="prompt", source="in.jsonl", line=i + 1,
                      prompt=f"p{i}", model=model, columns={"expected": "x"})


def _request(model: str = "gpt-4o-mini") -> HttpRequest:
    return HttpRequest("POST", "http://127.0.0.1/v1/chat/completions", {}, b"{}", model=model)


def _sent(answer: Answer, body: bytes = b'{"ok": true}') -> Sent:
    return Sent(HttpResponse(200, {}, body, ttft_ms=3.0), answer, attempts=2, latency_ms=12.5,
                wait_ms=100.0)


def test_split_shares_out_evenly_and_keeps_none() -> None:
    assert split(10, 3) == [4, 3, 3]
    assert split(2, 4) == [1, 1, 0, 0]
    assert split(None, 2) == [None, None]


def test_an_answer_is_priced_by_the_answered_model_else_the_requested_one() -> None:
    usage = Usage(prompt_tokens=1_000_000, completion_tokens=1_000_000, total_tokens=2_000_000)
    renamed = Answer("hi", "stop", "stop", "gateway/renamed-model", usage, response_id="c1")
    [row] = _builder().ok_rows([_row()], _request(), _sent(renamed))
    assert row.cost_usd == 0.75                       # the requested model's price
    assert (row.status, row.output, row.attempts, row.latency_ms, row.wait_ms, row.ttft_ms) \
        == ("ok", "hi", 2, 12.5, 100.0, 3.0)
    assert row.columns == {"expected": "x"} and row.raw is None
    unpriced = _builder().ok_rows([_row()], _request("no-such-model"),
                                  _sent(Answer("hi", "stop", "stop", None, usage)))
    assert unpriced[0].cost_usd is None                # unknown, never $0


def test_embeddings_are_split_one_row_per_input_with_shared_usage() -> None:
    answer = Answer(None, None, None, "text-embedding-3-small",
                    Usage(prompt_tokens=10, total_tokens=10),
                    embeddings=[[1.0], [2.0], [3.0]])
    rows = _builder().ok_rows([_row(i) for i in range(3)], _request(), _sent(answer))
    assert [r.embedding for r in rows] == [[1.0], [2.0], [3.0]]
    assert [r.prompt_tokens for r in rows] == [4, 3, 3]
    assert [r.id for r in rows] == ["r0", "r1", "r2"]


def test_too_few_embeddings_make_every_input_an_error() -> None:
    answer = Answer(None, None, None, "m", Usage(), embeddings=[[1.0]])
    rows = _builder().ok_rows([_row(0), _row(1)], _request(), _sent(answer))
    assert [r.status for r in rows] == ["error", "error"]
    assert all(r.error_type == "invalid_response" and "1 embeddings for 2" in (r.error or "")
               for r in rows)


def test_error_rows_and_raw_bodies_are_masked() -> None:
    body = f'{{"error": "bad key {KEY}"}}'.encode()
    row = _builder(keep_raw=True).error_row(
        _row(model=None), f"HTTP 401: bad key {KEY}", "auth_error", attempts=1, status=401,
        latency_ms=5.0, response=HttpResponse(401, {}, body))
    assert KEY not in (row.error or "") and KEY not in (row.raw or "")
    assert row.model == "gpt-4o-mini" and row.error_type == "auth_error"
    answer = Answer(f"echo {KEY}", "stop", "stop", "gpt-4o-mini", Usage())
    [ok] = _builder(keep_raw=True).ok_rows([_row()], _request(), _sent(answer, body))
    assert KEY not in (ok.raw or "")


@pytest.mark.parametrize("clock", [1_780_000_000.0, 1_780_000_000.9994996, 1_780_000_000.9995,
                                   1_780_000_001.000001, 1_780_000_059.123456])
def test_now_iso_writes_what_datetime_writes(clock: float,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The date and time are formatted once a second; the text is datetime's all the same,
    rounding at the millisecond and the turn of the second included."""
    import time
    from datetime import UTC, datetime

    from batcher import results

    expected = datetime.fromtimestamp(clock, UTC).isoformat(timespec="milliseconds")
    monkeypatch.setattr(time, "time", lambda: clock)
    monkeypatch.setattr(results, "_second", (int(clock) - 1, "the second before"))
    assert results.now_iso() == expected.replace("+00:00", "Z")
    assert results.now_iso() == expected.replace("+00:00", "Z")   # from the cache
