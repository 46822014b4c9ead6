"""Progress bar on a terminal, log lines otherwise, and the end-of-run table."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import pty
import subprocess
import sys
from pathlib import Path

from batcher.progress import render_summary, show_progress
from batcher.simulate import SimulatorThread
from batcher.spend import Spend
from batcher.summary import Progress, RunSummary
from tests.conftest import prompts, run_cli, write_jsonl


async def _bar_text(progress: Progress) -> str:
    stream = io.StringIO()
    task = asyncio.create_task(show_progress(progress, stream))
    for _ in range(10_000):                   # the first frame is drawn at the first step
        if stream.getvalue():
            break
        await asyncio.sleep(0)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return stream.getvalue()


async def test_progress_bar_shows_rows_rate_tokens_cost_and_errors() -> None:
    spend = Spend(prompt_tokens_known=12_345, completion_tokens_known=6_789,
                  cost_usd_known=1.2345, rows_priced=400, rows_usage_reported=400)
    progress = Progress(total=1000, already_done=100, ok=400, error=7, bad_rows=2, spend=spend)
    text = await _bar_text(progress)
    assert "507/1000" in text
    assert "rows/s" in text
    assert "19,134 tok" in text
    assert "$1.2345" in text
    assert "9 err" in text


async def test_progress_bar_marks_unknown_cost_and_usage_instead_of_zero() -> None:
    unknown = Spend(rows_cost_unknown=5, rows_usage_unknown=5)
    text = await _bar_text(Progress(total=10, ok=5, spend=unknown))
    assert "? tok" in text and "$?" in text and "$0.0000" not in text
    partial = Spend(prompt_tokens_known=100, completion_tokens_known=20, cost_usd_known=0.5,
                    rows_priced=3, rows_usage_reported=3, rows_cost_unknown=2,
                    rows_usage_unknown=2)
    text = await _bar_text(Progress(total=10, ok=5, spend=partial))
    assert "120+? tok" in text and "$0.5000+?" in text


def test_summary_table_names_outcome_counts_and_resume_command() -> None:
    summary = RunSummary(
        run_id="abc", job=None, model="m", input="in.jsonl", output="out.parquet",
        started_at="t0", finished_at="t1", duration_s=12.5, outcome="interrupted",
        exit_code=130, message=None, rows=40, ok=38, error=2, skipped=1, resumed=10,
        sent_this_run=30, prompt_tokens=1000, completion_tokens=500, cost_usd=0.25, cost_usd_this_run=0.2,
        errors_by_type={"server_error": 2}, resume_command="batcher run in.jsonl -o out.parquet")
    stream = io.StringIO()
    render_summary(summary, stream)
    text = stream.getvalue()
    for needle in ("interrupted", "38 ok", "2 error", "1 bad input", "server_error: 2",
                   "batcher run in.jsonl -o out.parquet", "130"):
        assert needle in text, needle


def test_bar_on_a_terminal_and_plain_logs_when_not(tmp_path: Path, sim: SimulatorThread) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", prompts(30))
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "batcher", "run", str(src), "-o", str(tmp_path / "tty.parquet"),
         "--base-url", sim.base_url, "--model", "m"],
        stdout=subprocess.DEVNULL, stderr=slave, env={**os.environ, "COLUMNS": "160"})
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=60)
    os.close(master)
    terminal = b"".join(chunks).decode("utf-8", "replace")
    assert proc.returncode == 0
    assert "30/30" in terminal and "rows/s" in terminal

    result = run_cli("run", src, "-o", tmp_path / "plain.parquet", "--base-url", sim.base_url,
                     "--model", "m")
    assert result.exit_code == 0
    assert "rows/s" not in result.stderr                 # not a terminal: no bar
    assert "run_finished" in result.stderr
