"""--max-cost through the CLI against the simulator: a hard cap, a clean abort, a resume, exact costs."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import orjson
import pyarrow.parquet as pq
import pytest

from batcher.simulate import SimulatorThread
from tests.conftest import prompts, read_output, run_cli, write_jsonl

PRICE_IN, PRICE_OUT = 1.0, 1000.0
"""USD per 1M tokens: output dominates, so a request costs about $0.001 per output token."""
MAX_TOKENS = 20
ROWS = 300
CAP = 2.0
"""About 100 requests at the simulator's ~16-token answers: a third of the rows."""


def _args(src: Path, out: Path, sim: SimulatorThread, *extra: str) -> list[str | Path]:
    return ["run", src, "-o", out, "--base-url", sim.base_url, "--model", "gpt-4o-mini",
            "--concurrency", "64", "-p", f"max_tokens={MAX_TOKENS}",
            "--price-input", str(PRICE_IN), "--price-output", str(PRICE_OUT),
            "--no-progress", "--log-format", "json", *extra]


def _sim_spend(sim: SimulatorThread) -> float:
    """What the simulator's own usage costs at our prices (it reports no cached tokens)."""
    return sum((u["prompt_tokens"] * PRICE_IN + u["completion_tokens"] * PRICE_OUT) / 1e6
               for u in sim.stats.usage_by_model.values())


def _state_rows(out: Path) -> list[dict[str, Any]]:
    """Every result durable in the state beside ``out`` (parts, then journals)."""
    state = out.with_name(out.name + ".state")
    rows: list[dict[str, Any]] = []
    for part in sorted(state.glob("part-*.parquet")):
        rows.extend(pq.read_table(part).to_pylist())
    for journal in sorted(state.glob("journal-*.jsonl")):
        rows.extend(orjson.loads(line) for line in journal.read_bytes().splitlines() if line)
    return rows


def _summary(out: Path) -> dict[str, Any]:
    summary: dict[str, Any] = json.loads(out.with_name("out.summary.json").read_text())
    return summary


def _row_cost(row: dict[str, Any]) -> float:
    return float(row["prompt_tokens"] * PRICE_IN + row["completion_tokens"] * PRICE_OUT) / 1e6


def test_cap_holds_at_high_concurrency_then_a_higher_cap_resumes(
        tmp_path: Path, make_sim: Callable[..., SimulatorThread]) -> None:
    sim = make_sim(latency_ms=40, jitter_ms=20)
    ids = [r["id"] for r in prompts(ROWS)]
    src = write_jsonl(tmp_path / "in.jsonl", prompts(ROWS))
    out = tmp_path / "out.parquet"

    first = run_cli(*_args(src, out, sim, "--max-cost", str(CAP)))
    assert first.exit_code == 3, first.stderr
    assert "budget" in first.stderr and "--max-cost" in first.stderr
    spend = _sim_spend(sim)
    assert spend <= CAP                                   # the server's own bill
    assert spend > CAP / 2                                # ... and the cap was actually used
    assert sim.stats.max_in_flight > 8                    # many requests were in flight
    assert sim.stats.requests == sim.stats.ok < ROWS      # dispatch stopped; nothing failed

    written = _state_rows(out)
    written_ids = [r["id"] for r in written]
    assert len(written_ids) == len(set(written_ids)) == sim.stats.ok   # drained: all kept
    assert set(written_ids) < set(ids)
    assert all(r["status"] == "ok" for r in written)
    summary = _summary(out)
    assert summary["outcome"] == "aborted" and summary["exit_code"] == 3
    assert "budget" in summary["message"]
    assert summary["cost_usd"] == pytest.approx(sum(r["cost_usd"] for r in written), abs=1e-6)
    assert summary["cost_usd"] == pytest.approx(spend, abs=1e-6)
    status = json.loads(run_cli("status", out, "--json").stdout)
    assert status["done"] == len(written) and status["cost_usd"] == pytest.approx(spend)

    second = run_cli(*_args(src, out, sim, "--max-cost", "100"))
    assert second.exit_code == 0, second.stderr
    assert sim.stats.resent_after_ok == 0                 # answered rows not paid twice
    assert sim.stats.requests == ROWS
    rows = read_output(out)
    assert sorted(r["id"] for r in rows) == sorted(ids)
    assert sum(r["cost_usd"] for r in rows) == pytest.approx(_sim_spend(sim))
    assert _summary(out)["resumed"] == len(written)


