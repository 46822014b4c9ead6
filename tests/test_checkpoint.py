"""The state beside an output: durability across crashes, the lock, fingerprints, finalize, status."""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batcher import checkpoint
from batcher.checkpoint import StateStore, input_fingerprint, state_dir_for, status
from batcher.errors import Aborted, ConfigError, InputError, LockHeld, StateMismatch
from batcher.io import writer
from batcher.io.writer import RESULT_SCHEMA, encode_records, result_to_record
from batcher.types import ResultRow

ROOT = Path(__file__).resolve().parents[1]
FP = {"model": "a", "input": "abc"}


def row(id_: str, status: str = "ok", **kw: Any) -> ResultRow:
    kw.setdefault("completed_at", "2026-03-01T12:00:00Z")
    return ResultRow(id=id_, status=status, **kw)  # type: ignore[arg-type]


def rows(n: int, prefix: str = "r", status: str = "ok", **kw: Any) -> list[ResultRow]:
    return [row(f"{prefix}{i}", status, **kw) for i in range(n)]


def open_store(out: Path, fp: dict[str, Any] | None = None, **kw: Any) -> StateStore:
    return StateStore.open(out, fp if fp is not None else FP, run_id="test-run", **kw)


def state_files(out: Path) -> list[str]:
    return sorted(os.listdir(state_dir_for(out)))


# --- subprocesses ---------------------------------------------------------------------------

HOLDER = """
import sys, time
from pathlib import Path
from batcher.checkpoint import StateStore
from batcher.types import ResultRow
store = StateStore.open(Path(sys.argv[1]), {"model": "a", "input": "abc"}, run_id="holder-run")
store.append([ResultRow(id=f"h{i}", status="error" if i % 3 == 0 else "ok", prompt_tokens=5,
                        cost_usd=0.5) for i in range(10)])
store.update_meta(total_rows=25, status="running")
print("ready", flush=True)
time.sleep(60)
"""

APPENDER = """
import sys
from pathlib import Path
from batcher.checkpoint import StateStore
from batcher.types import ResultRow
store = StateStore.open(Path(sys.argv[1]), {"model": "a", "input": "abc"}, run_id="appender",
                        compact_every=37)
print("ready", flush=True)
i = 0
while True:
    batch = [ResultRow(id=f"k{i + j}", status="ok", output="x" * 300, columns={"n": i + j})
             for j in range(1 + i % 4)]
    store.append(batch)
    sys.stdout.write("".join(r.id + "\\n" for r in batch))
    sys.stdout.flush()
    i += len(batch)
"""


@pytest.fixture
def spawn() -> Iterator[Any]:
    procs: list[subprocess.Popen[str]] = []

    def start(script: str, *args: str) -> subprocess.Popen[str]:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        proc = subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env)
        procs.append(proc)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if line != "ready\n":
            proc.kill()
            raise AssertionError(f"subprocess failed: {line!r} {proc.communicate()[1]}")
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)


def kill9(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGKILL)
    out, _ = proc.communicate(timeout=10)
    return out


# --- input fingerprint ----------------------------------------------------------------------


def test_input_fingerprint_is_name_independent_and_sees_head_tail_and_size(
        tmp_path: Path) -> None:
    data = bytearray(random.Random(1).randbytes(3 * (1 << 20)))
    a = tmp_path / "a.jsonl"
    a.write_bytes(data)
    b = tmp_path / "renamed.jsonl"
    b.write_bytes(data)
    assert input_fingerprint(a) == input_fingerprint(b)
    assert len(input_fingerprint(a)) == 64
    for where in (10, len(data) - 10):
        changed = bytearray(data)
        changed[where] ^= 1
        b.write_bytes(changed)
        assert input_fingerprint(b) != input_fingerprint(a)
    b.write_bytes(data + b"x")
    assert input_fingerprint(b) != input_fingerprint(a)


