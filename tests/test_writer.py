"""Journal records, Arrow tables, atomic Parquet parts and the final latest-wins merge."""

from __future__ import annotations

import os
import random
import resource
import tracemalloc
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batcher.io import writer
from batcher.io.writer import (
    COLUMNS_KEY,
    RESULT_SCHEMA,
    JournalScan,
    UnreadableSource,
    encode_records,
    iter_journal,
    keep_masks,
    read_metadata,
    records_to_table,
    result_to_record,
    superseded_masks,
    write_final,
    write_part,
)
from batcher.types import ResultRow


def row(id_: str, status: str = "ok", **kw: Any) -> ResultRow:
    kw.setdefault("completed_at", "2026-03-01T12:00:00.250Z")
    return ResultRow(id=id_, status=status, **kw)  # type: ignore[arg-type]


def part_from_rows(path: Path, rows: list[ResultRow]) -> Path:
    pq.write_table(records_to_table([result_to_record(r) for r in rows]), path)
    return path


def test_result_schema_is_the_promised_columns_in_order() -> None:
    expected = [
        ("id", pa.string()), ("status", pa.string()), ("output", pa.string()),
        ("parsed", pa.string()), ("finish_reason", pa.string()), ("finish_reason_raw", pa.string()),
        ("model", pa.string()), ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()), ("total_tokens", pa.int64()),
        ("cached_tokens", pa.int64()), ("reasoning_tokens", pa.int64()),
        ("cost_usd", pa.float64()), ("cost_usd_original", pa.float64()), ("cached", pa.bool_()),
        ("latency_ms", pa.float64()), ("wait_ms", pa.float64()), ("ttft_ms", pa.float64()),
        ("attempts", pa.int32()), ("http_status", pa.int32()), ("error", pa.string()),
        ("error_type", pa.string()), ("response_id", pa.string()), ("tool_calls", pa.string()),
        ("embedding", pa.list_(pa.float32())), ("raw", pa.string()),
        ("completed_at", pa.timestamp("ms", tz="UTC")),
    ]
    assert [(f.name, f.type) for f in RESULT_SCHEMA] == expected


def test_record_round_trips_through_the_journal_into_a_table() -> None:
    r = row("a", output="hello", finish_reason="stop", model="m-1", prompt_tokens=10,
            completion_tokens=2, total_tokens=12, cost_usd=0.0015, latency_ms=12.5,
            attempts=2, http_status=200, embedding=[0.5, 1.25],
            columns={"expected": "hi", "n": 3})
    line = encode_records([result_to_record(r)])
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    rec = orjson.loads(line)
    assert rec[COLUMNS_KEY] == {"expected": "hi", "n": 3}
    table = records_to_table([rec])
    assert table.schema.names == [*RESULT_SCHEMA.names, "expected", "n"]
    got = table.to_pylist()[0]
    assert got["output"] == "hello" and got["cost_usd"] == 0.0015 and got["attempts"] == 2
    assert got["embedding"] == [0.5, 1.25]
    assert got["completed_at"] == datetime(2026, 3, 1, 12, 0, 0, 250_000, tzinfo=UTC)
    assert got["expected"] == "hi" and got["n"] == 3
    assert table.schema.field("n").type == pa.int64()


def test_input_column_types_are_inferred_and_clashes_renamed() -> None:
    recs = [result_to_record(r) for r in [
        row("a", columns={"i": 1, "f": 1, "mix": 1, "none": None, "b": True, "output": "x"}),
        row("b", columns={"i": 2, "f": 2.5, "mix": "two", "b": False}),
        row("c", columns={"mix": [1, 2]}),
    ]]
    table = records_to_table(recs)
    types = {f.name: f.type for f in table.schema}
    assert types["i"] == pa.int64()
    assert types["f"] == pa.float64()
    assert types["mix"] == pa.string()
    assert types["none"] == pa.null()
    assert types["b"] == pa.bool_()
    # An input column named like a result column never overwrites the answer.
    assert types["input_output"] == pa.string()
    assert table.column("output").to_pylist() == [None, None, None]
    assert table.column("mix").to_pylist() == ["1", "two", "[1,2]"]
    assert table.column("i").to_pylist() == [1, 2, None]


def test_completed_at_without_zone_is_utc_and_garbage_is_null() -> None:
    table = records_to_table([result_to_record(row("a", completed_at="2026-01-02T03:04:05")),
                              result_to_record(row("b", completed_at="not a time")),
                              result_to_record(row("c", completed_at=""))])
    assert table.column("completed_at").to_pylist() == [
        datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC), None, None]


def test_iter_journal_discards_torn_and_garbage_lines(tmp_path: Path) -> None:
    journal = tmp_path / "journal-000001.jsonl"
    good = encode_records([result_to_record(row(f"r{i}")) for i in range(3)])
    journal.write_bytes(good[:-1] + b"\n" + b"{not json}\n" + b'{"id": 5}\n'
                        + encode_records([result_to_record(row("last"))])[:-7])
    scan = JournalScan()
    ids = [rec["id"] for rec in iter_journal(journal, scan)]
    assert ids == ["r0", "r1", "r2"]
    assert scan.records == 3 and scan.discarded == 3


