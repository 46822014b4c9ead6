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
    assert summary["cache_hits"] == 20

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
