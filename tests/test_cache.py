"""The response cache end to end: CLI runs against the simulator on 127.0.0.1."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pyarrow.parquet as pq

from batcher.simulate import SimulatorThread
from tests.conftest import prompts, run_cli, write_jsonl

SAME = ["id", "status", "output", "finish_reason", "model", "prompt_tokens",
        "completion_tokens", "total_tokens", "http_status"]


def _run(sim: SimulatorThread, src: Path, out: Path, cache: Path, *extra: str):  # type: ignore[no-untyped-def]
    return run_cli("run", src, "-o", out, "--base-url", sim.base_url, "--model", "gpt-4o-mini",
                   "--no-progress", "--cache", cache, "-p", "temperature=0", *extra)


def test_second_identical_run_sends_nothing_and_writes_the_same_answers(
        tmp_path: Path, sim: SimulatorThread) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", prompts(20))
    cache = tmp_path / "cache"
    first = _run(sim, src, tmp_path / "a.parquet", cache)
    assert first.exit_code == 0, first.stderr
    assert sim.stats.requests == 20
    second = _run(sim, src, tmp_path / "b.parquet", cache)
    assert second.exit_code == 0, second.stderr
    assert sim.stats.requests == 20  # nothing sent the second time
    a = pq.read_table(tmp_path / "a.parquet").sort_by("id")
    b = pq.read_table(tmp_path / "b.parquet").sort_by("id")
    assert a.select(SAME).to_pylist() == b.select(SAME).to_pylist()
    assert set(a.column("cached").to_pylist()) == {False}
    assert set(b.column("cached").to_pylist()) == {True}
    assert set(b.column("cost_usd").to_pylist()) == {0.0}
    assert b.column("cost_usd_original").to_pylist() == a.column("cost_usd").to_pylist()
    summary = json.loads((tmp_path / "b.summary.json").read_text())
    assert summary["cache_hits"] == 20 and summary["sent_this_run"] == 0

    # the dry run sees the hits and prices only the rest
    more = write_jsonl(tmp_path / "more.jsonl", prompts(25))
    est = run_cli("estimate", more, "--model", "gpt-4o-mini", "--base-url", sim.base_url,
                  "--cache", cache, "-p", "temperature=0", "--json")
    assert est.exit_code == 0, est.stderr
    report = json.loads(est.stdout)
    assert report["cache_hits"] == 20 and report["rows"] == 5

    stats = run_cli("cache", "stats", cache, "--json")
    assert stats.exit_code == 0, stats.stderr
    doc = json.loads(stats.stdout)
    assert doc["entries"] == 20 and doc["hits"] == 20


def test_one_changed_parameter_misses(tmp_path: Path, sim: SimulatorThread) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", prompts(5))
    cache = tmp_path / "cache"
    assert _run(sim, src, tmp_path / "a.parquet", cache).exit_code == 0
    result = _run(sim, src, tmp_path / "b.parquet", cache, "-p", "max_tokens=77")
    assert result.exit_code == 0, result.stderr
    assert sim.stats.requests == 10
    assert set(pq.read_table(tmp_path / "b.parquet").column("cached").to_pylist()) == {False}


def test_temperature_above_zero_is_cached_only_when_asked(
        tmp_path: Path, sim: SimulatorThread) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", prompts(4))
    cache = tmp_path / "cache"
    base = ("run", src, "--base-url", sim.base_url, "--model", "m", "--no-progress",
            "--cache", cache, "-p", "temperature=0.7")
    assert run_cli(*base, "-o", tmp_path / "a.parquet").exit_code == 0
    assert run_cli(*base, "-o", tmp_path / "b.parquet").exit_code == 0
    assert sim.stats.requests == 8
    assert run_cli(*base, "-o", tmp_path / "c.parquet", "--cache-nondeterministic").exit_code == 0
    assert run_cli(*base, "-o", tmp_path / "d.parquet", "--cache-nondeterministic").exit_code == 0
    assert sim.stats.requests == 12


def test_length_cut_answers_are_not_cached_and_clear_empties(
        tmp_path: Path, sim: SimulatorThread) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", prompts(3))
    cache = tmp_path / "cache"
    assert _run(sim, src, tmp_path / "a.parquet", cache, "-p", "max_tokens=1").exit_code == 0
    with sqlite3.connect(cache / "cache.sqlite3") as db:
        assert db.execute("SELECT COUNT(*) FROM entries").fetchone()[0] == 0
    assert _run(sim, src, tmp_path / "b.parquet", cache).exit_code == 0
    kept = run_cli("cache", "clear", cache, "--older-than", "30d")
    assert kept.exit_code == 0 and "removed 0" in kept.stdout
    cleared = run_cli("cache", "clear", cache)
    assert cleared.exit_code == 0 and "removed 3" in cleared.stdout
    bad = run_cli("cache", "clear", cache, "--older-than", "soon")
    assert bad.exit_code == 2
    assert run_cli("cache", "stats", tmp_path / "nowhere").exit_code == 2


# --- durability and sharing -------------------------------------------------------------


_WRITER = r"""
import sys, time
from pathlib import Path
from batcher.cache import ResponseCache
from batcher.types import HttpResponse
cache = ResponseCache(Path(sys.argv[1]))
n = 0
while True:
    key = f"k{n:07d}"
    cache.put(key, HttpResponse(200, {}, (key * 500).encode()), model="m", cost_usd=0.001)
    n += 1
    if n == 50:
        print("writing", flush=True)