def test_write_part_streams_with_one_schema_across_batches(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(writer, "PART_BATCH_ROWS", 4)
    journal = tmp_path / "journal-000001.jsonl"
    rows = [row(f"r{i}", columns={"late": None if i < 6 else i, "s": f"v{i}"})
            for i in range(10)]
    journal.write_bytes(encode_records(result_to_record(r) for r in rows) + b'{"id": "torn')
    part = tmp_path / "part-000001.parquet"
    scan = write_part(journal, part)
    assert (scan.records, scan.discarded) == (10, 1)
    table = pq.read_table(part)
    assert table.num_rows == 10
    assert table.schema.field("late").type == pa.int64()
    assert table.column("late").to_pylist() == [None] * 6 + [6, 7, 8, 9]
    assert pq.ParquetFile(part).num_row_groups == 3
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_write_part_of_empty_journal_writes_nothing(tmp_path: Path) -> None:
    journal = tmp_path / "journal-000001.jsonl"
    journal.write_bytes(b'{"id": "half')
    part = tmp_path / "part-000001.parquet"
    assert write_part(journal, part).records == 0
    assert not part.exists()


def test_keep_masks_keep_the_latest_row_of_each_id() -> None:
    masks = keep_masks([pa.array(["a", "b", "a"]), pa.array(["c", "b"]), pa.array(["a"])])
    assert [m.to_pylist() for m in masks] == [[False, False, False], [True, True], [True]]


def _brute_force_masks(sources: list[list[str]]) -> list[list[bool]]:
    last: dict[str, tuple[int, int]] = {}
    for s, ids in enumerate(sources):
        for i, id_ in enumerate(ids):
            last[id_] = (s, i)
    return [[last[id_] == (s, i) for i, id_ in enumerate(ids)] for s, ids in enumerate(sources)]


@pytest.mark.parametrize("seed", range(6))
def test_superseded_masks_keep_exactly_the_latest_row_of_each_id(seed: int) -> None:
    rng = random.Random(seed)
    pool = [f"id-{n}" for n in range(rng.choice([5, 50, 5000]))]
    sources = [[rng.choice(pool) for _ in range(rng.randrange(0, 300))]
               for _ in range(rng.randrange(1, 6))]
    # Chunked like a Parquet read: several chunks per source, some empty.
    columns: list[pa.ChunkedArray[Any] | pa.Array[Any]] = []
    for ids in sources:
        cut = rng.randrange(0, len(ids) + 1)
        columns.append(pa.chunked_array([ids[:cut], [], ids[cut:]], type=pa.string()))
    expected = _brute_force_masks(sources)
    masks = superseded_masks(columns)
    for mask, want in zip(masks, expected, strict=True):
        assert (mask.to_pylist() if mask is not None else [True] * len(want)) == want
        assert (mask is None) == all(want)
    assert [m.to_pylist() for m in keep_masks(columns)] == expected


def test_write_final_without_duplicates_keeps_every_row_in_order(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(writer, "PART_BATCH_ROWS", 3)
    p1 = part_from_rows(tmp_path / "p1.parquet", [row(f"a{i}") for i in range(7)])
    p2 = part_from_rows(tmp_path / "p2.parquet", [row(f"b{i}", columns={"n": i})
                                                  for i in range(5)])
    out = tmp_path / "out.parquet"
    assert write_final([p1, p2], out) == 12
    table = pq.read_table(out)
    assert table.column("id").to_pylist() == [f"a{i}" for i in range(7)] + [
        f"b{i}" for i in range(5)]
    assert table.column("n").to_pylist() == [None] * 7 + list(range(5))


def test_input_columns_that_come_and_go_stay_aligned_with_their_rows() -> None:
    recs = [result_to_record(row(f"r{i}", columns=cols)) for i, cols in enumerate(
        [{"x": 1}, {}, {"x": 3, "y": "b"}, {"y": "c"}, {"x": 5}])]
    table = records_to_table(recs)
    assert table.column("x").to_pylist() == [1, None, 3, None, 5]
    assert table.column("y").to_pylist() == [None, None, "b", "c", None]


def test_fixed_fields_of_the_wrong_type_are_made_to_fit() -> None:
    recs: list[dict[str, Any]] = [
        {**result_to_record(row("a")), "prompt_tokens": True, "cost_usd": 2, "output": 5,
         "attempts": 1.5, "latency_ms": "slow", "tool_calls": [{"f": 1}]},
        {"id": "b", "status": "error", COLUMNS_KEY: ["not", "a", "dict"]},  # hand-made
    ]
    table = records_to_table(recs)
    got = table.to_pylist()
    assert table.schema == RESULT_SCHEMA
    assert got[0]["prompt_tokens"] is None and got[0]["cost_usd"] == 2.0
    assert got[0]["output"] == "5" and got[0]["attempts"] is None
    assert got[0]["latency_ms"] is None and got[0]["tool_calls"] == '[{"f":1}]'
    assert got[1]["id"] == "b" and got[1]["status"] == "error" and got[1]["output"] is None


def test_write_part_holds_one_batch_of_values_not_the_journal(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(writer, "PART_BATCH_ROWS", 256)

    def peak(n: int) -> int:
        journal = tmp_path / f"journal-{n}.jsonl"
        journal.write_bytes(encode_records(
            result_to_record(row(f"r{i}", output="x" * 200, columns={"n": i}))
            for i in range(n)))
        tracemalloc.start()
        try:
            assert write_part(journal, tmp_path / f"part-{n}.parquet").records == n
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    small, large = peak(1000), peak(8000)
    assert large < 1.5 * small, (small, large)


def test_write_final_merges_latest_wins_and_unifies_types(tmp_path: Path) -> None:
    p1 = part_from_rows(tmp_path / "p1.parquet", [
        row("a", "error", error="boom", columns={"x": None, "y": 1}),
        row("b", output="B1", columns={"x": None, "y": 2}),
    ])
    p2 = part_from_rows(tmp_path / "p2.parquet", [
        row("a", output="A2", columns={"x": 7, "y": "seven", "z": True}),
        row("c", output="C2", columns={"x": 8, "y": "eight"}),
    ])
    out = tmp_path / "out.parquet"
    assert write_final([p1, p2], out, metadata={"k": "v"}) == 3
    table = pq.read_table(out)
    assert table.schema.names[: len(RESULT_SCHEMA)] == RESULT_SCHEMA.names
    types = {f.name: f.type for f in table.schema}
    assert types["x"] == pa.int64()   # null in p1, ints in p2
    assert types["y"] == pa.string()  # ints in p1, strings in p2: kept as text
    assert types["z"] == pa.bool_()   # missing in p1
    got = {r["id"]: r for r in table.to_pylist()}
    assert sorted(got) == ["a", "b", "c"]
    assert got["a"]["status"] == "ok" and got["a"]["output"] == "A2" and got["a"]["x"] == 7
    assert got["b"]["y"] == "2" and got["b"]["z"] is None
    assert read_metadata(out) == {"k": "v"}


def test_write_final_of_nothing_is_an_empty_file_with_the_schema(tmp_path: Path) -> None:
    out = tmp_path / "out.parquet"
    assert write_final([], out) == 0
    assert pq.read_table(out).schema == RESULT_SCHEMA


def test_write_final_is_atomic_when_a_source_is_unreadable(tmp_path: Path) -> None:
    out = tmp_path / "out.parquet"
    out.write_bytes(b"previous output")
    good = part_from_rows(tmp_path / "p1.parquet", [row("a")])
    bad = tmp_path / "p2.parquet"
    bad.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(UnreadableSource) as info:
        write_final([good, bad], out)
    assert info.value.path == bad
    assert out.read_bytes() == b"previous output"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.parquet", "p1.parquet",
                                                          "p2.parquet"]


def test_write_final_failing_midway_leaves_no_partial_output(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(writer, "PART_BATCH_ROWS", 2)
    part = part_from_rows(tmp_path / "p1.parquet", [row(f"r{i}") for i in range(10)])
    out = tmp_path / "out.parquet"
    write_final([part], out)
    before = out.read_bytes()
    calls = 0
    real = writer.conform

    def failing(batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise OSError("disk full")
        return real(batch, schema)

    monkeypatch.setattr(writer, "conform", failing)
    with pytest.raises(OSError, match="disk full"):
        write_final([part], out)
    assert calls == 3
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.parquet", "p1.parquet"]


def test_write_final_keeps_only_the_sources_it_is_reading_open(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A 10M-row state has hundreds of parts; holding every one open cost memory that grew
    # with the job and an open file each. Under an open-file limit far below the number of
    # parts, the merge still finishes, in ordinal order.
    monkeypatch.setattr(writer, "GATHER_ROWS", 6)
    parts = [part_from_rows(tmp_path / f"p{k:03d}.parquet",
                            [row(f"r{3 * k + j}", ordinal=3 * k + j + 1) for j in range(3)])
             for k in range(150)]
    out = tmp_path / "out.parquet"
    # New descriptors take the lowest free numbers: 40 more than are open now (a shell's
    # inherited fd 255 does not count against them).
    free = len(os.listdir("/proc/self/fd")) + 40
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (free, hard))
    try:
        rows = write_final(parts, out, input_ids=iter(()), input_rows=450, by_ordinal=True,
                           spill_folder=tmp_path)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert rows == 450
    assert pq.read_table(out, columns=["id"]).column("id").to_pylist() == [
        f"r{i}" for i in range(450)]
