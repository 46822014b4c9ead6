"""Checkpoint and resume through the real CLI process: kill -9, Ctrl-C, locks, fingerprints."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow.parquet as pq

from batcher.simulate import SimulatorThread
from tests.conftest import prompts, read_output, run_cli, write_jsonl


def _start(sim: SimulatorThread, src: Path, out: Path, *extra: str) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "batcher", "run", str(src), "-o", str(out),
           "--base-url", sim.base_url, "--model", "gpt-4o-mini", "--no-progress",
           "--log-format", "json", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_progress(out: Path, proc: subprocess.Popen[str], minimum: int,
                       timeout: float = 30) -> None:
    """Block until the running job reports at least ``minimum`` rows done."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        result = run_cli("status", out, "--json")
        if result.exit_code == 0 and json.loads(result.stdout).get("done", 0) >= minimum:
            return
        time.sleep(0.05)
    raise AssertionError("job made no progress")


def _assert_exactly_once(out: Path, ids: list[str]) -> list[dict[str, object]]:
    rows = read_output(out)
    got = [str(r["id"]) for r in rows]
    assert len(got) == len(set(got)), "duplicate ids in output"
    assert sorted(got) == sorted(ids)
    return rows


def test_sigkill_at_random_moments_then_resume_is_exactly_once(
        tmp_path: Path, make_sim: Callable[..., SimulatorThread]) -> None:
    sim = make_sim(latency_ms=40, jitter_ms=20)
    rows = prompts(600)
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.parquet"
    concurrency = 16
    rng = random.Random(7)
    kills = 0
    for _ in range(3):
        proc = _start(sim, src, out, "--concurrency", str(concurrency))
        _wait_for_progress(out, proc, minimum=1)
        time.sleep(rng.uniform(0.05, 0.6))
        if proc.poll() is not None:
            break
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=10)
        kills += 1
    proc = _start(sim, src, out, "--concurrency", str(concurrency))
    _stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    _assert_exactly_once(out, [r["id"] for r in rows])
    # only requests in flight at the instant of a kill may have been paid twice
    assert sim.stats.resent_after_ok <= concurrency * kills
    assert kills >= 1


def test_sigint_drains_in_flight_and_resume_resends_nothing(
        tmp_path: Path, make_sim: Callable[..., SimulatorThread]) -> None:
    sim = make_sim(latency_ms=150)
    rows = prompts(400)
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.parquet"
    proc = _start(sim, src, out, "--concurrency", "32")
    _wait_for_progress(out, proc, minimum=40)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130, stderr
    assert "batcher run" in stderr and "resume" in stderr.lower()
    status = json.loads(run_cli("status", out, "--json").stdout)
    assert 0 < status["done"] < 400
    assert status["pending"] == 400 - status["done"]

    proc = _start(sim, src, out, "--concurrency", "32")
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    _assert_exactly_once(out, [r["id"] for r in rows])
    assert sim.stats.resent_after_ok == 0


def test_sigterm_exits_143_and_keeps_state(tmp_path: Path,
                                           make_sim: Callable[..., SimulatorThread]) -> None:
    sim = make_sim(latency_ms=150)
    src = write_jsonl(tmp_path / "in.jsonl", prompts(300))
    out = tmp_path / "out.parquet"
    proc = _start(sim, src, out, "--concurrency", "16")
    _wait_for_progress(out, proc, minimum=16)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 143, stderr
    summary = json.loads((tmp_path / "out.summary.json").read_text())
    assert summary["outcome"] == "interrupted" and summary["exit_code"] == 143
    assert summary["resume_command"]


def test_a_second_run_on_a_locked_output_exits_3_naming_the_holder(
        tmp_path: Path, make_sim: Callable[..., SimulatorThread]) -> None:
    sim = make_sim(latency_ms=200)
    src = write_jsonl(tmp_path / "in.jsonl", prompts(200))
    out = tmp_path / "out.parquet"
    first = _start(sim, src, out, "--concurrency", "4")
    try:
        _wait_for_progress(out, first, minimum=1)
        second = _start(sim, src, out)
        _, stderr = second.communicate(timeout=30)
        assert second.returncode == 3
        assert str(first.pid) in stderr
        status = json.loads(run_cli("status", out, "--json").stdout)
        assert status["running"] is True
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=10)
    # the dead holder's lock is taken over
    result = run_cli("run", src, "-o", out, "--base-url", sim.base_url, "--model",
                     "gpt-4o-mini", "--no-progress", "--concurrency", "64")
    assert result.exit_code == 0, result.stderr


def test_finished_job_rerun_sends_nothing(tmp_path: Path, sim: SimulatorThread) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", prompts(30))
    out = tmp_path / "out.parquet"
    args = ("run", src, "-o", out, "--base-url", sim.base_url, "--model", "m", "--no-progress")
    assert run_cli(*args).exit_code == 0
    sent = sim.stats.requests
    result = run_cli(*args)
    assert result.exit_code == 0, result.stderr
    assert sim.stats.requests == sent
    _assert_exactly_once(out, [r["id"] for r in prompts(30)])


