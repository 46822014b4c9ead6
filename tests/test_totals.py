"""Summary, console and `batcher status` totals end to end: an unknown cost or usage is never a
silent 0, a partial total says how many rows it covers, and both survive a resume."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from click.testing import Result

from batcher.checkpoint import state_dir_for
from batcher.simulate import SimulatorThread
from tests.conftest import prompts, read_output, run_cli, write_jsonl

WIDE = {"COLUMNS": "250"}
"""So that rich does not wrap the summary table's lines."""


def _run(sim: SimulatorThread, src: Path, out: Path, *extra: str) -> Result:
    return run_cli("run", src, "-o", out, "--base-url", sim.base_url, "--no-progress", *extra,
                   env=WIDE)


def _summary(out: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(out.with_name(out.stem + ".summary.json").read_text())
    return loaded


def _status(out: Path) -> dict[str, Any]:
    result = run_cli("status", out, "--json")
    assert result.exit_code == 0, result.stderr
    loaded: dict[str, Any] = json.loads(result.stdout)
    return loaded


def _table_line(stderr: str, key: str) -> str:
    """The end-of-run table's line for ``key`` (its value, whitespace squeezed)."""
    for line in stderr.splitlines():
        words = line.split()
        if words[:1] == [key]:
            return " ".join(words[1:])
    raise AssertionError(f"no {key!r} line in:\n{stderr}")


def test_unknown_price_is_unknown_not_zero(tmp_path: Path, sim: SimulatorThread) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", prompts(5))
    out = tmp_path / "out.parquet"
    result = _run(sim, src, out, "--model", "my-local-model")
    assert result.exit_code == 0, result.stderr
    assert all(r["cost_usd"] is None and r["prompt_tokens"] > 0 for r in read_output(out))
    summary = _summary(out)
    assert summary["cost_usd"] is None and summary["cost_usd_this_run"] is None
    assert (summary["cost_usd_known"], summary["rows_priced"], summary["rows_cost_unknown"]) \
        == (0.0, 0, 5)
    assert summary["prompt_tokens"] > 0 and summary["rows_usage_unknown"] == 0
    cost = _table_line(result.stderr, "cost")
    assert cost.startswith("unknown for all 5 rows") and "--price-input" in cost
    assert "$0.0000" not in result.stderr
    status = _status(out)
    assert (status["cost_usd"], status["rows_cost_unknown"]) == (None, 5)
    text = run_cli("status", out).stdout
    assert any(line.split() == ["cost_usd", "unknown"] for line in text.splitlines())


def test_partial_total_says_how_many_rows_it_covers(tmp_path: Path,
                                                   sim: SimulatorThread) -> None:
    # Rows of a priced model beside rows of one with no known price, in one run.
    rows = [dict(r, model="gpt-4o-mini") if i % 2 else r for i, r in enumerate(prompts(6))]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.parquet"
    result = _run(sim, src, out, "--model", "my-local-model")
    assert result.exit_code == 0, result.stderr
    priced = [r["cost_usd"] for r in read_output(out) if r["cost_usd"] is not None]
    assert len(priced) == 3 and sum(priced) > 0
    summary = _summary(out)
    assert summary["cost_usd"] is None
    assert (summary["rows_priced"], summary["rows_cost_unknown"]) == (3, 3)
    assert summary["cost_usd_known"] == pytest.approx(sum(priced), abs=1e-6)
    assert _table_line(result.stderr, "cost").startswith(
        f"unknown for 3 rows (${sum(priced):,.6f} for the other 3)")


def test_unknown_cost_survives_resume_and_finalize(tmp_path: Path,
                                                   make_sim: Callable[..., SimulatorThread],
                                                   ) -> None:
    # Run 1 (one at a time): r0 and r1, priced, fail once; r2/r4 (priced) and r3/r5 (no price)
    # are answered. Run 2 (--retry-failed) answers r0 and r1: this run is fully priced, the
    # output is not, because run 1's unknown rows are only in the state's counters.
    sim = make_sim(script=("400", "400"))
    rows = [dict(r, model="my-local-model") if i in (3, 5) else r
            for i, r in enumerate(prompts(6))]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.parquet"
    first = _run(sim, src, out, "--model", "gpt-4o-mini", "--concurrency", "1")
    assert first.exit_code == 1, first.stderr
    one = _summary(out)
    assert (one["rows_priced"], one["rows_cost_unknown"], one["cost_usd"]) == (2, 2, None)

    second = _run(sim, src, out, "--model", "gpt-4o-mini", "--retry-failed")
    assert second.exit_code == 0, second.stderr
    two = _summary(out)
    output = read_output(out)
    known = sum(r["cost_usd"] for r in output if r["cost_usd"] is not None)
    assert two["cost_usd_this_run"] is not None and two["cost_usd_this_run"] > 0
    assert two["cost_usd"] is None
    assert (two["rows_priced"], two["rows_cost_unknown"]) == (4, 2)
    assert two["cost_usd_known"] == pytest.approx(known, abs=1e-6)

    # After the finalize the counters come from the finalize record: still unknown.
    third = _run(sim, src, out, "--model", "gpt-4o-mini")
    assert third.exit_code == 0 and sim.stats.requests == 8
    three = _summary(out)
    assert (three["cost_usd"], three["rows_priced"], three["rows_cost_unknown"]) == (
        None, 4, 2)
    status = _status(out)
    assert (status["cost_usd"], status["rows_cost_unknown"]) == (None, 2)
    assert status["cost_usd_known"] == pytest.approx(known, abs=1e-6)


def test_a_state_finalized_before_the_row_counts_still_reads(
        tmp_path: Path, sim: SimulatorThread) -> None:
    # Earlier versions recorded only the sums: {prompt_tokens, completion_tokens, cost_usd}.
    rows = [dict(r, model="gpt-4o-mini") if i % 2 else r for i, r in enumerate(prompts(4))]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.parquet"
    assert _run(sim, src, out, "--model", "my-local-model").exit_code == 0
    meta_path = state_dir_for(out) / "meta.json"
    meta = orjson.loads(meta_path.read_bytes())
    new = meta["finalized_totals"]
    meta["finalized_totals"] = {"prompt_tokens": new["prompt_tokens_known"],
                                "completion_tokens": new["completion_tokens_known"],
                                "cost_usd": new["cost_usd_known"]}
    meta_path.write_bytes(orjson.dumps(meta))

    status = _status(out)
    assert (status["ok"], status["cost_usd"], status["rows_priced"],
            status["rows_cost_unknown"]) == (4, None, 2, 2)
    assert status["cost_usd_known"] == pytest.approx(new["cost_usd_known"], abs=1e-6)
    assert status["prompt_tokens"] == new["prompt_tokens_known"]
    again = _run(sim, src, out, "--model", "my-local-model")
    assert again.exit_code == 0 and sim.stats.requests == 4
    assert (_summary(out)["cost_usd"], _summary(out)["rows_cost_unknown"]) == (None, 2)


def test_stream_without_usage_says_usage_not_reported(
        tmp_path: Path, make_sim: Callable[..., SimulatorThread]) -> None:
    sim = make_sim(omit_stream_usage=True)
    src = write_jsonl(tmp_path / "in.jsonl", prompts(4))
    out = tmp_path / "out.parquet"
    result = _run(sim, src, out, "--model", "gpt-4o-mini", "-p", "stream=true")
    assert result.exit_code == 0, result.stderr
    output = read_output(out)
    assert all(r["status"] == "ok" and r["output"] for r in output)
    assert all(r["prompt_tokens"] is None and r["cost_usd"] is None for r in output)
    summary = _summary(out)
    assert (summary["prompt_tokens"], summary["completion_tokens"]) == (None, None)
    assert (summary["rows_usage_reported"], summary["rows_usage_unknown"]) == (0, 4)
    assert summary["cost_usd"] is None and summary["rows_cost_unknown"] == 4
    assert _table_line(result.stderr, "tokens") == "usage not reported by the server (4 rows)"
    assert "no usage reported" in _table_line(result.stderr, "cost")
    assert "0 in, 0 out" not in result.stderr
    status = _status(out)
    assert (status["prompt_tokens"], status["completion_tokens"]) == (None, None)
    text = run_cli("status", out).stdout
    assert any(line.split() == ["prompt_tokens", "unknown"] for line in text.splitlines())


def test_usage_partly_reported_says_for_how_many_rows(
        tmp_path: Path, make_sim: Callable[..., SimulatorThread]) -> None:
    # Streamed rows of a server that omits usage beside rows that are not streamed.
    sim = make_sim(omit_stream_usage=True)
    rows = [dict(r, params={"stream": True}) if i % 2 else r for i, r in enumerate(prompts(4))]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.parquet"
    result = _run(sim, src, out, "--model", "gpt-4o-mini")
    assert result.exit_code == 0, result.stderr
    reported = [r for r in read_output(out) if r["prompt_tokens"] is not None]
    assert len(reported) == 2
    summary = _summary(out)
    prompt = sum(r["prompt_tokens"] for r in reported)
    completion = sum(r["completion_tokens"] for r in reported)
    assert summary["prompt_tokens"] is None
    assert (summary["prompt_tokens_known"], summary["completion_tokens_known"]) == (
        prompt, completion)
    assert _table_line(result.stderr, "tokens") == (
        f"usage not reported for 2 rows ({prompt:,} in, {completion:,} out for the other 2)")


def test_known_totals_stay_plain_numbers(tmp_path: Path, sim: SimulatorThread) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", prompts(3))
    out = tmp_path / "out.parquet"
    result = _run(sim, src, out, "--model", "gpt-4o-mini")
    assert result.exit_code == 0, result.stderr
    output = read_output(out)
    summary = _summary(out)
    total = sum(r["cost_usd"] for r in output)
    assert summary["cost_usd"] == pytest.approx(total, abs=1e-6) == summary["cost_usd_known"]
    assert (summary["rows_priced"], summary["rows_cost_unknown"]) == (3, 0)
    assert summary["prompt_tokens"] == sum(r["prompt_tokens"] for r in output)
    assert _table_line(result.stderr, "tokens").endswith(" out")
    assert _table_line(result.stderr, "cost").startswith("$")
