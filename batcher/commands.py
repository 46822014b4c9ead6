"""What each CLI command does, as plain functions returning exit codes (usable without click)."""

from __future__ import annotations

import asyncio
import contextlib
import shlex
import signal
import sys
import uuid
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import orjson

from batcher.config import RunConfig, make_config
from batcher.errors import BatcherError, ConfigError
from batcher.log import configure_logging, get_logger
from batcher.runner import Runner, RunSummary, write_summary

_NOT_CONFIG = ("log_format",)
T = TypeVar("T")


def _fail(exc: BaseException, code: int) -> int:
    print(f"batcher: error: {exc}", file=sys.stderr)
    return code


def _build_config(input: Path, output: Path | None, values: dict[str, Any]) -> RunConfig:
    if output is None:
        raise ConfigError("-o/--output is required (the Parquet file to write)")
    merged = {k: v for k, v in values.items() if k not in _NOT_CONFIG}
    merged["input"] = input
    merged["output"] = output
    return make_config(merged)


def execute_run(input: Path, output: Path | None, values: dict[str, Any], *,
                show_progress: bool, argv: list[str] | None = None) -> int:
    """``batcher run``: returns the exit code PRODUCT.md defines."""
    run_id = uuid.uuid4().hex[:12]
    configure_logging(values.get("log_format") or "console", {"run_id": run_id})
    try:
        config = _build_config(input, output, values)
    except BatcherError as exc:
        return _fail(exc, exc.exit_code)
    configure_logging(values.get("log_format") or "console",
                      {"run_id": run_id, **({"job": config.job} if config.job else {})})
    runner = Runner(config, run_id=run_id)
    progress_on = show_progress and sys.stderr.isatty()
    try:
        summary = _run_async(_run_with_signals(runner, progress_on))
    except BatcherError as exc:
        get_logger().error("run_failed", error=str(exc), exit_code=exc.exit_code)
        return _fail(exc, exc.exit_code)
    if summary.outcome != "finished" and argv:
        summary.resume_command = _resume_command(argv)
        write_summary(config.summary_path, summary)
    _report(summary, table=values.get("log_format") != "json")
    return summary.exit_code


def _resume_command(argv: list[str]) -> str:
    """The command line that resumes this run: the same one, without --restart."""
    return shlex.join(["batcher", *(a for a in argv if a != "--restart")])


def _report(summary: RunSummary, *, table: bool) -> None:
    """Log the outcome; on console logs also draw the human table (JSON logs stay pure)."""
    from batcher.progress import render_summary

    log = get_logger()
    log.info("run_finished", outcome=summary.outcome, exit_code=summary.exit_code,
             rows=summary.rows, ok=summary.ok, error=summary.error, skipped=summary.skipped,
             cost_usd=summary.cost_usd, duration_s=summary.duration_s,
             resume=summary.resume_command)
    if table:
        render_summary(summary, sys.stderr)


def _run_async(coro: Coroutine[Any, Any, T]) -> T:
    from batcher.cli import run_async

    return run_async(coro)


async def _run_with_signals(runner: Runner, progress_on: bool) -> RunSummary:
    """Run with SIGINT/SIGTERM turned into a graceful stop (a second signal: stop now)."""
    loop = asyncio.get_running_loop()
    signals = {signal.SIGINT: "sigint", signal.SIGTERM: "sigterm"}
    for sig, name in signals.items():
        loop.add_signal_handler(sig, runner.request_stop, name)
    bar: asyncio.Task[None] | None = None
    if progress_on:
        from batcher.progress import show_progress

        bar = asyncio.create_task(show_progress(runner.progress, sys.stderr))
    try:
        return await runner.run()
    finally:
        if bar is not None:
            bar.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await bar
        for sig in signals:
            loop.remove_signal_handler(sig)


def execute_estimate(input: Path, values: dict[str, Any], *, as_json: bool,
                     sample: int | None) -> int:
    """``batcher estimate`` / ``run --dry-run``: nothing is sent (unless ``sample``)."""
    from batcher.estimate import estimate
    from batcher.io.readers import ReaderOptions, iter_batches
    from batcher.types import RequestContext

    configure_logging(values.get("log_format") or "console")
    try:
        config = _build_config(input, Path("estimate.parquet"), values)
        options = ReaderOptions(id_column=config.id_column, prompt_column=config.prompt_column,
                                template=config.template)
        ctx = RequestContext(base_url=config.base_url, model=config.model,
                             system=config.system, params=dict(config.params))
        bad = 0

        def rows() -> Any:
            nonlocal bad
            for batch in iter_batches(config.input, options):
                bad += len(batch.problems)
                yield from batch.rows

        row_iter: Any = rows()
        report = estimate(row_iter, ctx, config.endpoint, bad_rows=0, rpm=config.rpm,
                          tpm=config.tpm, concurrency=config.concurrency,
                          price_input=config.price_input, price_output=config.price_output)
        report.bad_rows = bad
    except BatcherError as exc:
        return _fail(exc, exc.exit_code)
    if sample:
        return _fail(ConfigError("--sample is not available yet"), 2)
    if as_json:
        print(orjson.dumps(report.to_json()).decode())
    else:
        print(report.render())
    return 0


def execute_status(output: Path, *, as_json: bool) -> int:
    """``batcher status``: from the state beside the output; works mid-run."""
    from batcher.checkpoint import status

    try:
        info = status(output)
    except BatcherError as exc:
        return _fail(exc, exc.exit_code)
    if as_json:
        print(orjson.dumps(info).decode())
    else:
        width = max(len(k) for k in info)
        for key, value in info.items():
            print(f"{key:<{width}}  {value}")
    return 0
