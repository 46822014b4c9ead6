"""A hostile machine (issue 11): too few file descriptors, a full disk, a server that is not
there. Each is set up inside the test and undone after it."""

from __future__ import annotations

import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from batcher.simulate import SimulatorThread
from tests.conftest import ROOT, prompts, run_cli, write_jsonl


def _summary(out: Path) -> dict[str, Any]:
    path = out.with_name(out.name.removesuffix(".parquet") + ".summary.json")
    summary: dict[str, Any] = json.loads(path.read_text())
    return summary


def _cli_process(args: list[str], nofile: tuple[int, int]) -> subprocess.CompletedProcess[str]:
    """``python -m batcher ARGS`` in a child whose open-file limit is ``nofile`` (soft, hard)."""
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, nofile)

    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "BATCHER_"))}
    return subprocess.run([sys.executable, "-m", "batcher", *args], cwd=ROOT, env=env,
                          preexec_fn=limit, capture_output=True, text=True, timeout=120)


# --- open files --------------------------------------------------------------------------


def test_a_pool_larger_than_the_open_file_limit_is_capped_with_a_warning(
        tmp_path: Path, sim: SimulatorThread) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", prompts(600))
    out = tmp_path / "out.parquet"
    done = _cli_process(["run", str(src), "-o", str(out), "--base-url", sim.base_url,
                         "--model", "gpt-4o-mini", "--concurrency", "256", "--no-progress"],
                        nofile=(160, 160))
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 0, done.stderr
    assert "ulimit -n" in done.stderr and "160" in done.stderr
    table = pq.read_table(out, columns=["id", "status"]).to_pylist()
    assert len({r["id"] for r in table}) == 600
    assert all(r["status"] == "ok" for r in table)


def test_a_low_soft_limit_is_raised_toward_the_hard_one_without_capping(
        tmp_path: Path, sim: SimulatorThread) -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < 1024:
        pytest.skip(f"the hard open-file limit here is {hard}; the test needs 1024")
    src = write_jsonl(tmp_path / "in.jsonl", prompts(300))
    out = tmp_path / "out.parquet"
    done = _cli_process(["run", str(src), "-o", str(out), "--base-url", sim.base_url,
                         "--model", "gpt-4o-mini", "--concurrency", "256", "--no-progress"],
                        nofile=(160, 1024))
    assert done.returncode == 0, done.stderr
    assert "concurrency_capped" not in done.stderr and "ulimit" not in done.stderr
    assert pq.read_table(out).num_rows == 300


# --- a full disk -------------------------------------------------------------------------


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 192 KiB tmpfs mounted for the test (needs root, which CI has)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=192k", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_disk_exits_3_naming_the_path_and_the_rerun_finishes_exactly_once(
        tmp_path: Path, tiny_disk: Path, sim: SimulatorThread) -> None:
    rows = 1500
    src = write_jsonl(tmp_path / "in.jsonl", prompts(rows))
    out = tiny_disk / "out.parquet"
    args = ["run", src, "-o", out, "--base-url", sim.base_url, "--model", "gpt-4o-mini",
            "--no-progress", "--keep-raw", "--concurrency", "8"]
    result = run_cli(*args)   # an exception escaping would fail the test here
    assert result.exit_code == 3, result.stderr
    assert "disk is full" in result.stderr and str(tiny_disk) in result.stderr
    assert "free at least" in result.stderr
    subprocess.run(["mount", "-o", "remount,size=64m", str(tiny_disk)], check=True)
    sent_before = sim.stats.requests
    result = run_cli(*args)
    assert result.exit_code == 0, result.stderr
    ids = pq.read_table(out, columns=["id"]).column("id").to_pylist()
    assert len(ids) == rows and len(set(ids)) == rows
    # The rerun sent only what the first run could not keep.
    assert sim.stats.requests - sent_before < rows


# --- a server that is not there ----------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_a_small_job_against_nothing_listening_exits_3_and_burns_no_row(
        tmp_path: Path, make_sim: Any) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", prompts(3))
    out = tmp_path / "out.parquet"
    dead = f"http://127.0.0.1:{_free_port()}/v1"
    args = ["run", src, "-o", out, "--model", "gpt-4o-mini", "--no-progress",
            "--max-attempts", "2"]
    result = run_cli(*args, "--base-url", dead)
    assert result.exit_code == 3, result.stderr
    assert "cannot reach" in result.stderr and dead in result.stderr
    summary = _summary(out)
    assert summary["outcome"] == "aborted" and summary["error"] == 0 and summary["rows"] == 0
    healthy = make_sim()
    result = run_cli(*args, "--base-url", healthy.base_url)
    assert result.exit_code == 0, result.stderr
    assert healthy.stats.requests == 3
    assert [r["status"] for r in pq.read_table(out).to_pylist()] == ["ok"] * 3