def test_input_fingerprint_of_a_directory_uses_its_parquet_files(tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir()
    pq.write_table(pa.table({"x": [1]}), d / "1.parquet")
    first = input_fingerprint(d)
    (d / "notes.txt").write_text("ignored")
    (d / "_SUCCESS.parquet").write_text("ignored too")
    assert input_fingerprint(d) == first
    pq.write_table(pa.table({"x": [2]}), d / "2.parquet")
    assert input_fingerprint(d) != first
    with pytest.raises(InputError):
        input_fingerprint(tmp_path / "missing.jsonl")


def test_input_fingerprint_of_a_1gb_file_reads_two_mib(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Counted, not timed: a 1 GiB input costs two reads of 1 MiB, whatever the machine.
    import builtins

    from batcher.io import location as location_module

    big = tmp_path / "big.jsonl"
    with open(big, "wb") as fh:
        fh.truncate(1 << 30)  # sparse: 1 GiB without writing it
    read: list[int] = []

    class Counting:
        def __init__(self, fh: Any) -> None:
            self._fh = fh

        def __enter__(self) -> Counting:
            return self

        def __exit__(self, *exc: object) -> None:
            self._fh.close()

        def read(self, n: int = -1) -> bytes:
            data: bytes = self._fh.read(n)
            read.append(len(data))
            return data

        def __getattr__(self, name: str) -> Any:
            return getattr(self._fh, name)

    monkeypatch.setattr(location_module, "open",
                        lambda *a, **kw: Counting(builtins.open(*a, **kw)),  # noqa: SIM115
                        raising=False)
    first = input_fingerprint(big)
    assert read == [1 << 20, 1 << 20]
    monkeypatch.undo()
    assert input_fingerprint(big) == first


# --- append / resume ------------------------------------------------------------------------


def test_appended_rows_are_done_for_a_new_store(tmp_path: Path) -> None:
    out = tmp_path / "results.parquet"
    with open_store(out) as store:
        store.append(rows(3) + rows(2, prefix="e", status="error", error="boom"))
        store.append([row("r0", prompt_tokens=7, completion_tokens=3, cost_usd=0.25)])
    with open_store(out) as again:
        assert again.done_ids(include_errors=False) == {"r0", "r1", "r2"}
        assert again.done_ids(include_errors=True) == {"r0", "r1", "r2", "e0", "e1"}
        c = again.counters
        assert (c.ok, c.error, c.prompt_tokens_known, c.completion_tokens_known,
                c.cost_usd_known) == (3, 2, 7, 3, 0.25)
        # The first answers of r0..r2 carried no usage or cost: no total, never a silent 0.
        assert (c.rows_priced, c.rows_cost_unknown, c.cost_usd) == (1, 3, None)
        assert (c.rows_usage_reported, c.rows_usage_unknown, c.prompt_tokens) == (1, 3, None)
        assert again.discarded_records == 0


def test_latest_result_of_an_id_wins(tmp_path: Path) -> None:
    out = tmp_path / "results.parquet"
    with open_store(out, compact_every=2) as store:
        store.append([row("a", "error"), row("b", "ok")])  # compacted into a part
        store.append([row("a", "ok"), row("b", "error")])  # journal
        assert store.done_ids(include_errors=False) == {"a"}
        assert (store.counters.ok, store.counters.error) == (1, 1)
    with open_store(out) as again:
        assert again.done_ids(include_errors=False) == {"a"}
        assert again.done_ids(include_errors=True) == {"a", "b"}


def test_unknown_cost_and_usage_counts_agree_in_journal_part_and_output(
        tmp_path: Path) -> None:
    # 2 priced answers with usage, 3 answers with neither, 1 error: from a live journal
    # (status), from parts (reopen) and from the finalize record (after finalize).
    out = tmp_path / "results.parquet"
    priced = rows(2, prompt_tokens=10, completion_tokens=5, cost_usd=0.5)
    unknown = rows(3, prefix="u")
    expected = {"cost_usd": None, "cost_usd_known": 1.0, "rows_priced": 2,
                "rows_cost_unknown": 3, "prompt_tokens": None, "prompt_tokens_known": 20,
                "completion_tokens_known": 10, "rows_usage_reported": 2,
                "rows_usage_unknown": 3}

    def seen(counts: dict[str, Any]) -> dict[str, Any]:
        return {key: counts[key] for key in expected}

    with open_store(out) as store:
        store.append(priced + unknown + rows(1, prefix="e", status="error"))
        assert seen(status(out)) == expected
        assert seen(store.counters.as_dict()) == expected
    with open_store(out) as store:
        assert seen(store.counters.as_dict()) == expected
        store.finalize()
    with open_store(out) as store:
        assert seen(store.counters.as_dict()) == expected
    assert seen(status(out)) == expected


@pytest.mark.parametrize(("seed", "answered_again"), [(0, True), (1, True), (2, True),
                                                     (3, False), (4, False)])
def test_open_and_status_agree_with_replaying_every_result_in_order(
        tmp_path: Path, seed: int, answered_again: bool) -> None:
    # Parts, a finalized output and a live journal, with or without ids answered again (error
    # then ok, and back) within and across them: open/status must equal a plain replay.
    rng = random.Random(seed)
    fresh = iter(range(10**6))
    out = tmp_path / "results.parquet"
    latest: dict[str, str] = {}
    spent = 0.0

    def batch() -> list[ResultRow]:
        nonlocal spent
        made = []
        for _ in range(rng.randrange(1, 30)):
            id_ = f"i{rng.randrange(60) if answered_again else next(fresh)}"
            state = rng.choice(["ok", "ok", "error"])
            made.append(row(id_, state, cost_usd=1.0))
            latest[id_] = state
            spent += 1.0
        return made

    with open_store(out, compact_every=rng.choice([7, 25, 1000])) as store:
        for _ in range(rng.randrange(2, 8)):
            store.append(batch())
        if rng.random() < 0.5:
            store.finalize()
        for _ in range(rng.randrange(0, 5)):
            store.append(batch())
        live = status(out)  # the store holds a journal: read as a live run's
        ok = {i for i, s in latest.items() if s == "ok"}
        assert (live["ok"], live["error"], live["cost_usd"]) == (
            len(ok), len(latest) - len(ok), pytest.approx(spent))
        assert store.done_ids(include_errors=False) == ok
    with open_store(out) as again:
        assert again.done_ids(include_errors=False) == ok
        assert again.done_ids(include_errors=True) == set(latest)
        c = again.counters
        assert (c.ok, c.error, c.cost_usd) == (len(ok), len(latest) - len(ok),
                                               pytest.approx(spent))


def test_record_sources_added_after_a_finish_still_win() -> None:
    rec = checkpoint._Record()
    rec.add_table(pa.table({"id": ["a", "b"], "status": ["error", "ok"]}), spend=False)
    rec.finish()
    rec.add_table(pa.table({"id": ["a", "c"], "status": ["ok", "error"]}), spend=False)
    rec.finish()
    assert (rec.ok, rec.err) == ({"a", "b"}, {"c"})
    assert (rec.counters.ok, rec.counters.error) == (2, 1)


def test_journal_is_compacted_into_parts(tmp_path: Path) -> None:
    out = tmp_path / "results.parquet"
    with open_store(out, compact_every=5) as store:
        for r in rows(12):
            store.append([r])
        assert state_files(out) == ["journal-000003.jsonl", "lock", "meta.json",
                                    "part-000001.parquet", "part-000002.parquet"]
    assert state_files(out) == ["lock", "meta.json", "part-000001.parquet",
                                "part-000002.parquet", "part-000003.parquet"]
    assert sum(pq.read_metadata(state_dir_for(out) / n).num_rows
               for n in state_files(out) if n.startswith("part-")) == 12


def test_torn_last_line_is_discarded_and_its_id_not_done(tmp_path: Path) -> None:
    out = tmp_path / "results.parquet"
    state = state_dir_for(out)
    with open_store(out):
        pass
    # What a crash mid-write leaves: complete lines, then half a line.
    full = encode_records(result_to_record(r) for r in rows(3))
    torn = encode_records([result_to_record(row("torn"))])[:40]
    (state / "journal-000001.jsonl").write_bytes(full + torn)
    (state / ".part-000001.parquet.999.tmp").write_bytes(b"half a part")
    with open_store(out) as store:
        assert store.discarded_records == 1
        assert store.done_ids(include_errors=True) == {"r0", "r1", "r2"}
        store.append([row("next")])
    assert not [n for n in state_files(out) if n.endswith(".tmp")]
    with open_store(out) as store:
        assert store.done_ids(include_errors=True) == {"r0", "r1", "r2", "next"}


def test_journal_and_part_both_present_count_once(tmp_path: Path) -> None:
    out = tmp_path / "results.parquet"
    state = state_dir_for(out)
    with open_store(out) as store:
        store.append(rows(4, cost_usd=1.0))
        journal_bytes = (state / "journal-000001.jsonl").read_bytes()
    # A crash between writing part-1 and deleting journal-1.
    assert "part-000001.parquet" in state_files(out)
    (state / "journal-000001.jsonl").write_bytes(journal_bytes)
    with open_store(out) as store:
        assert "journal-000001.jsonl" not in state_files(out)
        assert store.done_ids(include_errors=True) == {"r0", "r1", "r2", "r3"}
        assert (store.counters.ok, store.counters.cost_usd) == (4, 4.0)
        store.finalize()
    assert pq.read_table(out).num_rows == 4


def test_corrupt_part_is_set_aside_and_its_ids_not_done(tmp_path: Path) -> None:
    out = tmp_path / "results.parquet"
    state = state_dir_for(out)
    with open_store(out, compact_every=3) as store:
        store.append(rows(3, prefix="a"))
        store.append(rows(3, prefix="b"))
    (state / "part-000001.parquet").write_bytes(b"PAR1 garbage, not a parquet file PAR1")
    with open_store(out) as store:
        assert store.done_ids(include_errors=True) == {"b0", "b1", "b2"}
        assert store.corrupt_parts == [state / "part-000001.parquet.corrupt"]
        assert store.warnings
        store.append(rows(3, prefix="a"))
        store.finalize()
    assert "part-000001.parquet.corrupt" in state_files(out)
    ids: list[Any] = pq.read_table(out, columns=["id"])["id"].to_pylist()
    assert sorted(ids) == ["a0", "a1", "a2", "b0", "b1", "b2"]
    assert status(out)["corrupt_parts"] == 1


def test_failed_write_does_not_swallow_the_next_record(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "results.parquet"
    with open_store(out) as store:
        store.append([row("a")])
        real_write = os.write

        def half_write(fd: int, data: Any) -> int:
            real_write(fd, bytes(data)[:10])
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(os, "write", half_write)
        with pytest.raises(OSError):
            store.append([row("lost")])
        monkeypatch.setattr(os, "write", real_write)
        store.append([row("b")])
        store.close()
        assert store.discarded_records == 1  # the fragment, dropped at compaction
    with open_store(out) as store:
        assert store.done_ids(include_errors=True) == {"a", "b"}


def test_failed_compaction_inside_append_keeps_the_rows(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "results.parquet"
    real = writer._commit

    def full_disk(tmp: Path, path: Path) -> None:
        raise OSError(28, "No space left on device")

    with open_store(out, compact_every=2) as store:
        # Both ways to a part (built while appending, or from the journal) end in _commit.
        monkeypatch.setattr(writer, "_commit", full_disk)
        store.append(rows(2))  # compaction fails, append still succeeds
        assert any("compacting the journal failed" in w for w in store.warnings)
        monkeypatch.setattr(writer, "_commit", real)
        store.append(rows(1, prefix="x"))  # same journal, no blank line in between
    assert state_files(out) == ["lock", "meta.json", "part-000001.parquet"]
    with open_store(out) as store:
        assert store.done_ids(include_errors=True) == {"r0", "r1", "x0"}
        assert store.discarded_records == 0


# --- the lock -------------------------------------------------------------------------------


def test_lock_held_by_a_live_process_then_taken_over_after_kill_9(
        tmp_path: Path, spawn: Any) -> None:
    out = tmp_path / "results.parquet"
    proc = spawn(HOLDER, str(out))
    with pytest.raises(LockHeld) as info:
        open_store(out)
    message = str(info.value)
    assert f"pid {proc.pid}" in message
    assert f"host {socket.gethostname()}" in message
    assert "holder-run" in message
    assert info.value.exit_code == 3
    kill9(proc)
    with open_store(out) as store:  # the OS released the dead process's flock
        assert len(store.done_ids(include_errors=True)) == 10
        lock = orjson.loads((state_dir_for(out) / "lock").read_bytes())
        assert lock["pid"] == os.getpid() and lock["run_id"] == "test-run"
        with pytest.raises(LockHeld):
            open_store(out)  # even the same process cannot open it twice


def test_output_folders_are_created_and_a_file_in_the_way_is_refused(tmp_path: Path) -> None:
    # PRODUCT.md: the output's parent folders are created as needed (one rule, shared with
    # the runner's check: batcher.checkpoint.ensure_output_folder).
    store = open_store(tmp_path / "new" / "dated" / "results.parquet")
    store.close()
    assert (tmp_path / "new" / "dated").is_dir()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        open_store(tmp_path / "file" / "results.parquet")


def test_close_is_idempotent_and_closed_store_refuses_work(tmp_path: Path) -> None:
    out = tmp_path / "results.parquet"
    store = open_store(out)
    store.close()
    store.close()
    with pytest.raises(RuntimeError):
        store.append([row("a")])
    with pytest.raises(RuntimeError):
        store.update_meta(status="finished")
    assert status(out)["running"] is False


# --- fingerprints ---------------------------------------------------------------------------


def test_fingerprint_mismatch_names_the_key(tmp_path: Path) -> None:
    out = tmp_path / "results.parquet"
    with open_store(out) as store:
        store.append(rows(2))
    with pytest.raises(StateMismatch) as info:
        open_store(out, {"model": "b", "input": "abc"})
    message = str(info.value)
    assert "model: 'a' -> 'b'" in message
    assert "input" not in message.split("(")[1].split(")")[0]
    assert "--restart" in message and "--force-resume" in message
    assert info.value.exit_code == 2
    # Nothing was changed by the refused open.
    with open_store(out) as store:
        assert store.done_ids(include_errors=True) == {"r0", "r1"}


def test_restart_wipes_state_and_old_output(tmp_path: Path) -> None:
    out = tmp_path / "results.parquet"
    with open_store(out) as store:
        store.append(rows(2))
        store.finalize()
        store.append(rows(1, prefix="x"))
    assert out.exists()
    with open_store(out, {"model": "b"}, restart=True) as store:
        assert store.done_ids(include_errors=True) == set()
        assert store.counters.ok == 0
        assert not out.exists()
        # Only the new run's journal, opened up front and still empty, beside lock and meta.
        assert state_files(out) == ["journal-000001.jsonl", "lock", "meta.json"]
        assert (store.state_dir / "journal-000001.jsonl").stat().st_size == 0
        assert store.meta["fingerprint"] == {"model": "b"}


def test_force_resume_keeps_results_and_records_new_fingerprint(tmp_path: Path) -> None:
    out = tmp_path / "results.parquet"
    with open_store(out) as store:
        store.append(rows(2))
    new = {"model": "b", "input": "abc"}
    with open_store(out, new, force_resume=True) as store:
        assert store.done_ids(include_errors=True) == {"r0", "r1"}
    with open_store(out, new) as store:  # the new fingerprint is now the job's
        assert store.done_ids(include_errors=True) == {"r0", "r1"}


def test_interrupted_restart_is_not_resumed_silently(tmp_path: Path) -> None:
    out = tmp_path / "results.parquet"
    with open_store(out) as store:
        store.append(rows(2))
    (state_dir_for(out) / "meta.json").unlink()  # a crash inside --restart's wipe
    with pytest.raises(StateMismatch, match=r"no meta\.json"):
        open_store(out)
    with open_store(out, force_resume=True) as store:
        assert store.done_ids(include_errors=True) == {"r0", "r1"}


def test_update_meta_is_durable_and_guards_the_store_keys(tmp_path: Path) -> None:
    out = tmp_path / "results.parquet"
    with open_store(out) as store:
        store.update_meta(total_rows=10, bad_rows=1, status="interrupted")
        with pytest.raises(ValueError, match="fingerprint"):
            store.update_meta(fingerprint={})
    meta = orjson.loads((state_dir_for(out) / "meta.json").read_bytes())
    assert (meta["total_rows"], meta["bad_rows"], meta["status"]) == (10, 1, "interrupted")
    assert meta["fingerprint"] == FP
    assert status(out)["pending"] == 10


# --- finalize -------------------------------------------------------------------------------


def test_finalize_one_row_per_id_latest_wins_with_carried_columns(tmp_path: Path) -> None:
    out = tmp_path / "results.parquet"
    with open_store(out, compact_every=3) as store:
        store.append([row("a", "error", error="boom", columns={"exp": None, "n": 1}),
                      row("b", output="B", columns={"exp": None, "n": 2}),
                      row("c", output="C", columns={"exp": None, "n": 3})])
        store.append([row("a", output="A", attempts=2, columns={"exp": 10, "n": "one"}),
                      row("d", output="D", columns={"exp": 11, "n": "four"})])
        store.update_meta(status="finished")
        assert store.finalize() == out
    table = pq.read_table(out)
    assert table.num_rows == 4
    assert table.schema.names[: len(RESULT_SCHEMA)] == RESULT_SCHEMA.names
    for f in RESULT_SCHEMA:
        assert table.schema.field(f.name).type == f.type
    assert table.schema.field("exp").type == pa.int64()
    assert table.schema.field("n").type == pa.string()
    got = {r["id"]: r for r in table.to_pylist()}
    assert got["a"]["status"] == "ok" and got["a"]["output"] == "A" and got["a"]["error"] is None
    assert got["a"]["attempts"] == 2 and got["a"]["exp"] == 10 and got["a"]["n"] == "one"
    assert got["b"]["n"] == "2" and got["b"]["exp"] is None
    # The output is now the record: the parts it absorbed are gone.
    assert state_files(out) == ["lock", "meta.json"]
    with open_store(out) as again:
        assert again.done_ids(include_errors=True) == {"a", "b", "c", "d"}
        assert again.done_ids(include_errors=False) == {"a", "b", "c", "d"}
        assert again.meta["finalized_rows"] == 4 and again.meta["status"] == "finished"


def test_retry_failed_after_finalize_merges_new_results_over_the_output(
        tmp_path: Path) -> None:
    out = tmp_path / "results.parquet"
    with open_store(out) as store:
        store.append(rows(3, cost_usd=1.0) + rows(2, prefix="e", status="error"))
        store.finalize()
    with open_store(out) as store:
        assert store.done_ids(include_errors=False) == {"r0", "r1", "r2"}
        assert (store.counters.ok, store.counters.error, store.counters.cost_usd) == (3, 2, 3.0)
        store.append([row("e0", output="fixed", cost_usd=0.5)])
        assert (store.counters.ok, store.counters.error) == (4, 1)
        store.finalize()
    got = {r["id"]: r for r in pq.read_table(out).to_pylist()}
    assert len(got) == 5
    assert got["e0"]["status"] == "ok" and got["e0"]["output"] == "fixed"
    assert got["e1"]["status"] == "error"
    with open_store(out) as store:
        assert store.done_ids(include_errors=False) == {"r0", "r1", "r2", "e0"}
        assert store.counters.cost_usd == 3.5


def test_finalize_with_nothing_new_keeps_the_output(tmp_path: Path) -> None:
    out = tmp_path / "results.parquet"
    with open_store(out) as store:
        store.append(rows(2))
        store.finalize()
    before = out.stat().st_mtime_ns
    with open_store(out) as store:
        store.finalize()
    assert out.stat().st_mtime_ns == before
    with open_store(out) as store:
        store.finalize()  # no results at all → an empty file with the schema
    assert pq.read_table(out).num_rows == 2


def test_empty_job_finalizes_to_an_empty_output(tmp_path: Path) -> None:
    out = tmp_path / "results.parquet"
    with open_store(out) as store:
        store.finalize()
    assert pq.read_table(out).schema.names == RESULT_SCHEMA.names


def test_output_replaced_by_someone_else_is_not_trusted(tmp_path: Path) -> None:
    out = tmp_path / "results.parquet"
    with open_store(out) as store:
        store.append(rows(2))
        store.finalize()
    pq.write_table(pq.read_table(out).replace_schema_metadata(None), out)
    with open_store(out) as store:
        assert store.done_ids(include_errors=True) == set()
        assert any("not the file this state finalized" in w for w in store.warnings)
        assert "finalized_rows" not in store.meta


def test_crash_between_output_rename_and_meta_update_loses_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "results.parquet"
    store = open_store(out, compact_every=2)
    store.append(rows(4))
    real = checkpoint._write_meta
    calls = 0

    def crash_on_second(state: Path, meta: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise KeyboardInterrupt("crash")
        real(state, meta)

    monkeypatch.setattr(checkpoint, "_write_meta", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        store.finalize()
    monkeypatch.setattr(checkpoint, "_write_meta", real)
    os.close(store._lock_fd)  # type: ignore[arg-type]  # the process "died"
    store._lock_fd = None
    assert out.exists() and "part-000001.parquet" in state_files(out)
    with open_store(out) as again:
        assert again.done_ids(include_errors=True) == {"r0", "r1", "r2", "r3"}
        assert again.meta["finalized_rows"] == 4
        assert "finalizing" not in again.meta
    assert state_files(out) == ["lock", "meta.json"]


def test_unreadable_part_at_finalize_aborts_and_keeps_the_old_output(tmp_path: Path) -> None:
    out = tmp_path / "results.parquet"
    with open_store(out) as store:
        store.append(rows(2))
        store.finalize()
    before = out.read_bytes()
    store = open_store(out, compact_every=1)
    store.append([row("new")])
    (state_dir_for(out) / "part-000002.parquet").write_bytes(b"not parquet")
    with pytest.raises(Aborted, match="unreadable"):
        store.finalize()
    store.close()
    assert out.read_bytes() == before
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    with open_store(out) as again:
        assert again.done_ids(include_errors=True) == {"r0", "r1"}


# --- status ---------------------------------------------------------------------------------


def test_status_mid_run_and_after(tmp_path: Path, spawn: Any) -> None:
    out = tmp_path / "results.parquet"
    proc = spawn(HOLDER, str(out))
    mid = status(out)
    assert mid["running"] is True
    assert mid["holder"]["pid"] == proc.pid and mid["holder"]["run_id"] == "holder-run"
    assert (mid["done"], mid["ok"], mid["error"]) == (10, 6, 4)
    assert (mid["total_rows"], mid["pending"]) == (25, 15)
    assert (mid["prompt_tokens"], mid["cost_usd"]) == (50, 5.0)
    assert mid["state"] == "running" and mid["output_exists"] is False
    assert mid["last_update"] is not None
    before = sorted(os.listdir(state_dir_for(out)))
    kill9(proc)
    assert sorted(os.listdir(state_dir_for(out))) == before  # status changed nothing
    dead = status(out)
    assert dead["running"] is False and dead["holder"] is None and dead["done"] == 10
    with open_store(out) as store:
        store.append([row("h0", prompt_tokens=1)])
        store.update_meta(status="finished")
        store.finalize()
    after = status(out)
    assert after["running"] is False and after["output_exists"] is True
    assert (after["done"], after["ok"], after["error"], after["pending"]) == (10, 7, 3, 15)
    assert after["prompt_tokens"] == 51 and after["finalized_rows"] == 10
    assert after["state"] == "finished"
    orjson.dumps(after)  # JSON-able for `batcher status --json`


def test_status_without_state(tmp_path: Path) -> None:
    out = tmp_path / "results.parquet"
    nothing = status(out)
    assert (nothing["state_exists"], nothing["output_exists"], nothing["done"]) == (
        False, False, 0)
    with open_store(out) as store:
        store.append([*rows(3), row("e", "error")])
        store.finalize()
    shutil.rmtree(state_dir_for(out))
    only_output = status(out)
    assert only_output["state_exists"] is False and only_output["running"] is False
    assert (only_output["done"], only_output["ok"], only_output["error"]) == (4, 3, 1)
    # A fresh job over an existing output does not crash.
    with open_store(out) as store:
        assert store.done_ids(include_errors=True) == set()


# --- kill -9 --------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_every_acknowledged_append_survives_kill_9(
        tmp_path: Path, spawn: Any, seed: int) -> None:
    out = tmp_path / "results.parquet"
    rng = random.Random(seed)
    acked: set[str] = set()
    for _ in range(2):  # kill, resume, kill again
        proc = spawn(APPENDER, str(out))
        time.sleep(rng.uniform(0.05, 0.5))
        text = kill9(proc)
        acked |= {line for line in text.split("\n")[:-1]}  # complete lines only
        with open_store(out) as store:
            done = store.done_ids(include_errors=True)
            assert acked <= done, f"seed {seed}: lost {sorted(acked - done)[:5]}"
    assert len(acked) > 0
    with open_store(out) as store:
        store.finalize()
    ids = pq.read_table(out, columns=["id"])["id"].to_pylist()
    assert len(ids) == len(set(ids)) and acked <= set(ids)


def test_status_rounds_the_cost_to_a_millionth_of_a_dollar(tmp_path: Path) -> None:
    out = tmp_path / "results.parquet"
    with open_store(out) as store:
        store.append([row(f"c{i}", "ok", cost_usd=0.0001 * (i + 1) / 3) for i in range(7)])
    info = status(out)
    assert info["cost_usd"] == round(sum(0.0001 * (i + 1) / 3 for i in range(7)), 6)
    assert len(repr(info["cost_usd"])) <= 8


# --- the part built while the journal is written ------------------------------------------


def _journal_rows(n: int, start: int = 0) -> list[ResultRow]:
    return [row(f"j{i}", "error" if i % 7 == 0 else "ok", output=f"answer {i}" * (i % 3),
                prompt_tokens=i, cost_usd=i / 1000, latency_ms=float(i), attempts=1,
                columns={"n": i, "label": f"l{i % 5}", "score": i / 2, "tags": [i, "x"]},
                ordinal=i + 1)
            for i in range(start, start + n)]


def _compact_and_compare(out: Path, appends: list[list[ResultRow]], tmp_path: Path,
                         monkeypatch: pytest.MonkeyPatch, *, built: bool) -> None:
    """Append ``appends``, then compact (close); the part must be the one write_part writes
    from the same journal, and (``built``) made without reading the journal again."""
    calls: list[Path] = []
    real = checkpoint.write_part

    def spy(journal: Path, part: Path) -> Any:
        calls.append(journal)
        return real(journal, part)

    monkeypatch.setattr(checkpoint, "write_part", spy)
    with open_store(out) as store:
        for batch in appends:
            store.append(batch)
        journal = state_dir_for(out) / "journal-000001.jsonl"
        copy = tmp_path / "journal-copy.jsonl"
        shutil.copyfile(journal, copy)
    assert calls == ([] if built else [journal])
    assert not [n for n in state_files(out) if n.endswith(".tmp")]
    reference = tmp_path / "reference.parquet"
    real(copy, reference)
    part = state_dir_for(out) / "part-000001.parquet"
    ours, theirs = pq.ParquetFile(part), pq.ParquetFile(reference)
    assert ours.read().equals(theirs.read())
    assert ours.schema_arrow == theirs.schema_arrow
    assert [ours.metadata.row_group(i).num_rows for i in range(ours.metadata.num_row_groups)] \
        == [theirs.metadata.row_group(i).num_rows for i in range(theirs.metadata.num_row_groups)]


def test_the_part_built_while_appending_is_the_part_written_from_the_journal(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(writer, "BUILD_CHUNK_ROWS", 16)
    monkeypatch.setattr(writer, "PART_BATCH_ROWS", 64)
    sizes = random.Random(3).choices([1, 2, 5, 17, 40], k=60)
    appends, start = [], 0
    for size in sizes:
        appends.append(_journal_rows(size, start))
        start += size
    # One id answered twice: both rows are kept in the part (the later one wins later).
    appends.append([row("j3", "ok", output="again", columns={"n": 3}, ordinal=4)])
    _compact_and_compare(tmp_path / "results.parquet", appends, tmp_path, monkeypatch,
                         built=True)


def test_input_column_types_that_change_late_make_the_part_from_the_journal(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(writer, "BUILD_CHUNK_ROWS", 16)
    monkeypatch.setattr(writer, "PART_BATCH_ROWS", 64)
    early = _journal_rows(100)
    late = [row(f"t{i}", columns={"n": f"text {i}", "new": i}) for i in range(30)]
    _compact_and_compare(tmp_path / "results.parquet", [early, late], tmp_path, monkeypatch,
                         built=False)


BUILDING_APPENDER = APPENDER.replace(
    "from batcher.types import ResultRow\n",
    "from batcher.types import ResultRow\nfrom batcher.io import writer\n"
    "writer.BUILD_CHUNK_ROWS, writer.PART_BATCH_ROWS = 16, 64  # parts written while appending\n",
).replace("compact_every=37", "compact_every=700")
assert "BUILD_CHUNK_ROWS" in BUILDING_APPENDER and "compact_every=700" in BUILDING_APPENDER


@pytest.mark.parametrize("seed", [4, 5, 6])
def test_kill_9_while_parts_are_built_keeps_every_acknowledged_append(
        tmp_path: Path, spawn: Any, seed: int) -> None:
    out = tmp_path / "results.parquet"
    rng = random.Random(seed)
    acked: set[str] = set()
    for _ in range(2):  # kill, resume, kill again
        proc = spawn(BUILDING_APPENDER, str(out))
        # Killed after a random number of acknowledged rows, not a random time: on a loaded
        # machine a time let too few rows through for any part to be built.
        assert proc.stdout is not None
        seen = [proc.stdout.readline() for _ in range(rng.randint(400, 1200))]
        text = "".join(seen) + kill9(proc)
        acked |= {line for line in text.split("\n")[:-1]}
        with open_store(out) as store:
            assert not [n for n in state_files(out) if n.endswith(".tmp")]
            done = store.done_ids(include_errors=True)
            assert acked <= done, f"seed {seed}: lost {sorted(acked - done)[:5]}"
    assert len(acked) > 700  # parts were built and committed along the way
    with open_store(out) as store:
        store.finalize()
    ids = pq.read_table(out, columns=["id"])["id"].to_pylist()
    assert len(ids) == len(set(ids)) and acked <= set(ids)