def test_changed_job_refuses_to_resume_unless_told(tmp_path: Path, sim: SimulatorThread) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", prompts(10))
    out = tmp_path / "out.parquet"
    base = ("run", src, "-o", out, "--base-url", sim.base_url, "--no-progress")
    assert run_cli(*base, "--model", "a").exit_code == 0
    result = run_cli(*base, "--model", "b")
    assert result.exit_code == 2
    assert "model" in result.stderr and "--restart" in result.stderr
    sent = sim.stats.requests
    result = run_cli(*base, "--model", "b", "--force-resume")
    assert result.exit_code == 0 and sim.stats.requests == sent
    result = run_cli(*base, "--model", "b", "--restart")
    assert result.exit_code == 0
    assert sim.stats.requests == sent + 10
    assert {r["model"] for r in read_output(out)} == {"b"}


def test_retry_failed_reruns_only_error_rows(
        tmp_path: Path, make_sim: Callable[..., SimulatorThread]) -> None:
    flaky = make_sim(fail_rate=0.5, seed=3)
    rows = prompts(40)
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.parquet"
    result = run_cli("run", src, "-o", out, "--base-url", flaky.base_url, "--model", "m",
                     "--no-progress", "--max-attempts", "1")
    assert result.exit_code == 1
    first = {r["id"]: r for r in read_output(out)}
    failed = sorted(i for i, r in first.items() if r["status"] == "error")
    assert failed
    healthy = make_sim()
    result = run_cli("run", src, "-o", out, "--base-url", healthy.base_url, "--model", "m",
                     "--no-progress", "--retry-failed")
    assert result.exit_code == 0, result.stderr
    assert healthy.stats.requests == len(failed)
    final = {str(r["id"]): r for r in _assert_exactly_once(out, [r["id"] for r in rows])}
    assert all(r["status"] == "ok" for r in final.values())
    for i, r in first.items():                 # answers paid for earlier are kept as they were
        if r["status"] == "ok":
            assert final[i]["response_id"] == r["response_id"]


def test_status_after_finish_reports_totals(tmp_path: Path, sim: SimulatorThread) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", [*prompts(12), {"id": "bad"}])
    out = tmp_path / "out.parquet"
    run_cli("run", src, "-o", out, "--base-url", sim.base_url, "--model", "gpt-4o-mini",
            "--no-progress")
    result = run_cli("status", out, "--json")
    assert result.exit_code == 0
    info = json.loads(result.stdout)
    assert info["ok"] == 12 and info["error"] == 0 and info["pending"] == 0
    assert info["running"] is False
    assert info["prompt_tokens"] > 0 and info["cost_usd"] > 0
    text = run_cli("status", out)
    assert "ok" in text.stdout
    assert pq.read_metadata(out).num_rows == 12
    assert os.path.exists(str(out) + ".state")


def test_second_ctrl_c_stops_at_once_and_state_stays_consistent(
        tmp_path: Path, make_sim: Callable[..., SimulatorThread]) -> None:
    slow = make_sim(latency_ms=8000)
    rows = prompts(50)
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.parquet"
    proc = _start(slow, src, out, "--concurrency", "8")
    deadline = time.monotonic() + 20
    while slow.stats.requests < 8 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert slow.stats.requests >= 8                      # eight requests are in flight
    started = time.monotonic()
    proc.send_signal(signal.SIGINT)                       # first: wait for in-flight...
    assert proc.stderr is not None
    seen = []
    for line in proc.stderr:                              # (its "stopping" line, not a sleep)
        seen.append(line)
        if '"stopping"' in line:
            break
    assert any('"stopping"' in line for line in seen), seen
    assert proc.poll() is None                            # still waiting for the 8 s answers
    proc.send_signal(signal.SIGINT)                       # ...second: stop now
    _, rest = proc.communicate(timeout=20)
    stderr = "".join(seen) + rest
    assert proc.returncode == 130, stderr
    assert time.monotonic() - started < 5                 # did not wait for the 8 s answers
    fast = make_sim()
    result = run_cli("run", src, "-o", out, "--base-url", fast.base_url, "--model",
                     "gpt-4o-mini", "--no-progress")
    assert result.exit_code == 0, result.stderr
    _assert_exactly_once(out, [r["id"] for r in rows])


def test_status_of_an_output_that_never_ran_exits_2(tmp_path: Path) -> None:
    result = run_cli("status", tmp_path / "typo.parquet")
    assert result.exit_code == 2
    assert "typo.parquet" in result.stderr and "no output and no state" in result.stderr


def test_sigkill_while_the_journal_part_is_built_then_resume_is_exactly_once(
        tmp_path: Path, make_sim: Callable[..., SimulatorThread]) -> None:
    """The journal's Parquet part is built as answers arrive (a temporary file beside the
    journal); a kill -9 then leaves both, and the resume trusts only the journal."""
    from batcher.io.writer import BUILD_CHUNK_ROWS

    sim = make_sim(latency_ms=20)
    rows = prompts(6000)
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.parquet"
    state = out.with_name(out.name + ".state")
    proc = _start(sim, src, out, "--concurrency", "32")
    _wait_for_progress(out, proc, minimum=BUILD_CHUNK_ROWS + 100)
    building = list(state.glob(".part-*.tmp"))
    assert proc.poll() is None, "the job ended before the kill"
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=10)
    assert building, "no part was being built when the job was killed"
    proc = _start(sim, src, out, "--concurrency", "32")
    _stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert [r["id"] for r in _assert_exactly_once(out, [r["id"] for r in rows])] == \
        [r["id"] for r in rows]
    assert sim.stats.resent_after_ok <= 32  # only what was in flight at the kill
    assert not list(state.glob(".*.tmp"))
