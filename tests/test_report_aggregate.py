"""The report's aggregations against values computed by hand on small outputs."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batcher.errors import ConfigError
from batcher.io.writer import RESULT_SCHEMA
from batcher.report.aggregate import aggregate, percentiles, resolve_expected_column

T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)  # an epoch multiple of 10 s


def batch(rows: list[dict[str, Any]], extra: dict[str, pa.DataType] | None = None
          ) -> pa.RecordBatch:
    fields = [f for f in RESULT_SCHEMA if f.name != "embedding"]
    fields += [pa.field(name, typ) for name, typ in (extra or {}).items()]
    schema = pa.schema(fields)
    return pa.RecordBatch.from_pylist([{**r} for r in rows], schema=schema)


def row(i: int, at_s: float, **fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"id": f"r{i}", "status": "ok", "model": "m1", "finish_reason": "stop",
                            "attempts": 1, "completed_at": T0 + timedelta(seconds=at_s)}
    return {**base, **fields}


def test_throughput_buckets_are_10_s_of_completed_at_with_retries_and_429s() -> None:
    rows = [row(0, 0.0), row(1, 9.999), row(2, 10.0, attempts=3),
            row(3, 25.5, status="error", error_type="rate_limited", http_status=429, attempts=1),
            row(4, 29.0, status="error", error_type="server_error", http_status=503, attempts=4)]
    # split across two batches: the bucket at 20 s gets rows from both
    stats = aggregate([batch(rows[:4]), batch(rows[4:])])
    t0 = int(T0.timestamp())
    assert sorted(stats.buckets) == [t0, t0 + 10, t0 + 20]
    first, second, third = (stats.buckets[t0 + k] for k in (0, 10, 20))
    assert (first.rows, first.retries, first.errors) == (2, 0, 0)
    assert (second.rows, second.retries) == (1, 2)
    assert (third.rows, third.errors, third.rate_limited, third.retries) == (2, 2, 1, 3)
    assert stats.retries == 5
    assert (stats.rows, stats.ok, stats.error) == (5, 3, 2)


def test_latency_percentiles_interpolate_linearly() -> None:
    # 1..100 ms: p50 = 50.5, p90 = 90.1, p99 = 99.01 (numpy's "linear" method)
    rows = [row(i, i, latency_ms=float(i + 1)) for i in range(100)]
    rows.append(row(100, 100, status="error", latency_ms=None))  # no send answered: not counted
    stats = aggregate([batch(rows[:37]), batch(rows[37:])])
    p = stats.latency.percentiles()
    assert p.count == 100
    assert p.p50 == pytest.approx(50.5)
    assert p.p90 == pytest.approx(90.1)
    assert p.p99 == pytest.approx(99.01)
    assert p.mean == pytest.approx(50.5)
    assert percentiles(pa.array([10.0, None, 30.0])).p50 == pytest.approx(20.0)
    assert percentiles(pa.array([], pa.float64())).p50 is None


def test_latency_histogram_covers_every_value() -> None:
    rows = [row(i, i, latency_ms=float(v)) for i, v in enumerate([10, 20, 20, 30, 1000])]
    bins = aggregate([batch(rows)]).latency.histogram()
    assert len(bins) == 40 and bins[0][0] == 0.0
    # top = p99.5 = 30 + 0.98 * 970 = 980.6 ms: bins of 24.515 ms; 10 and 20 in the first,
    # 30 in the second, the 1000 ms outlier clipped into the last
    assert bins[0][1] == pytest.approx(24.515, rel=1e-4)
    assert [c for _, _, c in bins[:2]] == [3, 1] and bins[-1][2] == 1
    assert sum(count for _, _, count in bins) == 5


def test_exact_match_accuracy_per_model_with_an_expected_column() -> None:
    extra = {"answer": pa.string()}
    rows = [
        row(0, 0, model="a", output=" Paris\n", answer="Paris"),   # match (whitespace trimmed)
        row(1, 1, model="a", output="paris", answer="Paris"),      # case differs: miss
        row(2, 2, model="a", output="x", answer=None),             # no expected: not counted
        row(3, 3, model="b", output="42", answer="42"),            # match
        row(4, 4, model="b", status="error", output=None, answer="7"),  # error: a miss
    ]
    stats = aggregate([batch(rows, extra)], expected_column="answer")
    a, b = stats.models["a"], stats.models["b"]
    assert (a.expected_rows, a.exact_matches, a.accuracy) == (2, 1, 0.5)
    assert (b.expected_rows, b.exact_matches, b.accuracy) == (2, 1, 0.5)
    without = aggregate([batch(rows, extra)])
    assert without.models["a"].accuracy is None


def test_expected_column_resolution() -> None:
    with_expected = pa.schema([("status", pa.string()), ("expected", pa.int64())])
    assert resolve_expected_column(with_expected, None) == "expected"
    assert resolve_expected_column(pa.schema([("status", pa.string())]), None) is None
    with pytest.raises(ConfigError, match="--expected-column 'gold'"):
        resolve_expected_column(with_expected, "gold")


def test_an_int_expected_column_matches_the_output_text() -> None:
    rows = [row(0, 0, output="42", expected=42), row(1, 1, output="41", expected=42)]
    stats = aggregate([batch(rows, {"expected": pa.int64()})], expected_column="expected")
    assert stats.models["m1"].accuracy == 0.5


def test_per_model_table_tokens_cost_latency_length_and_errors() -> None:
    rows = [
        row(0, 0, model="a", prompt_tokens=10, completion_tokens=5, cost_usd=0.01,
            latency_ms=100.0),
        row(1, 1, model="a", prompt_tokens=20, completion_tokens=7, cost_usd=0.02,
            latency_ms=300.0, finish_reason="length"),
        row(2, 2, model="a", status="error", error_type="timeout", error="timed out",
            latency_ms=None),
        row(3, 3, model="b", prompt_tokens=1, completion_tokens=1, cost_usd=None,
            latency_ms=50.0),
        row(4, 4, model=None, status="error", error_type="bad_request", http_status=400,
            error="bad"),
    ]
    stats = aggregate([batch(rows)])
    a, b = stats.models["a"], stats.models["b"]
    assert (a.rows, a.ok, a.error) == (3, 2, 1)
    assert a.error_rate == pytest.approx(1 / 3)
    assert a.length_share == 0.5
    assert (a.spend.prompt_tokens, a.spend.completion_tokens) == (30, 12)
    assert a.spend.cost_usd == pytest.approx(0.03)
    assert a.latency.percentiles().p50 == pytest.approx(200.0)
    assert b.spend.cost_usd is None and b.spend.rows_cost_unknown == 1  # unknown, never 0
    assert stats.spend.cost_usd is None and stats.spend.cost_usd_known == pytest.approx(0.03)
    assert "(unknown)" in stats.models and stats.models["(unknown)"].error == 1
    assert stats.finish_reasons == {"stop": 2, "length": 1}
    assert stats.error_types == {"timeout": 1, "bad_request": 1}
    assert {(e.id, e.error_type, e.http_status) for e in stats.examples} == {
        ("r2", "timeout", None), ("r4", "bad_request", 400)}


def test_at_most_three_examples_per_error_type_across_batches() -> None:
    rows = [row(i, i, status="error", error_type="server_error", error=f"boom {i}")
            for i in range(5)]
    stats = aggregate([batch(rows[:2]), batch(rows[2:])])
    assert [e.message for e in stats.examples] == ["boom 0", "boom 1", "boom 2"]


def test_missing_columns_read_as_null() -> None:
    old = pa.RecordBatch.from_pylist([{"status": "ok"}, {"status": "error"}])
    stats = aggregate([old])
    assert (stats.rows, stats.ok, stats.error, stats.buckets) == (2, 1, 1, {})
    assert stats.latency.percentiles().count == 0


def test_answers_still_in_the_state_count_once_per_id_latest_winning(tmp_path: Path) -> None:
    from batcher.checkpoint import state_dir_for
    from batcher.io.writer import encode_records, result_to_record
    from batcher.report.aggregate import aggregate_output, has_results
    from batcher.types import ResultRow

    def table(rows: list[dict[str, Any]]) -> pa.Table:
        return pa.Table.from_batches([batch(rows)])

    out = tmp_path / "out.parquet"
    state = state_dir_for(out)
    state.mkdir()
    assert not has_results(out)
    # an earlier run's output: r1 failed, r2 answered
    pq.write_table(table([row(1, 0, status="error", error_type="timeout"), row(2, 1)]), out)
    # this run's compacted part: r1 retried and answered
    pq.write_table(table([row(1, 2)]), state / "part-000001.parquet")
    # and its live journal: r3 answered, then r2 sent again and failed (--retry-failed would
    # not, but the latest result is what the output will hold)
    late = [ResultRow(id="r3", status="ok", model="m1", latency_ms=5.0,
                      completed_at="2026-01-01T12:00:03.000Z"),
            ResultRow(id="r2", status="error", error_type="server_error", model="m1",
                      completed_at="2026-01-01T12:00:04.000Z")]
    (state / "journal-000002.jsonl").write_bytes(encode_records(map(result_to_record, late)))
    stats = aggregate_output(out)
    assert (stats.rows, stats.ok, stats.error) == (3, 2, 1)
    assert stats.error_types == {"server_error": 1}
    assert has_results(out)
    out.unlink()  # interrupted before any output existed: the state alone
    alone = aggregate_output(out)
    assert (alone.rows, alone.ok, alone.error) == (3, 2, 1)  # r1 from the part, r2 and r3
    assert alone.models["m1"].latency.percentiles().count == 1  # only r3 carries a latency