"""


def test_kill_9_while_writing_leaves_a_cache_that_still_works(
        tmp_path: Path, sim: SimulatorThread) -> None:
    import signal
    import subprocess
    import sys
    import time

    from batcher.cache import ResponseCache

    cache = tmp_path / "cache"
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(cache)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "writing"
        time.sleep(0.3)                                  # in the middle of many writes
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    with ResponseCache(cache) as reopened:
        stats = reopened.stats()
        assert stats.entries >= 50
        keys = [r[0] for r in reopened._db.execute("SELECT key FROM entries")]
        for key in keys:                                 # every entry whole, none torn
            response = reopened.get(key)
            assert response is not None and response.body == (key * 500).encode()
    # and a job can use it at once: its own answers are stored and served next time
    src = write_jsonl(tmp_path / "in.jsonl", prompts(5))
    assert _run(sim, src, tmp_path / "a.parquet", cache).exit_code == 0
    assert _run(sim, src, tmp_path / "b.parquet", cache).exit_code == 0
    assert sim.stats.requests == 5


def test_several_runs_share_one_cache_folder_at_once(
        tmp_path: Path, sim: SimulatorThread) -> None:
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    cache = tmp_path / "cache"
    first = write_jsonl(tmp_path / "first.jsonl", prompts(60))
    second = write_jsonl(tmp_path / "second.jsonl", prompts(60, start=30))   # 30 in common
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "BATCHER_"))}
    procs = [subprocess.Popen(
        [sys.executable, "-m", "batcher", "run", str(src), "-o", str(tmp_path / f"{name}.parquet"),
         "--base-url", sim.base_url, "--model", "gpt-4o-mini", "--no-progress",
         "--cache", str(cache), "-p", "temperature=0", "--concurrency", "8"],
        cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
        for name, src in (("one", first), ("two", second))]
    for proc in procs:
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr
    sent = sim.stats.requests
    assert 90 <= sent <= 120                 # the shared 30 may have been sent by both
    union = write_jsonl(tmp_path / "union.jsonl", prompts(90))
    result = _run(sim, union, tmp_path / "union.parquet", cache)
    assert result.exit_code == 0, result.stderr
    assert sim.stats.requests == sent        # every answer was stored by one run or the other
    assert json.loads((tmp_path / "union.summary.json").read_text())["cache_hits"] == 90


def test_a_job_file_names_its_cache_relative_to_itself(
        tmp_path: Path, sim: SimulatorThread) -> None:
    write_jsonl(tmp_path / "in.jsonl", prompts(4))
    job = tmp_path / "job.toml"
    job.write_text('input = "in.jsonl"\noutput = "out/{date}.parquet"\nmodel = "gpt-4o-mini"\n'
                   'cache = "cache"\n\n[params]\ntemperature = 0\n')
    for extra in ((), ("--restart",)):      # the second starts over: only the cache can help
        result = run_cli("run", job, "--base-url", sim.base_url, "--no-progress", *extra)
        assert result.exit_code == 0, result.stderr
    assert sim.stats.requests == 4           # the second run was served from the cache
    [out] = (tmp_path / "out").glob("*.parquet")
    assert set(pq.read_table(out).column("cached").to_pylist()) == {True}
    assert (tmp_path / "cache").is_dir()