def test_cost_per_row_is_usage_times_price_and_summary_matches(
        tmp_path: Path, make_sim: Callable[..., SimulatorThread]) -> None:
    sim = make_sim(answer_tokens=12)
    src = write_jsonl(tmp_path / "in.jsonl", prompts(60))
    out = tmp_path / "out.parquet"
    result = run_cli(*_args(src, out, sim, "--max-cost", "50"))
    assert result.exit_code == 0, result.stderr
    rows = read_output(out)
    assert len(rows) == 60
    for row in rows:
        assert row["cached_tokens"] == 0                  # the simulator caches nothing
        assert row["cost_usd"] == pytest.approx(_row_cost(row), rel=1e-12)
    total = sum(r["cost_usd"] for r in rows)
    summary = _summary(out)
    assert summary["cost_usd"] == pytest.approx(total, abs=1e-6)
    assert summary["prompt_tokens"] == sim.stats.prompt_tokens
    assert summary["completion_tokens"] == sim.stats.completion_tokens
    assert total == pytest.approx(_sim_spend(sim))


def test_rerun_with_the_same_cap_spends_nothing_more(
        tmp_path: Path, make_sim: Callable[..., SimulatorThread]) -> None:
    sim = make_sim(latency_ms=20)
    src = write_jsonl(tmp_path / "in.jsonl", prompts(ROWS))
    out = tmp_path / "out.parquet"
    assert run_cli(*_args(src, out, sim, "--max-cost", str(CAP))).exit_code == 3
    again = run_cli(*_args(src, out, sim, "--max-cost", str(CAP)))
    assert again.exit_code == 3
    assert _sim_spend(sim) <= CAP


def test_summary_cost_after_a_resume_is_the_outputs_total(
        tmp_path: Path, make_sim: Callable[..., SimulatorThread]) -> None:
    sim = make_sim(latency_ms=20)
    src = write_jsonl(tmp_path / "in.jsonl", prompts(ROWS))
    out = tmp_path / "out.parquet"
    assert run_cli(*_args(src, out, sim, "--max-cost", str(CAP))).exit_code == 3
    assert run_cli(*_args(src, out, sim)).exit_code == 0
    total = sum(r["cost_usd"] for r in read_output(out))
    assert _summary(out)["cost_usd"] == pytest.approx(total, abs=1e-6)


def test_cap_holds_when_the_server_counts_more_prompt_tokens(
        tmp_path: Path, sim: SimulatorThread) -> None:
    # The simulator counts ceil(chars / 4); long words are far fewer o200k tokens than that.
    rows = [{"id": f"r{i}", "prompt": "internationalization " * 40 + str(i)} for i in range(200)]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.parquet"
    result = run_cli("run", src, "-o", out, "--base-url", sim.base_url, "--model", "some-model",
                     "--concurrency", "64", "-p", "max_tokens=1", "--price-input", "1000",
                     "--price-output", "0", "--no-progress", "--max-cost", "3")
    assert result.exit_code == 3
    spent = sim.stats.prompt_tokens * 1000 / 1e6
    assert spent <= 3.0


def test_unknown_price_with_a_cap_sends_nothing(tmp_path: Path, sim: SimulatorThread) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", prompts(20))
    out = tmp_path / "out.parquet"
    result = run_cli("run", src, "-o", out, "--base-url", sim.base_url,
                     "--model", "my-local-llama", "--max-cost", "1", "--no-progress")
    # Exit 3 (aborted, resumable): the price is only found missing as a row is dispatched;
    # rerunning with --price-input/--price-output resumes (prices are not in the fingerprint).
    assert result.exit_code == 3
    assert "price" in result.stderr and "my-local-llama" in result.stderr
    assert "--price-input" in result.stderr
    assert sim.stats.requests == 0
    assert _state_rows(out) == []
    priced = run_cli("run", src, "-o", out, "--base-url", sim.base_url,
                     "--model", "my-local-llama", "--max-cost", "1", "--no-progress",
                     "--price-input", "1", "--price-output", "2")
    assert priced.exit_code == 0, priced.stderr
    assert sim.stats.requests == 20 and len(read_output(out)) == 20


def test_a_zero_cap_is_refused(tmp_path: Path, sim: SimulatorThread) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", prompts(5))
    result = run_cli(*_args(src, tmp_path / "out.parquet", sim, "--max-cost", "0"))
    assert result.exit_code == 2 and "max_cost" in result.stderr
    assert sim.stats.requests == 0


# --- a small fixed-answer server: usage shapes the simulator does not produce -------------------


CACHED_USAGE = {"prompt_tokens": 100, "completion_tokens": 7, "total_tokens": 107,
                "prompt_tokens_details": {"cached_tokens": 60}}