def test_a_rate_that_would_take_days_is_named_before_the_wait(
        tmp_path: Path, sim: SimulatorThread) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", prompts(5))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "BATCHER_"))}
    proc = subprocess.Popen(
        [sys.executable, "-m", "batcher", "run", str(src), "-o", str(tmp_path / "out.parquet"),
         "--base-url", sim.base_url, "--model", "gpt-4o-mini", "--rpm", "0.001",
         "--no-progress"], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    watchdog = threading.Timer(30, proc.kill)   # without the warning: fail, don't hang
    watchdog.start()
    try:
        line = proc.stderr.readline()
        while line and "slow_pacing" not in line:
            line = proc.stderr.readline()
        assert "days" in line and "--rpm 0.001" in line, line
    finally:
        watchdog.cancel()
        proc.terminate()
        proc.wait(timeout=60)
    assert proc.returncode == 143


def test_an_internal_error_is_a_message_with_exit_3_and_the_answers_are_kept(
        tmp_path: Path, sim: SimulatorThread, monkeypatch: pytest.MonkeyPatch) -> None:
    from batcher.results import RowBuilder

    src = write_jsonl(tmp_path / "in.jsonl", prompts(30))
    out = tmp_path / "out.parquet"
    args = ["run", src, "-o", out, "--base-url", sim.base_url, "--model", "gpt-4o-mini",
            "--no-progress", "--concurrency", "1"]
    real_ok_row = RowBuilder.ok_row
    calls = 0

    def flaky_ok_row(self: Any, *a: Any, **kw: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 11:
            raise RuntimeError("a defect")
        return real_ok_row(self, *a, **kw)

    monkeypatch.setattr(RowBuilder, "ok_row", flaky_ok_row)
    result = run_cli(*args)
    assert result.exit_code == 3
    assert "internal error (RuntimeError: a defect)" in result.stderr
    assert "rerun the same command" in result.stderr
    monkeypatch.setattr(RowBuilder, "ok_row", real_ok_row)
    sent = sim.stats.requests
    result = run_cli(*args)
    assert result.exit_code == 0, result.stderr
    # The ten answers received before the defect were kept: only the rest were sent again.
    assert sim.stats.requests - sent <= 20
    assert pq.read_table(out).num_rows == 30


def test_the_first_requests_leave_while_the_price_table_loads_and_are_still_checked(
        tmp_path: Path, sim: SimulatorThread, monkeypatch: pytest.MonkeyPatch) -> None:
    """The context-window check needs genai-prices' table (~0.3 s to load): the first
    request does not wait for it, and the rows sent meanwhile are checked once it is in."""
    import time

    from batcher import pricing, runner

    monkeypatch.setattr(pricing, "_table_loaded", False)
    sent_while_loading: list[int] = []

    def slow_load() -> None:
        deadline = time.monotonic() + 10
        while sim.stats.requests < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        sent_while_loading.append(sim.stats.requests)
        pricing.load_table()

    monkeypatch.setattr(runner, "load_table", slow_load)
    long = " hi" * 140_000
    rows = [{"id": "a", "prompt": long}, {"id": "b", "prompt": "short"}]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    result = run_cli("run", src, "-o", tmp_path / "out.parquet", "--base-url", sim.base_url,
                     "--model", "gpt-4o-mini", "--no-progress", "--concurrency", "2")
    assert result.exit_code == 0, result.stderr
    assert sent_while_loading == [2]
    warnings = [line for line in result.stderr.splitlines() if "over_context_window" in line]
    assert len(warnings) == 1 and f"{src}:1" in warnings[0], result.stderr


def test_when_the_price_table_fails_to_load_aside_later_rows_are_checked_as_before(
        tmp_path: Path, sim: SimulatorThread, monkeypatch: pytest.MonkeyPatch) -> None:
    from batcher import pricing, runner

    monkeypatch.setattr(pricing, "_table_loaded", False)

    def broken_load() -> None:
        raise RuntimeError("no table")

    monkeypatch.setattr(runner, "load_table", broken_load)
    # Nothing else loads the table on the side: no price look-ups.
    monkeypatch.setattr(runner, "genai_price", lambda model: None)
    monkeypatch.setattr(runner, "price_for", lambda model, **_: None)
    rows = [*prompts(5), {"id": "long", "prompt": " hi" * 140_000}]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    result = run_cli("run", src, "-o", tmp_path / "out.parquet", "--base-url", sim.base_url,
                     "--model", "gpt-4o-mini", "--no-progress", "--concurrency", "1")
    assert result.exit_code == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "over_context_window" in line]
    assert len(warnings) == 1 and f"{src}:6" in warnings[0], result.stderr


def test_a_prompt_longer_than_the_context_window_is_warned_about_once(
        tmp_path: Path, sim: SimulatorThread) -> None:
    long = " hi" * 140_000                      # ~140k tokens; gpt-4o-mini holds 128k
    rows = [{"id": "a", "prompt": "short"}, {"id": "b", "prompt": long},
            {"id": "c", "prompt": long}]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    result = run_cli("run", src, "-o", tmp_path / "out.parquet", "--base-url", sim.base_url,
                     "--model", "gpt-4o-mini", "--no-progress", "--concurrency", "1")
    warnings = [line for line in result.stderr.splitlines() if "over_context_window" in line]
    assert len(warnings) == 1, result.stderr
    assert f"{src}:2" in warnings[0] and "128000" in warnings[0], warnings[0]
