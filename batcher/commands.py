"""What each CLI command does, as plain functions returning exit codes (usable without click)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import signal
import sys
import uuid
from collections.abc import Coroutine, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import click
import orjson

from batcher.checkpoint import read_meta, state_dir_for, status
from batcher.config import RunConfig, make_config
from batcher.errors import Aborted, BatcherError, ConfigError, ExitCode, fail
from batcher.estimate import EstimateReport, estimate, estimate_jsonl
from batcher.io.readers import iter_batches
from batcher.io.scan import is_jsonl
from batcher.jobfile import CLI_ONLY_KEYS, is_job_file, job_outputs, load_job
from batcher.log import LogFormat, bind_log_context, configure_logging, get_logger
from batcher.runner import MAX_PROBLEMS_LOGGED, Runner
from batcher.secrets import redact_argv
from batcher.summary import RunSummary, write_summary
from batcher.types import RequestRow

T = TypeVar("T")


def _build_config(values: dict[str, Any]) -> RunConfig:
    if values.get("output") is None:
        raise ConfigError("-o/--output is required (the Parquet file to write)")
    return make_config({k: v for k, v in values.items() if k not in CLI_ONLY_KEYS})


def execute_run(input: Path | str, output: Path | None, values: dict[str, Any], *,
                show_progress: bool, argv: list[str] | None = None, report: bool = True) -> int:
    """``batcher run``: one job, or every run of a job file's model matrix. Returns the exit
    code PRODUCT.md defines; for a matrix the worst one (a usage error or an interrupt stops
    the matrix at once). A job file's runs each write ``NAME.report.html`` beside their
    summary (and a matrix a comparison page) unless ``report`` is False or the job file says
    ``no_report = true``; a report that cannot be written is a warning, never the exit code."""
    if not is_job_file(input):
        return _execute_one({**values, "input": input, "output": output},
                            show_progress=show_progress, argv=argv)
    try:
        runs = load_job(Path(input), {**values, "output": output})
    except BatcherError as exc:
        return fail(exc, exc.exit_code)
    worst = 0
    reported: list[Path] = []
    for job_run in runs:
        run_values = {**job_run.values, "prices": job_run.prices or None}
        quiet = bool(run_values.pop("no_progress", False))
        wants_report = report and not run_values.pop("no_report", False)
        code = _execute_one(run_values, show_progress=show_progress and not quiet, argv=argv)
        worst = max(worst, code, key=_severity)
        # Not after a usage error: whatever output is there is not this run's.
        if wants_report and code != 2 and _auto_report([Path(run_values["output"])], None,
                                                       run_values):
            reported.append(Path(run_values["output"]))
        if code in (2, 130, 143):
            break
    if len(reported) > 1:
        from batcher.report import job_comparison_path

        _auto_report(reported, job_comparison_path(str(runs[0].values["job"]), reported),
                     runs[0].values)
    return worst


def _severity(code: int) -> tuple[int, int]:
    """Orders exit codes for a matrix: pending (75: run again later) is worse than finished
    with failed rows, and better than any error; the others in their numeric order."""
    return (1, 1) if code == ExitCode.PENDING else (int(code > ExitCode.FAILED_ROWS) * 2, code)


def _auto_report(outputs: list[Path], dest: Path | None, values: dict[str, Any]) -> bool:
    """A job run's report (a warning, not a failure, when it cannot be written)."""
    from batcher.report import report_path, write_report
    from batcher.report.aggregate import has_results
    from batcher.report.command import report_redactor

    if not all(has_results(o) for o in outputs):
        return False
    target = dest or report_path(outputs[0])
    try:
        write_report(outputs, target, redact=report_redactor(values.get("api_key_env")))
    except (BatcherError, OSError) as exc:
        get_logger().warning("report_not_written", path=str(target), reason=str(exc))
        return False
    get_logger().info("report_written", path=str(target))
    return True