class _FixedHandler(BaseHTTPRequestHandler):
    """Answers every chat request with the server's ``answer_model`` and ``usage``
    (no usage at all when None); counts requests in ``server.requests``."""

    server: _FixedServer

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.server.requests += 1
        doc: dict[str, Any] = {
            "id": "c1", "object": "chat.completion", "created": 0,
            "model": self.server.answer_model,
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": "ok"}}]}
        if self.server.usage is not None:
            doc["usage"] = self.server.usage
        body = orjson.dumps(doc)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _FixedServer(ThreadingHTTPServer):
    def __init__(self, answer_model: str, usage: dict[str, Any] | None) -> None:
        super().__init__(("127.0.0.1", 0), _FixedHandler)
        self.answer_model = answer_model
        self.usage = usage
        self.requests = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


@pytest.fixture
def fixed_server() -> Iterator[Callable[[str, dict[str, Any] | None], _FixedServer]]:
    started: list[tuple[_FixedServer, threading.Thread]] = []

    def start(answer_model: str, usage: dict[str, Any] | None) -> _FixedServer:
        server = _FixedServer(answer_model, usage)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        started.append((server, thread))
        return server

    yield start
    for server, thread in started:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_cached_tokens_cost_the_cached_rate(
        tmp_path: Path, fixed_server: Callable[[str, dict[str, Any] | None], _FixedServer]) -> None:
    server = fixed_server("gpt-4o-mini", CACHED_USAGE)
    src = write_jsonl(tmp_path / "in.jsonl", prompts(4))
    job = tmp_path / "job.toml"
    job.write_text(f'input = "in.jsonl"\noutput = "out.parquet"\nmodel = "gpt-4o-mini"\n'
                   f'base_url = "{server.base_url}"\nmax_cost = 1.0\n[params]\nmax_tokens = 10\n'
                   '[prices.gpt-4o-mini]\ninput = 2.0\noutput = 8.0\ncached_input = 0.5\n')
    result = run_cli("run", job, "--no-progress")
    assert result.exit_code == 0, result.stderr
    rows = read_output(tmp_path / "out.parquet")
    assert len(rows) == 4 and src.exists()
    for row in rows:
        assert row["cached_tokens"] == 60
        assert row["cost_usd"] == pytest.approx((40 * 2.0 + 60 * 0.5 + 7 * 8.0) / 1e6)
    summary = _summary(tmp_path / "out.parquet")
    assert summary["cost_usd"] == pytest.approx(sum(r["cost_usd"] for r in rows))


@pytest.mark.parametrize("answer_model, usage", [
    ("gpt-4o-mini", None),                        # a server that reports no usage
    ("acme-unlisted-model-7", CACHED_USAGE),      # answers under a name with no known price
], ids=["no-usage", "unpriced-answer-model"])
def test_an_answer_of_unknown_cost_still_counts_against_the_cap(
        tmp_path: Path, fixed_server: Callable[[str, dict[str, Any] | None], _FixedServer],
        answer_model: str, usage: dict[str, Any] | None) -> None:
    server = fixed_server(answer_model, usage)
    src = write_jsonl(tmp_path / "in.jsonl", prompts(50))
    out = tmp_path / "out.parquet"
    # gpt-4o-mini's bundled price; each request reserves its prompt + 10,000 output tokens
    # (about $0.006), so a $0.03 cap admits at most 5 requests
    result = run_cli("run", src, "-o", out, "--base-url", server.base_url,
                     "--model", "gpt-4o-mini", "-p", "max_tokens=10000", "--concurrency", "1",
                     "--max-cost", "0.03", "--no-progress")
    # No answer may count as free: either it was priced (the unknown answering model priced
    # as the model asked for), or the cap stopped the job after at most 5 requests.
    if result.exit_code == 3:
        assert server.requests <= 5
    else:
        rows = read_output(out)
        assert usage is not None and all(r["cost_usd"] is not None for r in rows)
        assert sum(r["cost_usd"] for r in rows) <= 0.03


def test_zero_and_negative_caps_get_the_same_message_naming_the_flag(
        tmp_path: Path, sim: SimulatorThread) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", prompts(2))
    messages = []
    for cap in ("0", "-1"):
        result = run_cli(*_args(src, tmp_path / "out.parquet", sim, "--max-cost", cap))
        assert result.exit_code == 2
        messages.append(result.stderr.replace(f"got {cap};", "got N;"))
    assert messages[0] == messages[1]
    assert "--max-cost" in messages[0] and "more than 0" in messages[0]
    result = run_cli(*_args(src, tmp_path / "out.parquet", sim, "--concurrency", "0"))
    assert result.exit_code == 2 and "--concurrency" in result.stderr
    assert sim.stats.requests == 0
