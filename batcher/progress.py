"""Terminal rendering of a run (CLI layer): a rich progress bar and the end-of-run table."""

from __future__ import annotations

import asyncio
import time
from typing import TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from batcher.runner import Progress as RunProgress
from batcher.runner import RunSummary

REFRESH_S = 0.25


async def show_progress(progress: RunProgress, stream: TextIO) -> None:
    """Redraw a progress bar from the runner's counters until cancelled."""
    console = Console(file=stream, stderr=True)
    columns = (
        TextColumn("[bold]batcher"), BarColumn(bar_width=16), MofNCompleteColumn(),
        TextColumn("{task.fields[rate]} rows/s"), TextColumn("{task.fields[tokens]} tok"),
        TextColumn("${task.fields[cost]}"), TextColumn("[red]{task.fields[errors]} err"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False, auto_refresh=False) as bar:
        task = bar.add_task("run", total=progress.total, rate="0", tokens=0, cost="0.00",
                            errors=0)
        t0, base = time.monotonic(), None
        try:
            while True:
                if base is None and progress.total is not None:
                    base = progress.already_done
                done = progress.done
                sent = done - (base or 0)
                elapsed = max(1e-9, time.monotonic() - t0)
                bar.update(task, total=progress.total, completed=done,
                           rate=f"{sent / elapsed:,.0f}",
                           tokens=f"{progress.prompt_tokens + progress.completion_tokens:,}",
                           cost=f"{progress.cost_usd:,.4f}",
                           errors=progress.error + progress.bad_rows)
                bar.refresh()
                await asyncio.sleep(REFRESH_S)
        except asyncio.CancelledError:
            bar.update(task, completed=progress.done)
            bar.refresh()
            raise


def render_summary(summary: RunSummary, stream: TextIO) -> None:
    """A short human table at the end of a run."""
    console = Console(file=stream, stderr=True, highlight=False)
    table = Table(title=f"batcher {summary.outcome}", show_header=False, box=None)
    rows = [
        ("output", summary.output),
        ("rows", f"{summary.rows:,} ({summary.ok:,} ok, {summary.error:,} error, "
                 f"{summary.skipped:,} bad input skipped)"),
        ("this run", f"{summary.sent_this_run:,} answered in {summary.duration_s:,.1f} s"
                     + (f", {summary.resumed:,} already done" if summary.resumed else "")),
        ("tokens", f"{summary.prompt_tokens:,} in, {summary.completion_tokens:,} out"),
        ("cost", f"${summary.cost_usd:,.4f}"),
    ]
    if summary.errors_by_type:
        rows.append(("errors", ", ".join(f"{k}: {v}" for k, v in
                                         sorted(summary.errors_by_type.items()))))
    if summary.message:
        rows.append(("reason", summary.message))
    if summary.resume_command:
        rows.append(("resume with", summary.resume_command))
    rows.append(("exit code", str(summary.exit_code)))
    for key, value in rows:
        table.add_row(f"[bold]{key}", value)
    console.print(table)