def _execute_one(values: dict[str, Any], *, show_progress: bool,
                 argv: list[str] | None) -> int:
    run_id = uuid.uuid4().hex[:12]
    log_format: LogFormat = "json" if values.get("log_format") == "json" else "console"
    configure_logging(log_format, {"run_id": run_id})
    try:
        config = _build_config(values)
    except BatcherError as exc:
        return fail(exc, exc.exit_code)
    if config.job:
        bind_log_context(job=config.job)
    progress_on = show_progress and sys.stderr.isatty()
    try:
        runner = Runner(config, run_id=run_id,
                        command=_resume_argv(argv) if argv else None)
        summary = run_async(_run_with_signals(runner, progress_on))
    except BatcherError as exc:
        get_logger().error("run_failed", error=str(exc), exit_code=int(exc.exit_code))
        return fail(exc, exc.exit_code)
    except Exception as exc:
        # A defect of batcher's, not the user's: the state was flushed and closed on the way
        # out (Runner.run's finally), so the run is resumable. No traceback unless asked for.
        if os.environ.get("BATCHER_DEBUG"):
            raise
        get_logger().error("internal_error", error=f"{type(exc).__name__}: {exc}")
        return fail(Aborted(
            f"internal error ({type(exc).__name__}: {exc}). Every answer already received is "
            "saved: rerun the same command to resume. Please report this, with the output of "
            "the rerun under BATCHER_DEBUG=1"), ExitCode.ABORTED)
    if summary.outcome != "finished" and argv:
        summary.resume_command = _resume_command(argv)
        write_summary(config.summary_path, summary)
    _report(summary, table=log_format != "json")
    if summary.outcome == "pending" and summary.resume_command:
        # The one line a cron job's log needs, whole (the table may cut it to the terminal).
        print(f"batcher: {summary.message}: {summary.resume_command}", file=sys.stderr)
    return summary.exit_code


def _resume_argv(argv: list[str]) -> list[str]:
    """The command line that resumes this run: the same one, without --restart, secret
    header values masked."""
    return ["batcher", *redact_argv([a for a in argv if a != "--restart"])]


def _resume_command(argv: list[str]) -> str:
    return shlex.join(_resume_argv(argv))


def _report(summary: RunSummary, *, table: bool) -> None:
    """Log the outcome; on console logs also draw the human table (JSON logs stay pure)."""
    from batcher.progress import render_summary

    log = get_logger()
    partial: dict[str, float | int] = {}
    if summary.cost_usd is None:
        partial = {"cost_usd_known": summary.cost_usd_known,
                   "rows_cost_unknown": summary.rows_cost_unknown}
    log.info("run_finished", outcome=summary.outcome, exit_code=summary.exit_code,
             rows=summary.rows, ok=summary.ok, error=summary.error, skipped=summary.skipped,
             cost_usd=summary.cost_usd, **partial, duration_s=summary.duration_s,
             resume=summary.resume_command)
    if table:
        render_summary(summary, sys.stderr)


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run on uvloop when available (faster sockets), else the default loop."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on POSIX
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


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


def execute_estimate(input: Path | str, values: dict[str, Any], *, as_json: bool,
                     sample: int | None) -> int:
    """``batcher estimate`` / ``run --dry-run``: nothing is sent (unless ``sample``). For a
    job file, one estimate per run of its matrix (JSON: a list)."""
    configure_logging("json" if values.get("log_format") == "json" else "console")
    try:
        if is_job_file(input):
            runs = [{**r.values, "prices": r.prices or None}
                    for r in load_job(Path(input), {**values, "output": values.get("output")})]
        else:
            runs = [{**values, "input": input, "output": Path("estimate.parquet")}]
        reports = []
        for run_values in runs:
            run_values.setdefault("output", Path("estimate.parquet"))
            config = _build_config(run_values)
            if sample:
                from batcher.sample import estimate_with_sample

                reports.append(run_async(estimate_with_sample(config, sample)))
                continue
            reports.append(estimate_job(config))
    except BatcherError as exc:
        return fail(exc, exc.exit_code)
    if as_json:
        docs = [r.to_json() for r in reports]
        print(orjson.dumps(docs[0] if len(docs) == 1 else docs).decode())
    else:
        print("\n\n".join(r.render() for r in reports))
    # As `run` would exit: bad rows would be skipped there too.
    return ExitCode.FAILED_ROWS if any(r.bad_rows for r in reports) else ExitCode.OK


