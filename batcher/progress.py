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

from batcher.spend import Spend
from batcher.summary import Progress as RunProgress
from batcher.summary import RunSummary

REFRESH_S = 0.25


async def show_progress(progress: RunProgress, stream: TextIO) -> None:
    """Redraw a progress bar from the runner's counters until cancelled."""
    console = Console(file=stream, stderr=True)
    columns = (
        TextColumn("[bold]batcher"), BarColumn(bar_width=16), MofNCompleteColumn(),
        TextColumn("{task.fields[rate]} rows/s"), TextColumn("{task.fields[tokens]} tok"),
        # The engine's stage (batch mode: batches by state) rides on the errors column: a
        # column of its own, empty in live mode, would take width from the counts.
        TextColumn("${task.fields[cost]}"),
        TextColumn("[red]{task.fields[errors]} err[/red]{task.fields[stage]}"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False, auto_refresh=False) as bar:
        task = bar.add_task("run", total=progress.total, rate="0", tokens=0, cost="0.00",
                            errors=0, stage="")
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
                           tokens=_running_tokens(progress.spend),
                           cost=_running_cost(progress.spend),
                           errors=progress.error + progress.bad_rows,
                           stage=f" · {progress.stage}" if progress.stage else "")
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
                     + (f", {summary.cache_hits:,} from the cache" if summary.cache_hits else "")
                     + (f", {summary.resumed:,} already done" if summary.resumed else "")),
        ("tokens", tokens_text(summary)),
        ("cost", cost_text(summary)),
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


def _running_tokens(spend: Spend) -> str:
    """The bar's token figure: ``+?`` marks rows whose usage was not reported."""
    known = f"{spend.prompt_tokens_known + spend.completion_tokens_known:,}"
    if not spend.rows_usage_unknown:
        return known
    return f"{known}+?" if spend.rows_usage_reported else "?"


def _running_cost(spend: Spend) -> str:
    """The bar's cost figure: ``+?`` marks rows whose cost is unknown, never a silent 0."""
    known = f"{spend.cost_usd_known:,.4f}"
    if not spend.rows_cost_unknown:
        return known
    return f"{known}+?" if spend.rows_priced else "?"


def tokens_text(summary: RunSummary) -> str:
    """The summary's token line: the totals, or which rows reported no usage."""
    if summary.prompt_tokens is not None and summary.completion_tokens is not None:
        return f"{summary.prompt_tokens:,} in, {summary.completion_tokens:,} out"
    unknown, reported = summary.rows_usage_unknown, summary.rows_usage_reported
    if not reported:
        return f"usage not reported by the server ({unknown:,} rows)"
    return (f"usage not reported for {unknown:,} rows ({summary.prompt_tokens_known:,} in, "
            f"{summary.completion_tokens_known:,} out for the other {reported:,})")


def cost_text(summary: RunSummary) -> str:
    """The summary's cost line: the total, or for how many rows it is unknown, what the priced
    rest cost, and why (a missing price, or no usage to price)."""
    if summary.cost_usd is not None:
        return dollars(summary.cost_usd)
    unknown, priced = summary.rows_cost_unknown, summary.rows_priced
    text = (f"unknown for {unknown:,} rows ({dollars(summary.cost_usd_known)} for the other "
            f"{priced:,})" if priced else f"unknown for all {unknown:,} rows")
    if unknown > summary.rows_usage_unknown:
        return text + " — no price known for the model: set --price-input and --price-output"
    return text + " — no usage reported"


def dollars(amount: float) -> str:
    """``$1.2345``; an amount too small for 4 decimals gets 6, so it never reads as $0."""
    return f"${amount:,.6f}" if 0 < abs(amount) < 0.00005 else f"${amount:,.4f}"
