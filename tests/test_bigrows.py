"""Issue 13: ids without per-row memory (the spilled index), the output in input order, row groups."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batcher.io import idindex, writer
from batcher.io.idindex import DONE, DUPLICATE, NEW, Spill, build_plan, latest_counts
from batcher.io.readers import ReaderOptions, iter_batches, iter_row_ids
from batcher.io.writer import records_to_table, result_to_record, write_final
from batcher.simulate import SimulatorThread
from batcher.types import ResultRow
from tests.conftest import prompts, read_output, run_cli, write_jsonl


def _results(*pairs: tuple[str, bool]) -> list[list[tuple[pa.Array, pa.Array]]]:  # type: ignore[type-arg]
    """One result source of one batch: (id, ok) pairs, oldest first."""
    ids = [i for i, _ in pairs]
    oks = [ok for _, ok in pairs]
    return [[(pa.array(ids, pa.string()), pa.array(oks, pa.bool_()))]]


# --- the index ----------------------------------------------------------------------------


def test_a_duplicate_far_apart_is_reported_with_both_lines_across_spill_partitions(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # 30,000 rows, partitions of ~1,000 entries: the two rows with id "far" are 29,995 rows
    # apart, in different read batches and spilled in different batches; the later is skipped.
    monkeypatch.setattr(idindex, "ROWS_PER_PARTITION", 1_000)
    rows = prompts(30_000)
    rows[4] = {"id": "far", "prompt": "first"}
    rows[29_999] = {"id": "far", "prompt": "again"}
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    spills: list[int] = []
    real_partitions = Spill.partitions

    def counting(self: Spill):  # type: ignore[no-untyped-def]
        spills.append(self.count)
        return real_partitions(self)

    monkeypatch.setattr(Spill, "partitions", counting)
    got, problems = [], []
    for batch in iter_batches(path, ReaderOptions(batch_size=512)):
        got.extend(r.id for r in batch.rows)
        problems.extend(batch.problems)
    assert spills and spills[0] >= 30  # the ids really went through many partitions
    assert [str(p) for p in problems] == [
        f"{path}:30000: field 'id': duplicate id 'far' (first seen at {path}:5)"]
    assert len(got) == 29_999 and got[4] == "far" and "r29999" not in got


def test_forced_hash_collisions_are_confirmed_on_the_strings(tmp_path: Path) -> None:
    # Every id lands in one partition (a constant hash) or in two by a one-bit hash: ids that
    # share a hash are still told apart, and real duplicates are still found.
    ids = [f"id-{i}" for i in range(500)] + ["id-7", "id-499"]
    for hash_fn in (lambda s: 0, lambda s: len(s) & 1):
        plan = build_plan([(ids, list(range(1, len(ids) + 1)), list(range(1, len(ids) + 1)))],
                          _results(("id-3", True), ("id-4", False), ("id-4", True),
                                   ("id-5", True), ("id-5", False)),
                          rows_hint=10**6, ok_only=True, hash_fn=hash_fn, folder=tmp_path)
        states = [plan.state(n) for n in range(1, len(ids) + 1)]
        assert states.count(DUPLICATE) == 2 and states[500:] == [DUPLICATE, DUPLICATE]
        assert plan.first(501) == (8, False) and plan.first(502) == (500, False)
        # id-3 ok, id-4 latest ok: done; id-5 latest error: not done with ok_only.
        assert [n for n, s in enumerate(states, 1) if s == DONE] == [4, 5]
        assert states.count(NEW) == 500 - 2
        with Spill(4, folder=tmp_path, hash_fn=hash_fn) as spill:
            assert spill.count == 4
        ok, error = latest_counts(_results(("a", True), ("b", False), ("a", False),
                                           ("c", True), ("b", True)),
                                  rows_hint=10**6, folder=tmp_path, hash_fn=hash_fn)
        assert (ok, error) == (2, 1)
    assert list(tmp_path.iterdir()) == []  # spill folders are removed


def test_the_id_pass_follows_the_reader_rules(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [
        {"id": "a", "prompt": "1"}, {"id": 7, "prompt": "2"}, {"id": "", "prompt": "3"},
        {"id": [1], "prompt": "4"}, {"prompt": "5"}, {"id": "b"}])
    path.write_bytes(path.read_bytes() + b"\n   \n{broken\n" + b'{"id": "c", "prompt": "x"}\n')
    got = [item for batch in iter_row_ids(path, ReaderOptions()) for item in zip(*batch, strict=True)]
    assert [(i, n) for i, n, _ in got] == [("a", 1), ("7", 2), ("b", 6), ("c", 8)]
    assert [p & 0xFFFFFFFF for _, _, p in got] == [1, 2, 6, 10]  # file lines (7, 8 blank)


# --- output order and row groups ------------------------------------------------------------


def _part(path: Path, ids: list[str], status: str = "ok") -> Path:
    pq.write_table(records_to_table([result_to_record(ResultRow(id=i, status=status))  # type: ignore[arg-type]
                                     for i in ids]), path, row_group_size=4)
    return path


def test_write_final_in_input_order_then_the_ids_the_input_lacks(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(idindex, "ROWS_PER_PARTITION", 3)
    monkeypatch.setattr(writer, "GATHER_ROWS", 5)
    monkeypatch.setattr(writer, "OUTPUT_ROW_GROUP_ROWS", 10)
    rng = random.Random(3)
    order = [f"r{i}" for i in range(40)]
    answered = order[:]
    rng.shuffle(answered)
    p1 = _part(tmp_path / "p1.parquet", [*answered[:25], "gone-1"], status="error")
    p2 = _part(tmp_path / "p2.parquet", [*answered[20:], "gone-2", *answered[:3]])
    out = tmp_path / "out.parquet"
    input_ids = [(order, list(range(1, 41)), list(range(1, 41)))]
    assert write_final([p1, p2], out, input_ids=input_ids, input_rows=40) == 42
    table = pq.read_table(out)
    assert table.column("id").to_pylist() == [*order, "gone-1", "gone-2"]
    latest_ok = set(answered[20:] + answered[:3] + ["gone-2"])
    assert [r["status"] == "ok" for r in table.to_pylist()] == [
        i in latest_ok for i in [*order, "gone-1", "gone-2"]]
    meta = pq.read_metadata(out)
    assert [meta.row_group(g).num_rows for g in range(meta.num_row_groups)] == [10] * 4 + [2]
    stats = meta.row_group(0).column(0).statistics
    assert meta.row_group(0).column(0).path_in_schema == "id"
    assert stats is not None and stats.has_min_max
    # Without the input's ids: completion order (the sources' order), latest row winning.
    assert write_final([p1, p2], out) == 42
    expected = [i for i in [*answered[:25], "gone-1"]
                if i not in set([*answered[20:], "gone-2", *answered[:3]])]
    assert pq.read_table(out).column("id").to_pylist() == (
        expected + answered[20:] + ["gone-2"] + answered[:3])


def _start(sim: SimulatorThread, src: Path, out: Path, *extra: str) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "batcher", "run", str(src), "-o", str(out),
           "--base-url", sim.base_url, "--model", "gpt-4o-mini", "--no-progress",
           "--log-format", "json", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _done(out: Path) -> int:
    result = run_cli("status", out, "--json")
    return int(json.loads(result.stdout).get("done", 0)) if result.exit_code == 0 else 0


def _kill_when_done(sim: SimulatorThread, src: Path, out: Path, at: int, *extra: str,
                    concurrency: int = 16) -> None:
    """Run the job in a process of its own and kill -9 it once ``at`` rows are done."""
    proc = _start(sim, src, out, "--concurrency", str(concurrency), *extra)
    deadline = time.monotonic() + 30
    while _done(out) < at and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=10)


def test_output_is_in_input_order_after_kill_9_and_resume(
        tmp_path: Path, make_sim: Callable[..., SimulatorThread]) -> None:
    sim = make_sim(latency_ms=30, jitter_ms=30)
    rows = prompts(400)
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.parquet"
    _kill_when_done(sim, src, out, 100, concurrency=32)
    assert 0 < _done(out) < 400
    proc = _start(sim, src, out, "--concurrency", "32")
    _stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert [r["id"] for r in read_output(out)] == [r["id"] for r in rows]
    assert pq.read_metadata(out).num_row_groups == 1


def test_order_completion_keeps_the_answered_order(
        tmp_path: Path, make_sim: Callable[..., SimulatorThread]) -> None:
    sim = make_sim(latency_ms=20, jitter_ms=40)
    rows = prompts(300)
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.parquet"
    result = run_cli("run", src, "-o", out, "--base-url", sim.base_url, "--model",
                     "gpt-4o-mini", "--no-progress", "--concurrency", "32",
                     "--order", "completion")
    assert result.exit_code == 0, result.stderr
    got = read_output(out)
    ids = [r["id"] for r in got]
    assert sorted(ids) == sorted(r["id"] for r in rows) and ids != [r["id"] for r in rows]
    finished = [r["completed_at"] for r in got]
    assert finished == sorted(finished)
    # The same job in input order rewrites the output in input order (nothing is re-sent).
    result = run_cli("run", src, "-o", out, "--base-url", sim.base_url, "--model",
                     "gpt-4o-mini", "--no-progress")
    assert result.exit_code == 0, result.stderr
    assert [r["id"] for r in read_output(out)] == [r["id"] for r in rows]


def test_rows_the_input_no_longer_has_go_at_the_end(
        tmp_path: Path, make_sim: Callable[..., SimulatorThread]) -> None:
    sim = make_sim(latency_ms=5, jitter_ms=10)
    out = tmp_path / "out.parquet"
    first = write_jsonl(tmp_path / "in.jsonl", prompts(10))
    args = ("-o", out, "--base-url", sim.base_url, "--model", "gpt-4o-mini", "--no-progress")
    assert run_cli("run", first, *args).exit_code == 0
    changed = write_jsonl(tmp_path / "in.jsonl", list(reversed(prompts(10, start=5))))
    result = run_cli("run", changed, *args, "--force-resume")
    assert result.exit_code == 0, result.stderr
    ids = [r["id"] for r in read_output(out)]
    assert ids[:10] == [f"r{i}" for i in range(14, 4, -1)]
    assert sorted(ids[10:]) == [f"r{i}" for i in range(5)]


def test_blocks_of_done_rows_are_skipped_whole_and_counted(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Small read blocks: most are all done (skipped unsplit), some straddle the done edge
    # or hold a blank line (read line by line); the result is the same either way.
    from batcher.io import readers

    monkeypatch.setattr(readers, "_CHUNK_BYTES", 300)
    rows = prompts(3_000)
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    data = path.read_bytes().split(b"\n")
    data.insert(1_500, b"  ")  # a blank line among done rows
    path.write_bytes(b"\n".join(data))
    done = {f"r{i}" for i in range(2_000)} | {"r2500"}
    batches = list(iter_batches(path, ReaderOptions(batch_size=64), skip_ids=done))
    got = [r.id for b in batches for r in b.rows]
    assert got == [f"r{i}" for i in range(2_000, 3_000) if i != 2_500]
    assert [r.line for b in batches for r in b.rows][:1] == [2_002]
    assert sum(b.lines_read for b in batches) == 3_000
    assert all(b.lines_read <= 64 for b in batches)


def test_spills_left_by_a_killed_run_are_removed_on_open(tmp_path: Path) -> None:
    from batcher.checkpoint import StateStore, state_dir_for

    out = tmp_path / "out.parquet"
    with StateStore.open(out, {"input": "x"}, run_id="a"):
        pass
    left = state_dir_for(out) / "batcher-ids-abc123"
    left.mkdir()
    (left / "p000.arrow").write_bytes(b"partial")
    with StateStore.open(out, {"input": "x"}, run_id="b"):
        assert not left.exists()


# --- resuming by ordinals -----------------------------------------------------------------


def _ordinal_sources(*batches: list[tuple[int, bool]]) -> list[list[tuple[pa.Array, pa.Array]]]:  # type: ignore[type-arg]
    return [[(pa.array([o for o, _ in b], pa.int64()), pa.array([ok for _, ok in b]))]
            for b in batches]


@pytest.mark.parametrize("ok_only", [False, True])
def test_the_plan_by_ordinals_equals_the_plan_by_ids(tmp_path: Path, ok_only: bool) -> None:
    # A random input with duplicate ids, and results in several sources (retried rows
    # answered again, some ok, some not): told by ordinals, the plan (done rows, duplicates
    # and where each was first seen, whether that row is done) is the one told by ids.
    rng = random.Random(7)
    rows = prompts(3_000)
    for i in rng.sample(range(100, 3_000), 200):
        rows[i] = {"id": f"r{rng.randrange(i)}", "prompt": "again"}
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    owner: dict[str, int] = {}
    for ordinal, row in enumerate(rows, 1):
        owner.setdefault(row["id"], ordinal)
    answered = [(rid, ordinal) for rid, ordinal in owner.items() if rng.random() < 0.7]
    sources = [[(rid, ordinal, rng.random() < 0.8) for rid, ordinal in rng.sample(
        answered, len(answered) // 2)] for _ in range(3)]
    by_ids = build_plan(iter_row_ids(path, ReaderOptions()), [
        [(pa.array([r for r, _, _ in s], pa.string()), pa.array([ok for _, _, ok in s]))]
        for s in sources], ok_only=ok_only, folder=tmp_path)
    idindex.save_input_plan(tmp_path / "plan.arrow", "k", by_ids)
    assert idindex.load_input_plan(tmp_path / "plan.arrow", "other") is None
    known = idindex.load_input_plan(tmp_path / "plan.arrow", "k")
    assert known is not None
    by_ordinals = idindex.plan_from_ordinals(known, _ordinal_sources(
        *[[(o, ok) for _, o, ok in s] for s in sources]), ok_only=ok_only)
    assert by_ordinals is not None
    assert (by_ordinals.rows, by_ordinals.done, by_ordinals.duplicates) == (
        by_ids.rows, by_ids.done, by_ids.duplicates)
    assert by_ids.done > 1_000 and by_ids.duplicates > 150
    assert [by_ordinals.state(o) for o in range(1, 3_001)] == [
        by_ids.state(o) for o in range(1, 3_001)]
    dups = [o for o in range(1, 3_001) if by_ids.state(o) == DUPLICATE]
    assert [by_ordinals.first(o) for o in dups] == [by_ids.first(o) for o in dups]


def test_the_latest_result_of_an_ordinal_decides_and_strangers_refuse(tmp_path: Path) -> None:
    plan = idindex.RowPlan(4)
    # Row 2: ok then failed; row 3: failed then ok (the later source wins, as by ids).
    got = idindex.plan_from_ordinals(plan, _ordinal_sources([(2, True), (3, False)],
                                                            [(2, False), (3, True)]),
                                     ok_only=True)
    assert got is not None
    assert [got.state(o) for o in range(1, 5)] == [NEW, NEW, DONE, NEW]
    # An ordinal the input does not have: these results were not written for it.
    assert idindex.plan_from_ordinals(idindex.RowPlan(4), _ordinal_sources([(5, True)])) is None


def test_a_resume_tells_the_rows_done_by_ordinal_without_reading_the_ids(
        tmp_path: Path, make_sim: Callable[..., SimulatorThread],
        monkeypatch: pytest.MonkeyPatch) -> None:
    sim = make_sim(latency_ms=30, jitter_ms=30)
    rows = prompts(400)
    rows[350] = {"id": "r10", "prompt": "a duplicate of a row done before the kill"}
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.parquet"
    _kill_when_done(sim, src, out, 100)
    assert 0 < _done(out) < 399
    assert (out.with_name(out.name + ".state") / "input-plan.arrow").is_file()

    def no_pass(*_args: object, **_kwargs: object):  # type: ignore[no-untyped-def]
        raise AssertionError("the resume read the input's ids")
        yield

    from batcher import runner
    monkeypatch.setattr(runner, "iter_row_ids", no_pass)
    result = run_cli("run", src, "-o", out, "--base-url", sim.base_url, "--model",
                     "gpt-4o-mini", "--no-progress", "--concurrency", "16")
    assert result.exit_code == 1, result.stderr  # 1: a bad input row was skipped
    assert "duplicate id 'r10' (an earlier row has it, and that row is done already)" \
        in result.stderr
    ids = [r["id"] for r in read_output(out)]
    assert ids == [r["id"] for i, r in enumerate(rows) if i != 350]  # input order, once each
    assert sim.stats.resent_after_ok <= 16  # at most what was in flight at the kill


def test_results_from_before_a_force_resume_are_told_by_id(
        tmp_path: Path, make_sim: Callable[..., SimulatorThread]) -> None:
    # Run 1 answers part of A; run 2 (--force-resume) part of B, A's rows in another order;
    # run 3 resumes B. Run 1's ordinals are A's: they must not mark B's rows done.
    sim = make_sim(latency_ms=30, jitter_ms=30)
    rows = prompts(400)
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.parquet"
    _kill_when_done(sim, src, out, 100)
    shuffled = rows[:]
    random.Random(3).shuffle(shuffled)
    write_jsonl(src, shuffled)
    _kill_when_done(sim, src, out, _done(out) + 60, "--force-resume")
    result = run_cli("run", src, "-o", out, "--base-url", sim.base_url, "--model",
                     "gpt-4o-mini", "--no-progress", "--concurrency", "16")
    assert result.exit_code == 0, result.stderr
    assert [r["id"] for r in read_output(out)] == [r["id"] for r in shuffled]
    assert sim.stats.resent_after_ok <= 32  # at most what was in flight at the two kills


def _plan_facts(plan: idindex.RowPlan) -> tuple[int, int, list[int], dict[int, tuple[int, int]]]:
    states = [plan.state(o) for o in range(1, plan.rows + 1)]
    firsts = {o: plan.first(o) for o in range(1, plan.rows + 1) if states[o - 1] == DUPLICATE}
    return plan.rows, plan.duplicates, states, {o: (p, int(d)) for o, (p, d) in firsts.items()}


def test_a_first_runs_plan_without_arrow_is_the_plan_by_ids(tmp_path: Path) -> None:
    rng = random.Random(5)
    rows = [{"id": f"r{rng.randrange(40)}", "prompt": "p"} for _ in range(120)]
    rows[7] = {"prompt": "no id"}  # a bad row: no ordinal taken by the id pass
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    by_ids = build_plan(iter_row_ids(path, ReaderOptions()), folder=tmp_path)
    in_python = idindex.plan_without_results(iter_row_ids(path, ReaderOptions()))
    assert in_python.duplicates > 0
    assert _plan_facts(in_python) == _plan_facts(by_ids)
    assert in_python.done_bits == by_ids.done_bits and in_python.dup_bits == by_ids.dup_bits
    # What a resume keeps of it is the same too.
    for name, plan in (("python", in_python), ("ids", by_ids)):
        idindex.save_input_plan(tmp_path / f"{name}.arrow", "k", plan)
    kept = [idindex.load_input_plan(tmp_path / f"{n}.arrow", "k") for n in ("python", "ids")]
    assert kept[0] is not None and kept[1] is not None
    assert kept[0]._dups == kept[1]._dups and kept[0].rows == kept[1].rows


def test_a_small_first_run_plans_and_keeps_its_plan_without_importing_pandas(
        tmp_path: Path) -> None:
    """pyarrow's first conversion of Python values imports pandas (~0.3 s): a small first run
    leaves that to a thread while its first requests are out, not before them."""
    pytest.importorskip("pandas")
    path = write_jsonl(tmp_path / "in.jsonl", [*prompts(50), {"id": "r3", "prompt": "again"}])
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from batcher.io import idindex\n"
        "from batcher.io.readers import ReaderOptions, iter_row_ids\n"
        "plan = idindex.plan_without_results(iter_row_ids(Path(sys.argv[1]), ReaderOptions()))\n"
        "idindex.save_input_plan(Path(sys.argv[2]), 'k', plan)\n"
        "assert plan.duplicates == 1, plan.duplicates\n"
        "print('pandas' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", script, str(path), str(tmp_path / "p.arrow")],
                          capture_output=True, text=True, check=False,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
    assert idindex.load_input_plan(tmp_path / "p.arrow", "k") is not None