def estimate_job(config: RunConfig) -> EstimateReport:
    """The dry-run report for one configured job: reads the input, sends nothing."""
    options = replace(config.reader_options(), carry_columns=False)
    ctx = config.request_context(sending=False)
    bad = 0
    log = get_logger()
    hits: int | None = None

    def rows() -> Iterator[RequestRow]:
        nonlocal bad
        for batch in iter_batches(config.input, options):
            for problem in batch.problems:
                bad += 1
                if bad <= MAX_PROBLEMS_LOGGED:  # as `run` reports them: where, and what
                    log.warning("bad_row_skipped", where=f"{problem.source}:{problem.line}",
                                field=problem.field, problem=problem.message)
            yield from batch.rows

    if config.cache is None and is_jsonl(config.input):
        # The one-pass dry run (no request built for a row that is only a prompt). The bad
        # rows are logged as `run` logs them, once the pass is over.
        report, problems = estimate_jsonl(
            config.input, options, ctx, config.endpoint, rpm=config.rpm, tpm=config.tpm,
            concurrency=config.concurrency, price_input=config.price_input,
            price_output=config.price_output, prices_table=config.prices,
            batch=config.mode == "batch", problems_kept=MAX_PROBLEMS_LOGGED)
        for problem in problems:
            log.warning("bad_row_skipped", where=f"{problem.source}:{problem.line}",
                        field=problem.field, problem=problem.message)
        return report

    def misses() -> Iterator[RequestRow]:
        nonlocal hits
        from batcher.cache import ResponseCache, cache_misses

        assert config.cache is not None
        hits = 0
        with ResponseCache(config.cache) as store:
            for batch, n_hits in cache_misses(rows(), replace(ctx, headers=config.headers),
                                              config.endpoint, store,
                                              nondeterministic=config.cache_nondeterministic):
                hits += n_hits
                yield from batch

    report = estimate(rows() if config.cache is None else misses(), ctx, config.endpoint,
                      rpm=config.rpm, tpm=config.tpm,
                      concurrency=config.concurrency, price_input=config.price_input,
                      price_output=config.price_output, prices_table=config.prices,
                      batch=config.mode == "batch")
    report.bad_rows = bad
    report.cache_hits = hits
    return report


UNKNOWN_TOTALS = frozenset({"prompt_tokens", "completion_tokens", "cost_usd"})
"""``batcher status`` keys that are None when a total is unknown (shown so, not as None)."""


def execute_status(target: Path, *, as_json: bool) -> int:
    """``batcher status``: an output's state (works mid-run), or every output of a job file."""
    try:
        outputs = job_outputs(target) if is_job_file(target) else [target]
        infos = [status(output) for output in outputs]
    except BatcherError as exc:
        return fail(exc, exc.exit_code)
    if not any(info.get("state_exists") or info.get("output_exists") for info in infos):
        names = ", ".join(str(o) for o in outputs)
        return fail(ConfigError(f"{names}: no output and no state found (has it run yet?)"), 2)
    listings = [_batches_of(output) for output in outputs]
    if as_json:
        docs = [{**info, **(listing or {})} for info, listing in zip(infos, listings,
                                                                     strict=True)]
        print(orjson.dumps(docs[0] if len(docs) == 1 else docs).decode())
        return ExitCode.OK
    for info, listing in zip(infos, listings, strict=True):
        width = max(len(k) for k in info)
        for key, value in info.items():
            if value is None and key in UNKNOWN_TOTALS:
                value = "unknown"  # some answered row's usage or cost is: never a silent 0
            print(f"{key:<{width}}  {value}")
        if listing is not None:
            print(_render_batches(listing))
        print()
    return ExitCode.OK


def _batches_of(output: Path) -> dict[str, Any] | None:
    """A batch-mode output's provider batches, refreshed from the provider when it can be
    asked (see :func:`batcher.engines.batch.control.batch_listing`)."""
    from batcher.engines.batch.control import batch_listing

    return run_async(batch_listing(output))


def _render_batches(listing: dict[str, Any]) -> str:
    lines = [f"batches  {len(listing['batches'])}"]
    for b in listing["batches"]:
        counts = ", ".join(f"{k} {v}" for k, v in b["counts"].items()) or "-"
        age = "-" if b["age_s"] is None else f"{b['age_s']:.0f}s"
        lines.append(f"  part {b['part']:<4} {b['batch_id'] or '(not created)'}  "
                     f"{b['state']:<11} requests {b['requests']:<6} {counts}  age {age}")
    if listing.get("note"):
        lines.append(f"  ({listing['note']})")
    return "\n".join(lines)


