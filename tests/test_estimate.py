"""The dry-run estimate: totals, per-model breakdown, unknown prices, duration, JSON."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from batcher.estimate import DEFAULT_LATENCY_S, estimate
from batcher.pricing import max_cost_usd, price_for
from batcher.tokens import DEFAULT_MAX_OUTPUT_TOKENS, request_input_tokens
from batcher.types import RequestContext, RequestRow
from tests.conftest import run_cli

CTX = RequestContext(base_url="http://127.0.0.1:1/v1", model="gpt-4o-mini",
                     system="Answer briefly.", params={"max_tokens": 50})


def _rows() -> list[RequestRow]:
    rows = [RequestRow(id=f"a{i}", shape="prompt", source="in.jsonl", line=i + 1,
                       prompt=f"Classify review number {i}: great product, late delivery.")
            for i in range(5)]
    rows += [RequestRow(id=f"b{i}", shape="prompt", source="in.jsonl", line=10 + i,
                        prompt="Translate to French: good morning", model="claude-3-5-haiku-latest",
                        params={"max_tokens": 20}) for i in range(3)]
    rows.append(RequestRow(id="c", shape="messages", source="in.jsonl", line=20,
                           messages=[{"role": "user", "content": "hi there"}],
                           model="my-local-llama", params={"max_tokens": None}))
    return rows


def test_totals_and_breakdown() -> None:
    rows = _rows()
    report = estimate(rows, CTX, "chat", bad_rows=2, rpm=None, tpm=None, concurrency=4)
    assert report.rows == 9 and report.bad_rows == 2
    by = {m.model: m for m in report.by_model}
    assert set(by) == {"gpt-4o-mini", "claude-3-5-haiku-latest", "my-local-llama"}
    assert report.by_model[0].model == "gpt-4o-mini"  # most rows first
    mini = by["gpt-4o-mini"]
    assert mini.rows == 5 and mini.tokenizer == "o200k_base"
    assert mini.input_tokens == sum(request_input_tokens(r, CTX, "chat") for r in rows[:5])
    assert mini.output_tokens_max == 5 * 50
    price = price_for("gpt-4o-mini")
    assert price is not None and mini.price == price
    assert mini.cost_usd_input == pytest.approx(mini.input_tokens * 0.15 / 1e6)
    assert mini.cost_usd_max == pytest.approx(
        sum(max_cost_usd(price, request_input_tokens(r, CTX, "chat"), 50) or 0 for r in rows[:5]))
    claude = by["claude-3-5-haiku-latest"]
    assert claude.tokenizer == "approx" and claude.output_tokens_max == 3 * 20
    assert claude.cost_usd_max is not None and claude.cost_usd_max > 0
    llama = by["my-local-llama"]
    assert llama.price is None and llama.cost_usd_input is None and llama.cost_usd_max is None
    assert llama.input_tokens > 0  # still counted
    # max_tokens: None in the row's params is not a limit: the stated default applies
    assert llama.output_tokens_max == DEFAULT_MAX_OUTPUT_TOKENS
    assert report.input_tokens == sum(m.input_tokens for m in report.by_model)
    assert report.output_tokens_max == 250 + 60 + DEFAULT_MAX_OUTPUT_TOKENS
    # an unknown price makes the totals unknown, never a silent $0
    assert report.unknown_price_models == ["my-local-llama"]
    assert report.cost_usd_input is None and report.cost_usd_max is None
    text = report.render()
    assert "price unknown" in text and "my-local-llama" in text and "approx" in text
    assert any("approximate" in n for n in report.notes)


def test_all_known_totals_add_up() -> None:
    rows = _rows()[:8]
    report = estimate(rows, CTX, "chat", rpm=None, tpm=None, concurrency=4)
    assert report.unknown_price_models == []
    assert report.cost_usd_input == pytest.approx(
        sum(m.cost_usd_input or 0 for m in report.by_model))
    assert report.cost_usd_max == pytest.approx(sum(m.cost_usd_max or 0 for m in report.by_model))
    assert report.cost_usd_max > report.cost_usd_input > 0  # type: ignore[operator]


def test_price_overrides_reach_the_report() -> None:
    rows = _rows()[-1:]
    report = estimate(rows, CTX, "chat", rpm=None, tpm=None, concurrency=1,
                      prices_table={"my-local-llama": {"input": 1.0, "output": 2.0}})
    assert report.unknown_price_models == []
    m = report.by_model[0]
    assert m.cost_usd_input == pytest.approx(m.input_tokens / 1e6)
    assert m.cost_usd_max == pytest.approx((m.input_tokens + 2 * DEFAULT_MAX_OUTPUT_TOKENS) / 1e6)
    flagged = estimate(rows, CTX, "chat", rpm=None, tpm=None, concurrency=1,
                       price_input=3.0, price_output=3.0)
    assert flagged.cost_usd_input == pytest.approx(3 * m.input_tokens / 1e6)


def test_seconds_estimate_takes_the_binding_limit() -> None:
    rows = [RequestRow(id=str(i), shape="prompt", source="s", line=i, prompt="hello world")
            for i in range(600)]
    tokens_per_row = 3 + 1 + 3 + 3 + 1 + 2 + 3 + 50  # system msg + user msg + primer + output
    by_rpm = estimate(rows, CTX, "chat", rpm=60, tpm=None, concurrency=1000)
    assert by_rpm.seconds_estimate == pytest.approx(600.0)
    assert by_rpm.bound_by is not None and "rpm" in by_rpm.bound_by
    by_tpm = estimate(rows, CTX, "chat", rpm=6000, tpm=600, concurrency=1000)
    assert by_tpm.input_tokens + by_tpm.output_tokens_max == 600 * tokens_per_row
    assert by_tpm.seconds_estimate == pytest.approx(600 * tokens_per_row / 600 * 60)
    assert by_tpm.bound_by is not None and "tpm" in by_tpm.bound_by
    by_conc = estimate(rows, CTX, "chat", rpm=None, tpm=None, concurrency=3, latency_s=1.5)
    assert by_conc.seconds_estimate == pytest.approx(600 * 1.5 / 3)
    default = estimate(rows, CTX, "chat", rpm=None, tpm=None, concurrency=6)
    assert default.seconds_estimate == pytest.approx(600 * DEFAULT_LATENCY_S / 6)
    empty = estimate([], CTX, "chat", rpm=60, tpm=None, concurrency=1)
    assert empty.rows == 0 and empty.seconds_estimate == 0.0 and empty.cost_usd_max == 0.0


def test_json_has_the_required_keys_and_is_serialisable() -> None:
    report = estimate(_rows(), CTX, "chat", rpm=100, tpm=10_000, concurrency=8)
    data = json.loads(json.dumps(report.to_json()))
    for key in ("rows", "input_tokens", "output_tokens_max", "cost_usd_input", "cost_usd_max",
                "seconds_estimate", "by_model", "unknown_price_models", "notes", "bad_rows"):
        assert key in data
    assert data["rows"] == 9
    assert data["cost_usd_max"] is None  # one model's price is unknown
    assert {m["model"] for m in data["by_model"]} >= {"gpt-4o-mini", "my-local-llama"}
    llama = next(m for m in data["by_model"] if m["model"] == "my-local-llama")
    assert llama["price"] is None and llama["price_known"] is False
    assert llama["cost_usd_max"] is None


def test_default_max_tokens_is_stated() -> None:
    ctx = RequestContext(base_url="http://x/v1", model="gpt-4o-mini")
    rows = [RequestRow(id="1", shape="prompt", source="s", line=1, prompt="hi")]
    report = estimate(rows, ctx, "chat", rpm=None, tpm=None, concurrency=1)
    assert report.output_tokens_max == DEFAULT_MAX_OUTPUT_TOKENS
    assert report.rows_with_default_max_tokens == 1
    assert any(f"{DEFAULT_MAX_OUTPUT_TOKENS:,}" in n for n in report.notes)
    emb = estimate(rows, ctx, "embeddings", rpm=None, tpm=None, concurrency=1)
    assert emb.output_tokens_max == 0 and emb.rows_with_default_max_tokens == 0


def test_streams_in_chunks() -> None:
    """Rows are consumed lazily, chunk by chunk, and every row is counted once."""
    consumed = 0

    def gen() -> Iterator[RequestRow]:
        nonlocal consumed
        for i in range(20_000):
            consumed += 1
            yield RequestRow(id=str(i), shape="prompt", source="s", line=i, prompt="hello world")

    report = estimate(gen(), CTX, "chat", rpm=None, tpm=None, concurrency=1)
    assert consumed == 20_000 and report.rows == 20_000
    assert report.input_tokens == 20_000 * (3 + 1 + 3 + 3 + 1 + 2 + 3)


def test_estimate_names_each_bad_row_and_exits_1_like_run(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text('{"id": "a", "prompt": "hello"}\n{"id": "b"}\n{"id": "c", "prompt": "x"}\n')
    result = run_cli("estimate", src, "--model", "gpt-4o-mini")
    assert result.exit_code == 1, result.stderr
    assert f"{src}:2" in result.stderr and "prompt" in result.stderr
    assert "1 bad rows skipped" in result.stdout


def test_a_prompt_longer_than_the_context_window_is_named(tmp_path: Path) -> None:
    long = " hi" * 140_000                      # ~140k tokens; gpt-4o-mini holds 128k
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"id": "a", "prompt": "short"}) + "\n"
                   + json.dumps({"id": "b", "prompt": long}) + "\n"
                   + json.dumps({"id": "c", "prompt": long}) + "\n")
    result = run_cli("estimate", src, "--model", "gpt-4o-mini")
    assert result.exit_code == 0, result.stderr
    assert (f"2 row(s) exceed gpt-4o-mini's context window of 128,000 tokens (first at {src}:2)"
            in result.stdout), result.stdout
    fits = run_cli("estimate", src, "--model", "gpt-4.1")   # a 1M-token window
    assert "context window" not in fits.stdout


def test_rows_with_params_of_their_own_keep_their_bounds_among_plain_rows() -> None:
    # Plain rows share the job's bound (worked out once); a row's own max_tokens, before or
    # after them, is its own; a plain row of another model has that model's window.
    rows = []
    for i in range(6):
        own = {"max_tokens": 5} if i % 2 else {}
        rows.append(RequestRow(id=f"r{i}", shape="prompt", source="in.jsonl", line=i + 1,
                               prompt="x " * 20, params=own))
    rows.append(RequestRow(id="long", shape="prompt", source="in.jsonl", line=7,
                           prompt="word " * 20_000, model="gpt-3.5-turbo"))
    report = estimate(rows, CTX, "chat", rpm=None, tpm=None, concurrency=4)
    by = {m.model: m for m in report.by_model}
    assert by["gpt-4o-mini"].output_tokens_max == 3 * 50 + 3 * 5
    assert any("gpt-3.5-turbo's context window" in n and "in.jsonl:7" in n
               for n in report.notes), report.notes
    assert not any("gpt-4o-mini's context window" in n for n in report.notes)