def execute_cancel(output: Path) -> int:
    """``batcher cancel``: cancel a batch-mode output's running batches and collect what they
    answered, writing the rest as ``cancelled`` (the output is then complete). It runs the
    output's own command again (kept in its state) with ``cancelling`` set; without one (a
    state from before batcher kept it, or a secret header given as text) it only cancels.
    Exit 0 when cancelled (and collected), 2 when the output has no batches, 3 when the
    provider cannot be asked, 130/143 when interrupted (``batcher cancel`` again goes on)."""
    from batcher.engines.batch.control import cancel_batches
    from batcher.engines.batch.ledger import Ledger

    configure_logging("console")
    state = state_dir_for(output)
    if Ledger.read(state) is None:
        return fail(ConfigError(f"{output}: no provider batches recorded (was it run with "
                                "--mode batch?)"), ExitCode.USAGE)
    try:
        recorded = _recorded_run(output)
    except BatcherError as exc:
        return fail(exc, exc.exit_code)
    if isinstance(recorded, tuple):
        values, argv, cwd = recorded
        with contextlib.chdir(cwd):
            code = _execute_one(values, show_progress=True, argv=argv)
        if code not in (ExitCode.OK, ExitCode.FAILED_ROWS):
            return code
        print(f"cancelled: {output} holds every row; those not answered have "
              "error_type=cancelled, and the same command with --retry-failed sends them: "
              f"{shlex.join(['batcher', *argv, '--retry-failed'])}")
        return ExitCode.OK
    try:
        cancelled = run_async(cancel_batches(output))
    except BatcherError as exc:
        return fail(exc, exc.exit_code)
    print(f"cancelled {len(cancelled)} batch{'' if len(cancelled) == 1 else 'es'}"
          + (f": {', '.join(cancelled)}" if cancelled else " (none was running)")
          + f". Not collected: {recorded}. Rerun your `batcher run` command to collect what "
            "they finished (it also submits the rest again)")
    return ExitCode.OK


def _recorded_run(output: Path) -> tuple[dict[str, Any], list[str], Path] | str:
    """The values, arguments and working folder of the command that runs ``output``, kept in
    its state's meta.json, set to cancel; else why there is none."""
    from batcher.cli import collect, run
    from batcher.secrets import MASK

    try:
        meta = read_meta(state_dir_for(output)) or {}
    except ValueError:
        meta = {}
    command, cwd = meta.get("command"), meta.get("cwd")
    if not (isinstance(command, list) and command[1:2] == ["run"] and isinstance(cwd, str)):
        return "its state does not name the command that ran it"
    argv = [str(a) for a in command[1:]]
    if any(MASK in a for a in argv):
        return ("its command gave a secret --header as text, which the state does not keep "
                "(give it as 'Name: env:VARIABLE' to let batcher cancel collect)")
    target = output.resolve()
    with contextlib.chdir(cwd):
        try:
            ctx = run.make_context("run", argv[1:])
        except click.ClickException as exc:
            raise ConfigError(f"{output}: its recorded command no longer parses "
                              f"({exc.format_message()})") from exc
        params = dict(ctx.params)
        source, dest = params.pop("input"), params.pop("output")
        for key in ("no_progress", "dry_run", "as_json", "no_report"):
            params.pop(key, None)
        values = {**collect(params), "no_wait": None, "cancelling": True}
        if not is_job_file(source):
            return {**values, "input": source, "output": dest}, argv, Path(cwd)
        for job_run in load_job(Path(source), {**values, "output": dest}):
            if Path(job_run.values["output"]).resolve() == target:
                return ({**job_run.values, "prices": job_run.prices or None, "no_wait": None,
                         "cancelling": True}, argv, Path(cwd))
    return f"its job file {source} no longer names {output}"


def execute_cache_stats(folder: Path, *, as_json: bool) -> int:
    """``batcher cache stats DIR``: exit 0, or 2 when DIR holds no cache."""
    from batcher.cache import open_existing

    try:
        with open_existing(folder) as store:
            stats = store.stats()
    except BatcherError as exc:
        return fail(exc, exc.exit_code)
    print(orjson.dumps(stats.to_json()).decode() if as_json else stats.render())
    return ExitCode.OK


def execute_cache_clear(folder: Path, *, older_than: str | None) -> int:
    """``batcher cache clear DIR [--older-than AGE]``: exit 0, or 2 on a bad DIR or AGE."""
    from batcher.cache import open_existing, parse_age

    try:
        age = parse_age(older_than) if older_than is not None else None
        with open_existing(folder) as store:
            removed = store.clear(age)
    except BatcherError as exc:
        return fail(exc, exc.exit_code)
    which = f" older than {older_than}" if older_than is not None else ""
    print(f"removed {removed:,} cache entr{'y' if removed == 1 else 'ies'}{which} from {folder}")
    return ExitCode.OK
