"""The job: reader → (done ids skipped) → bounded queue → workers → writer → durable state → output.

Guarantees (PRODUCT.md): every answered row is handed to the state store in the same event-loop
turn it is parsed, and the store makes it survive kill -9 at once, so a crash re-sends only
requests in flight. A stop request (SIGINT/SIGTERM, abort) stops dispatching at once; requests
already sent are waited for (at most ``grace`` seconds) and written, so a resume after Ctrl-C
re-sends nothing.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pyarrow.parquet as pq

from batcher.cache import CACHEABLE_FINISH, ResponseCache, is_deterministic, request_key
from batcher.checkpoint import Counters, StateStore, input_fingerprint
from batcher.config import RunConfig
from batcher.errors import (
    Aborted,
    AuthError,
    BadRequest,
    BatcherError,
    BudgetExceeded,
    ConfigError,
    InputError,
    JobFatal,
    ProviderError,
    QuotaExhausted,
    RateLimited,
    Retryable,
    SchemaCut,
    SchemaError,
    ServerDown,
    ServerRefuses,
    StreamCut,
    TransportError,
)
from batcher.io.flatten import flat_fields
from batcher.io.readers import InputProblem, ReaderOptions, count_rows, iter_batches
from batcher.limits import Throttle
from batcher.log import get_logger
from batcher.pool import Transport
from batcher.pricing import (
    Budget,
    Price,
    context_window,
    cost_usd,
    genai_price,
    max_cost_usd,
    price_for,
)
from batcher.providers import Provider, get_provider, provider_for_row
from batcher.providers.base import MultiInputProvider
from batcher.resources import explain_os_error, fit_open_files
from batcher.retry import retrying
from batcher.secrets import check_key, redactor, resolve_headers
from batcher.spend import Spend
from batcher.tokens import (
    APPROX_FACTOR,
    request_input_tokens,
    request_max_output_tokens,
    tokenizer_name,
)
from batcher.types import (
    Answer,
    HttpRequest,
    HttpResponse,
    RequestContext,
    RequestRow,
    ResultRow,
    Usage,
)

MAX_PROBLEMS_LOGGED = 20
"""Bad rows logged one by one; beyond this only counted (the summary has the total)."""
SAME_ERROR_ABORT = 20
"""Consecutive rows refused with the same client error, and no success, that stop the job."""

EXIT_OK, EXIT_FAILED_ROWS, EXIT_USAGE, EXIT_ABORTED = 0, 1, 2, 3
EXIT_SIGINT, EXIT_SIGTERM = 130, 143


class _StopRequested(Exception):
    """Raised inside a row's retry loop once the job is stopping: the row is left for resume."""


@dataclass
class Progress:
    """Live counters, updated by the runner, read by whatever renders progress."""

    total: int | None = None
    already_done: int = 0
    ok: int = 0
    error: int = 0
    bad_rows: int = 0
    spend: Spend = field(default_factory=Spend)
    """this run's tokens and cost (partial sums while some row's are unknown)."""
    retries: int = 0
    rate_limited: int = 0
    cache_hits: int = 0
    in_flight: int = 0
    started: float = field(default_factory=time.monotonic)

    @property
    def done(self) -> int:
        return self.already_done + self.ok + self.error


@dataclass
class RunSummary:
    """What a run did; written beside the output as ``*.summary.json``."""

    run_id: str
    job: str | None
    model: str | None
    input: str
    output: str
    started_at: str
    finished_at: str
    duration_s: float
    outcome: str
    """finished | interrupted | aborted"""
    exit_code: int
    message: str | None
    rows: int
    """ids in the output (ok + error), this run and earlier ones."""
    ok: int
    error: int
    skipped: int
    """bad input rows reported and skipped."""
    resumed: int
    """rows already done when this run started."""
    sent_this_run: int
    prompt_tokens: int | None
    """tokens and cost: the whole output's (every run of it, retried errors included); None
    when some ok row's usage / cost is unknown (never a silent 0: see the ``*_known`` sums
    and the ``rows_*`` counts below)."""
    completion_tokens: int | None
    cost_usd: float | None
    cost_usd_this_run: float | None
    errors_by_type: dict[str, int]
    resume_command: str | None = None
    cache_hits: int = 0
    """rows of this run served from the response cache (not sent, cost 0)."""
    cost_usd_known: float = 0.0
    """the cost of the ``rows_priced`` rows (all of ``cost_usd`` when nothing is unknown)."""
    rows_priced: int = 0
    rows_cost_unknown: int = 0
    """ok rows whose cost is unknown: no price for the model, or no usage reported."""
    prompt_tokens_known: int = 0
    """the tokens of the ``rows_usage_reported`` rows."""
    completion_tokens_known: int = 0
    rows_usage_reported: int = 0
    rows_usage_unknown: int = 0
    """ok rows whose answer carried no usage (e.g. a stream without a usage chunk)."""

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Runner:
    """Runs one job described by a :class:`RunConfig`. Usable from Python::

        summary = asyncio.run(Runner(config).run())

    ``request_stop(reason)`` may be called from a signal handler; a second call abandons
    in-flight requests at once (state stays consistent; they are re-sent on resume).
    """

    def __init__(self, config: RunConfig, *, run_id: str | None = None,
                 on_problem: Callable[[InputProblem], None] | None = None) -> None:
        self.config = config
        self.run_id = run_id or uuid.uuid4().hex[:12]
        self.progress = Progress()
        self.stop_reason: str | None = None
        self._abort_error: Aborted | JobFatal | None = None
        self._input_error: InputError | ConfigError | None = None
        self._on_problem = on_problem
        self._log = get_logger()
        self._stop_event = asyncio.Event()
        self._pending: list[ResultRow] = []
        self._pending_event = asyncio.Event()
        self._workers_done = False
        self._sending: set[asyncio.Task[None]] = set()
        self._workers: list[asyncio.Task[None]] = []
        self._reader: asyncio.Task[None] | None = None
        self._errors_by_type: Counter[str] = Counter()
        self._last_success = 0.0
        self._last_answer = 0.0
        """When the server last answered 429 (a refusal proves it is up)."""
        self._warned_only_429 = 0.0
        self._successes = 0
        self._held: list[ResultRow] = []
        self._refused: list[ResultRow] = []
        self._streak_key: tuple[int | None, str] | None = None
        self._streak_mark = 0
        """Rows that failed to reach the server: written once a later request succeeds (the
        failure was theirs), left pending if the job aborts first (the server was down)."""
        self._price_cache: dict[str | None, Price | None] = {}
        self._price_warmed = False
        self._budget = Budget(config.max_cost)
        # With a cache, embeddings go one row per request: a group's key would depend on
        # which rows happened to be queued together, and almost never hit again.
        self._group_size = (config.batch_size if config.endpoint == "embeddings"
                            and config.cache is None else 1)
        self._cache: ResponseCache | None = None
        self._warned_uncacheable = False
        self._context_warned: set[str] = set()
        self._throttle: Throttle | None = None
        self._ctx = request_context(config)
        self._redact = redactor(self._ctx.api_key, self._ctx.headers)
        """The text with the API key and secret header values masked."""

    # --- public ---------------------------------------------------------------------------

    def request_stop(self, reason: str) -> None:
        """Stop dispatching; in-flight requests finish within ``grace`` seconds. Called a
        second time (a second Ctrl-C), in-flight requests are abandoned at once."""
        if self.stop_reason is not None:
            if reason in ("sigint", "sigterm"):
                self._log.warning("stopping_now", reason=reason)
                for task in list(self._sending):
                    task.cancel()
            return
        self.stop_reason = reason
        self._stop_event.set()
        if reason in ("sigint", "sigterm"):
            self._log.warning("stopping", reason=reason, grace_s=self.config.grace,
                              in_flight=len(self._sending))
        if self._reader is not None:
            self._reader.cancel()
        # Workers not holding a sent request may go now; those that are get `grace` seconds.
        for task in self._workers:
            if task not in self._sending:
                task.cancel()
        loop = asyncio.get_running_loop()
        loop.call_later(self.config.grace, self._abandon_in_flight)

    async def run(self) -> RunSummary:
        started_at, t0 = _now_iso(), time.monotonic()
        get_provider(self.config.endpoint)
        pool, warning = fit_open_files(self.config.concurrency)
        if warning is not None:
            self._log.warning("concurrency_capped", reason=warning)
            self.config = replace(self.config, concurrency=pool)
        config = self.config
        options = ReaderOptions(id_column=config.id_column, prompt_column=config.prompt_column,
                                template=config.template)
        total = count_rows(config.input)
        self._warn_if_slow(total)
        iter_batches(config.input, options)  # checks the file and options up front (exit 2)
        if config.strict:
            self._validate_strict(options)
        fingerprint = self._fingerprint()
        self._check_output_writable()
        store = StateStore.open(config.output, fingerprint, run_id=self.run_id,
                                restart=config.restart, force_resume=config.force_resume)
        outcome, message = "finished", None
        try:
            if config.cache is not None:
                self._cache = ResponseCache(config.cache)
            skip = store.done_ids(include_errors=not config.retry_failed)
            # The cap is for the output, not for one run: earlier runs' spend counts.
            self._budget.spent = store.counters.cost_usd_known
            self.progress.total = total
            self.progress.already_done = len(skip)
            store.update_meta(status="running", total_rows=total,
                              started_at=started_at)
            self._log.info("run_started", input=str(config.input), output=str(config.output),
                           rows=total, already_done=len(skip), endpoint=config.endpoint,
                           model=config.model, concurrency=config.concurrency)
            try:
                await self._pipeline(store, options, skip)
            except OSError as exc:
                explained = explain_os_error(exc, config.output, config.state_dir)
                if explained is None:
                    raise
                self._abort(explained)
            if self._input_error is not None:
                store.update_meta(status="input_error")
                raise self._input_error
            if self._abort_error is not None:
                outcome, message = "aborted", str(self._abort_error)
            elif self.stop_reason is not None:
                outcome = "interrupted"
            meta: dict[str, object] = {"status": outcome, "bad_rows": self.progress.bad_rows}
            if outcome == "finished":
                # Now known: rows that can be answered (bad input rows are not pending).
                meta["total_rows"] = total - self.progress.bad_rows
            try:
                store.update_meta(**meta)
                if outcome == "finished":
                    schema = config.response_schema
                    store.finalize(flat_fields(schema.schema)
                                   if config.flatten and schema is not None else ())
            except OSError as exc:
                explained = explain_os_error(exc, config.output, config.state_dir)
                if explained is None:
                    raise
                outcome, message = "aborted", str(explained)
                self._log.error("aborting", reason=message, error_type=type(explained).__name__)
        finally:
            self._save_pending(store)
        return self._summary(outcome, message, started_at, t0, store.counters)

    def _save_pending(self, store: StateStore) -> None:
        """Last chance for answers received but not yet written (whatever ended the run),
        then release the state. A disk that is still full loses only these few rows'
        answers; the state stays consistent and they are sent again on resume."""
        try:
            if self._pending:
                store.append(self._pending)
                self._pending = []
        except OSError as exc:
            self._log.error("answers_not_saved", rows=len(self._pending), reason=str(exc))
        finally:
            if self._cache is not None:
                self._cache.close()
            try:
                store.close()
            except OSError as exc:
                # The journal stays; the next open compacts it.
                self._log.warning("state_close_failed", reason=str(exc))

    # --- setup ----------------------------------------------------------------------------

    def _fingerprint(self) -> dict[str, object]:
        c = self.config
        return {
            "input": input_fingerprint(c.input), "endpoint": c.endpoint, "model": c.model,
            "params": dict(sorted(c.params.items())), "template": c.template,
            "system": c.system, "id_column": c.id_column, "prompt_column": c.prompt_column,
            # Only when set, so that states written before the option existed still match.
            **({"response_format": c.response_schema.digest} if c.response_schema else {}),
        }

    def _check_output_writable(self) -> None:
        """Refuse outputs that would destroy data: the input itself, or an existing file that
        batcher did not write (no state beside it) unless ``--restart`` says to replace it."""
        config = self.config
        output, source = config.output.resolve(), config.input.resolve()
        if output == source or source in output.parents:
            raise ConfigError(f"output {config.output} would overwrite the input {config.input}")
        if output.exists() and not config.state_dir.exists() and not config.restart:
            raise ConfigError(
                f"output {config.output} already exists and was not written by batcher (no "
                f"{config.state_dir.name} beside it); choose another -o, or pass --restart to "
                "replace it")
        parent = output.parent
        existing = next(p for p in [parent, *parent.parents] if p.exists() or p == p.parent)
        if not existing.is_dir():
            raise ConfigError(f"output folder {parent}: {existing} is a file, not a folder; "
                              "choose another -o")
        if existing != parent:
            if not os.access(existing, os.W_OK):
                raise ConfigError(f"output folder {parent} cannot be created: {existing} is "
                                  "not writable")
            # The folder an output (or a job file's template) names is part of the job.
            parent.mkdir(parents=True, exist_ok=True)
        if not os.access(parent, os.W_OK):
            raise ConfigError(f"output folder {parent} is not writable")

    def _warn_if_slow(self, total: int) -> None:
        """A limit that would pace the job for more than a day is most likely a typo
        (``--rpm 0.001``): say how long it would take before the first wait."""
        rpm = self.config.rpm
        if rpm is None or total <= 1:
            return
        hours = (total - 1) / rpm / 60.0
        if hours > 24:
            self._log.warning("slow_pacing", rows=total, rpm=rpm,
                              note=f"at --rpm {rpm:g}, {total:,} rows take about "
                                   f"{hours / 24:,.1f} days; is that the limit you meant?")

    def _warn_if_over_context(self, rows: list[RequestRow], request: HttpRequest) -> None:
        """Say once per model when a request's counted input exceeds the model's context
        window (when genai-prices knows it): the server will refuse or cut it. Counting is
        skipped when the body is too short to exceed it (a token is at least one byte)."""
        model = request.model
        if model is None or model in self._context_warned:
            return
        window = context_window(model)
        if window is None or len(request.body) * APPROX_FACTOR <= window:
            return
        for row in rows:
            tokens = request_input_tokens(row, self._ctx, self.config.endpoint)
            if tokens > window:
                self._context_warned.add(model)
                self._log.warning(
                    "over_context_window", where=f"{row.source}:{row.line}", model=model,
                    input_tokens=tokens, context_window=window,
                    note="the server will most likely refuse or cut this request; "
                         "later rows over the window are not named")
                return

    def _validate_strict(self, options: ReaderOptions) -> None:
        """--strict: one full pass before anything is sent; any bad row is fatal."""
        problems: list[InputProblem] = []
        for batch in iter_batches(self.config.input, options):
            problems.extend(batch.problems)
            if len(problems) >= MAX_PROBLEMS_LOGGED:
                break
        if problems:
            first = problems[0]
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise InputError(first.source, f"{first.message}{more}; --strict sends nothing "
                             "while the input has bad rows", line=first.line, field=first.field)

    # --- the pipeline ---------------------------------------------------------------------

    async def _pipeline(self, store: StateStore, options: ReaderOptions, skip: set[str]) -> None:
        config = self.config
        rows: asyncio.Queue[RequestRow | None] = asyncio.Queue(maxsize=2 * config.concurrency)
        self._throttle = Throttle(rpm=config.rpm, tpm=config.tpm, concurrency=config.concurrency)
        loop = asyncio.get_running_loop()
        self._last_success = loop.time()
        async with Transport(concurrency=config.concurrency, timeout=config.timeout) as transport:
            try:
                async with asyncio.TaskGroup() as group:
                    writer = group.create_task(self._write(store))
                    self._reader = group.create_task(self._read(rows, options, skip))
                    self._workers = [group.create_task(self._work(rows, transport))
                                     for _ in range(config.concurrency)]
                    await asyncio.gather(*self._workers, return_exceptions=True)
                    if self.stop_reason is None:
                        self._release_held()
                    self._workers_done = True
                    self._pending_event.set()
                    if self._reader is not None and not self._reader.done():
                        self._reader.cancel()
                    await writer
            except BaseExceptionGroup as group:
                # One of ours (e.g. bad input found by the reader) is reported as itself.
                leaves = _leaves(group)
                ours = [e for e in leaves if isinstance(e, BatcherError | OSError)]
                others = [e for e in leaves if isinstance(e, Exception)]
                if ours or others:
                    raise (ours or others)[0] from group
                raise
            finally:
                self._workers_done = True

    async def _read(self, rows: asyncio.Queue[RequestRow | None], options: ReaderOptions,
                    skip: set[str]) -> None:
        try:
            for batch in iter_batches(self.config.input, options, skip_ids=skip):
                for problem in batch.problems:
                    self._report_problem(problem)
                for row in batch.rows:
                    await rows.put(row)
                await asyncio.sleep(0)
        except (InputError, ConfigError) as exc:
            # Fatal input trouble found mid-file: stop like an interrupt, answers kept.
            self._input_error = exc
            self.request_stop("input")
            return
        for _ in range(self.config.concurrency):
            await rows.put(None)

    def _report_problem(self, problem: InputProblem) -> None:
        self.progress.bad_rows += 1
        if self._on_problem is not None:
            self._on_problem(problem)
        if self.progress.bad_rows <= MAX_PROBLEMS_LOGGED:
            self._log.warning("bad_row_skipped", where=f"{problem.source}:{problem.line}",
                              field=problem.field, problem=problem.message)
        elif self.progress.bad_rows == MAX_PROBLEMS_LOGGED + 1:
            self._log.warning("bad_rows_continue", note="further bad rows are only counted")

    async def _work(self, rows: asyncio.Queue[RequestRow | None], transport: Transport) -> None:
        while self.stop_reason is None:
            row = await rows.get()
            if row is None or self.stop_reason is not None:
                return
            group, rest, last = self._gather(row, rows)
            for result in await self._process(group, transport):
                self._deliver(result)
            if rest is not None and self.stop_reason is None:
                for result in await self._process([rest], transport):
                    self._deliver(result)
            if last:
                return

    def _gather(self, first: RequestRow, rows: asyncio.Queue[RequestRow | None]
                ) -> tuple[list[RequestRow], RequestRow | None, bool]:
        """More rows for one multi-input request (embeddings ``--batch-size``), taken only
        from what is already queued (never waiting) and only rows that share the first
        row's model and params. Returns (group, a row that did not fit, end-of-input seen)."""
        group = [first]
        if self._group_size <= 1 or first.prompt is None or first.shape == "batch":
            return group, None, False
        while len(group) < self._group_size:
            try:
                row = rows.get_nowait()
            except asyncio.QueueEmpty:
                break
            if row is None:
                return group, None, True
            if (row.prompt is None or row.shape == "batch" or row.model != first.model
                    or row.params != first.params):
                return group, row, False
            group.append(row)
        return group, None, False

    def _deliver(self, result: ResultRow) -> None:
        """Hand a result to the writer without awaiting: nothing can cancel it in between."""
        self._pending.append(result)
        self._pending_event.set()

    async def _write(self, store: StateStore) -> None:
        progress = self.progress
        while True:
            await self._pending_event.wait()
            self._pending_event.clear()
            batch, self._pending = self._pending, []
            if batch:
                try:
                    store.append(batch)
                except BaseException:
                    self._pending[:0] = batch  # kept for the last try in _save_pending
                    raise
                for r in batch:
                    if r.status == "ok":
                        progress.ok += 1
                    else:
                        progress.error += 1
                        self._errors_by_type[r.error_type or "error"] += 1
                    progress.spend.add_result(r.status == "ok", r.prompt_tokens,
                                              r.completion_tokens, r.cost_usd)
            if self._workers_done and not self._pending:
                return

    def _abandon_in_flight(self) -> None:
        for task in list(self._sending):
            task.cancel()

    # --- one row --------------------------------------------------------------------------

    def _price(self, model: str | None) -> Price | None:
        if model not in self._price_cache:
            c = self.config
            self._price_cache[model] = price_for(model, price_input=c.price_input,
                                                 price_output=c.price_output, table=c.prices)
        return self._price_cache[model]

    async def _process(self, rows: list[RequestRow], transport: Transport) -> list[ResultRow]:
        """The result rows for one request (one input row, or several for embeddings).
        Rows that were not finished (stop, abort, budget) get no result: not written, a
        resume sends them."""
        config, ctx = self.config, self._ctx
        row = rows[0]
        try:
            provider = provider_for_row(row, config.endpoint)
            if len(rows) > 1 and isinstance(provider, MultiInputProvider):
                request = provider.build_group_request(rows, ctx)
            else:
                request = provider.build_request(row, ctx)
        except InputError as exc:
            return [self._error_row(r, exc.detail, "input", attempts=0, status=None,
                                    latency_ms=None) for r in rows]
        self._warn_if_over_context(rows, request)
        key = self._cache_key(request)
        if key is not None:
            hit = self._cached_rows(rows, provider, request, key)
            if hit is not None:
                return hit
        need_tokens = config.tpm is not None or config.max_cost is not None
        input_tokens = max_output = 0
        if need_tokens:
            input_tokens = sum(request_input_tokens(r, ctx, config.endpoint) for r in rows)
            max_output = sum(request_max_output_tokens(r, ctx, config.endpoint) for r in rows)
        reserved = 0.0
        if config.max_cost is not None:
            price = self._price(request.model)
            if price is None:
                self._abort(BudgetExceeded(
                    f"--max-cost needs a price, and the price of model {request.model!r} is "
                    "unknown: give --price-input and --price-output (USD per 1M tokens)"))
                return []
            bound = sum(_input_token_bound(r, request.model) for r in rows)
            reserved = max_cost_usd(price, max(input_tokens, bound), max_output) or 0.0
            if not self._budget.try_reserve(reserved):
                self._abort(BudgetExceeded(
                    f"budget reached: ${self._budget.spent:.4f} spent and "
                    f"${self._budget.reserved:.4f} reserved by requests in flight, of "
                    f"--max-cost ${config.max_cost:g}; the next request could cost up to "
                    f"${reserved:.4f}. Rerun with a higher --max-cost to continue"))
                return []
        results: list[ResultRow] = []
        try:
            outcome = await self._send_with_retries(row, provider, request, transport,
                                                    input_tokens + max_output)
            if isinstance(outcome, _Sent):
                results = self._ok_rows(rows, request, outcome)
                if key is not None:
                    self._remember(key, outcome, results)
            elif isinstance(outcome, _Failed) and isinstance(outcome.error, TransportError):
                self._hold([self._error_row(r, outcome.error.message, outcome.error.kind,
                                            attempts=outcome.attempts, status=None,
                                            latency_ms=outcome.latency_ms,
                                            wait_ms=outcome.wait_ms) for r in rows])
            elif isinstance(outcome, _Failed):
                results = [self._error_row(r, outcome.error.message, outcome.error.kind,
                                           attempts=outcome.attempts,
                                           status=outcome.error.status,
                                           latency_ms=outcome.latency_ms,
                                           wait_ms=outcome.wait_ms,
                                           response=outcome.response) for r in rows]
                if isinstance(outcome.error, SchemaError | SchemaCut):
                    for r in results:  # the last answer, to see what did not fit
                        r.output, r.finish_reason = (outcome.error.output,
                                                     outcome.error.finish_reason)
                if isinstance(outcome.error, BadRequest):
                    self._refused_streak(outcome.error, results)
                    results = []
            return results
        finally:
            if config.max_cost is not None:
                self._budget.settle(reserved, self._spent_on(results, reserved))

    def _cache_key(self, request: HttpRequest) -> str | None:
        """The request's cache key, or None when there is no cache or the request may not
        use it (temperature not 0 without ``--cache-nondeterministic``)."""
        if self._cache is None:
            return None
        if not self.config.cache_nondeterministic and not is_deterministic(request):
            if not self._warned_uncacheable:
                self._warned_uncacheable = True
                self._log.warning("cache_skipped", reason="temperature is not 0 (or not set)",
                                  hint="pass -p temperature=0, or --cache-nondeterministic")
            return None
        return request_key(request)

    def _cached_rows(self, rows: list[RequestRow], provider: Provider, request: HttpRequest,
                     key: str) -> list[ResultRow] | None:
        """The result rows served from the cache (not sent; ``cost_usd`` 0, the first cost in
        ``cost_usd_original``), or None on a miss. A stored answer that no longer parses is
        dropped and counts as a miss."""
        assert self._cache is not None
        started = time.perf_counter()
        response = self._cache.get(key)
        if response is None:
            return None
        try:
            answer = provider.parse_response(request, response)
        except ProviderError:
            self._cache.forget(key)
            return None
        results = self._ok_rows(rows, request, _Sent(response, answer, 0, _ms_since(started),
                                                        None))
        for r in results:
            r.cost_usd_original, r.cost_usd, r.cached = r.cost_usd, 0.0, True
        self.progress.cache_hits += 1
        return results

    def _remember(self, key: str, sent: _Sent, results: list[ResultRow]) -> None:
        """Store an answer unless it is an error or was cut (``length``, filters)."""
        assert self._cache is not None
        if all(r.status == "ok" and r.finish_reason in CACHEABLE_FINISH for r in results):
            cost = None if any(r.cost_usd is None for r in results) else \
                sum(r.cost_usd or 0.0 for r in results)
            self._cache.put(key, sent.response, model=sent.answer.model, cost_usd=cost)
    def _hold(self, results: list[ResultRow]) -> None:
        """A row that never got an answer: not an error of the row while the server may be
        down. With no success yet this run, the server is unreachable: abort (exit 3), the
        rows stay pending for the rerun."""
        if self.stop_reason is not None:
            return
        if self._successes == 0:
            reason = results[0].error if results else "no answer"
            self._abort(ServerDown(
                f"the server looks down: cannot reach {self.config.base_url}; every request so far "
                f"failed ({reason}). Check --base-url and that the server is up, then rerun "
                "the same command to resume"))
            return
        self._held.extend(results)

    def _release_held(self) -> None:
        for result in self._held:
            self._deliver(result)
        self._held = []
        self._release_refused()

    def _refused_streak(self, error: BadRequest, results: list[ResultRow]) -> None:
        """A row refused with a client error (4xx) is held while the same error keeps
        coming and nothing succeeds; it is written once the streak breaks (a success, a
        different error, the end of the job). :data:`SAME_ERROR_ABORT` identical refusals
        in a row mean the server refuses every request ("No connected db."): the job stops
        (exit 3) with the server's message, and the held rows stay pending for the rerun."""
        if self.stop_reason is not None:
            return
        key = (error.status, error.message)
        if key != self._streak_key or self._successes != self._streak_mark:
            self._release_refused()
            self._streak_key, self._streak_mark = key, self._successes
        self._refused.extend(results)
        if len(self._refused) >= SAME_ERROR_ABORT:
            self._abort(ServerRefuses(
                f"the server refused {len(self._refused)} requests in a row with the same "
                f"error and none succeeded (HTTP {error.status}: {self._redact(error.message)}); "
                "fix the server or the request, then rerun the same command to resume"))

    def _release_refused(self) -> None:
        for result in self._refused:
            self._deliver(result)
        self._refused = []
        self._streak_key = None

    def _spent_on(self, results: list[ResultRow], reserved: float) -> float:
        """What a request cost, for the budget: an answer whose cost is unknown (no usage,
        unpriced model) counts as its whole reservation, never as $0."""
        if any(r.status == "ok" and r.cost_usd is None for r in results):
            return reserved
        return sum(r.cost_usd or 0.0 for r in results)

    async def _send_with_retries(self, row: RequestRow, provider: Provider,
                                 request: HttpRequest, transport: Transport,
                                 tokens: int) -> _Sent | _Failed | None:
        """Send until answered, a non-retryable error, ``max_attempts`` failed sends (a
        rate-limit 429 is not one) or ``max_rate_limit_wait`` seconds of 429s.

        The first attempt runs outside tenacity (the common case, and tenacity's
        bookkeeping costs about as much as our own per-row work); only after a retryable
        error does the policy take over, its first "attempt" replaying that error so that
        waits and attempt counts are tenacity's. ``latency_ms`` of the result is the last
        attempt's time on the wire; ``wait_ms`` everything before it."""
        started = time.perf_counter()
        task = asyncio.current_task()
        assert task is not None
        config = self.config
        attempts = 0
        response: HttpResponse | None = None
        first_error: Retryable | None = None
        wire: list[float] = []
        try:
            try:
                attempts = 1
                response, answer = await self._attempt(row, provider, request, transport,
                                                       tokens, task, wire)
            except Retryable as exc:
                if config.max_attempts == 1 and not isinstance(exc, RateLimited):
                    raise
                first_error = exc
            if first_error is not None:
                async for attempt in retrying(config.max_attempts, sleep=self._sleep,
                                              max_rate_limit_wait=config.max_rate_limit_wait):
                    with attempt:
                        if first_error is not None:
                            replay, first_error = first_error, None
                            raise replay
                        if self.stop_reason is not None:
                            raise _StopRequested
                        attempts += 1
                        self.progress.retries += 1
                        response, answer = await self._attempt(row, provider, request,
                                                               transport, tokens, task, wire)
        except JobFatal as exc:
            self._abort(exc)
            return None
        except _StopRequested:
            return None
        except RateLimited as exc:
            exc.message = (f"still rate limited after {config.max_rate_limit_wait:g} s of 429s "
                           f"(--max-rate-limit-wait): {exc.message}")
            return _Failed(exc, attempts, *_timing(started, wire), response)
        except ProviderError as exc:
            return _Failed(exc, attempts, *_timing(started, wire), response)
        # No await from here to delivery: a stop cannot lose an answer that was paid for.
        assert response is not None  # the successful attempt set it
        return _Sent(response, answer, attempts, *_timing(started, wire))

    async def _attempt(self, row: RequestRow, provider: Provider, request: HttpRequest,
                       transport: Transport, tokens: int, task: asyncio.Task[None],
                       wire: list[float]) -> tuple[HttpResponse, Answer]:
        """One send and parse; feeds the throttle; raises the typed error of a failure.

        Only while its request is on the wire is the task in ``_sending`` (what a stop
        grants ``grace`` to): a worker waiting for a place, a cooldown or the pacer is
        cancelled at once. Between the pacer's release and the send nothing is awaited, so
        sends keep the pacer's spacing. ``wire`` gets the send's duration (ms)."""
        throttle = self._throttle
        assert throttle is not None
        progress = self.progress
        async with throttle.slot():
            await throttle.acquire(tokens)
            if self.stop_reason is not None:
                raise _StopRequested
            self._sending.add(task)
            if not self._price_warmed and self.config.model:
                # Loading the price table takes ~0.2 s: do it in a thread while the first
                # request is on the wire, not on the loop at the first answer (and not while
                # a resume is still skipping done rows).
                self._price_warmed = True
                asyncio.get_running_loop().run_in_executor(None, genai_price, self.config.model)
            progress.in_flight += 1
            sent_at = time.perf_counter()
            try:
                response = await transport.send(request)
            except Retryable:
                self._check_server_down()
                raise
            finally:
                wire.append(_ms_since(sent_at))
                progress.in_flight -= 1
                self._sending.discard(task)
            try:
                answer = provider.parse_response(request, response)
            except (SchemaError, SchemaCut):
                # The model's answer does not fit the schema: the server is up all the same.
                self._last_answer = asyncio.get_running_loop().time()
                raise
            except RateLimited as exc:
                progress.rate_limited += 1
                wait = throttle.on_rate_limited(exc.retry_after)
                self._log.debug("rate_limited", id=row.id, cooldown_s=round(wait, 3))
                self._on_rate_limited(throttle)
                raise
            except StreamCut:
                lowered = throttle.on_stream_cut()
                if lowered is not None:
                    self._log.warning("streams_cut", concurrency=lowered,
                                      note="streams are cut while others start (a server "
                                           "that interrupts a stream for a new request): "
                                           "fewer requests in flight")
                self._check_server_down()
                raise
            except Retryable:
                self._check_server_down()
                raise
        self._last_success = asyncio.get_running_loop().time()
        self._successes += 1
        if self._held or self._refused:
            self._release_held()
        throttle.on_success(response.headers)
        throttle.settle_tokens(tokens, answer.usage.total_tokens,
                               explicit_max=request.max_tokens is not None)
        return response, answer

    def _on_rate_limited(self, throttle: Throttle) -> None:
        """A 429 is the server answering: it is not down. Say so when nothing but 429s has
        come back for the server-down time, once per such stretch."""
        now = asyncio.get_running_loop().time()
        self._last_answer = now
        quiet = now - max(self._last_success, self._warned_only_429)
        if quiet > self.config.server_down_after:
            self._warned_only_429 = now
            pacing = f"; pacing at {throttle.rpm:.1f}/min" if throttle.rpm else ""
            self._log.warning(
                "only_rate_limited", seconds=round(now - self._last_success),
                note=f"every answer for {now - self._last_success:.0f} s was 429 (rate limited)"
                     f"{pacing}: the limit is lower than the requests sent; batcher keeps "
                     f"waiting, and a row gives up after --max-rate-limit-wait "
                     f"{self.config.max_rate_limit_wait:g} s")

    async def _sleep(self, seconds: float) -> None:
        """Backoff sleep that ends early (and gives the row up) when the job stops."""
        try:
            await asyncio.wait_for(self._stop_event.wait(), timeout=seconds)
        except TimeoutError:
            return
        raise _StopRequested

    def _check_server_down(self) -> None:
        """No success (and no 429: a server that refuses is up) for ``server_down_after``
        seconds while requests fail to connect or get 5xx: abort, exit 3."""
        quiet = asyncio.get_running_loop().time() - max(self._last_success, self._last_answer)
        if quiet > self.config.server_down_after:
            self._abort(ServerDown(
                f"the server looks down: no request has succeeded for {quiet:.0f} s "
                f"(limit {self.config.server_down_after:g} s). Rerun the same command to resume"))

    def _abort(self, exc: Aborted | JobFatal) -> None:
        if isinstance(exc, ProviderError):
            message = self._redact(exc.message)
            if isinstance(exc, AuthError):
                message += (f" — check the API key in ${self.config.api_key_env} "
                            "(--api-key-env) and the base URL; rerun the same command to resume")
            elif isinstance(exc, QuotaExhausted):
                message += (" — the account has no quota or credit left; add credit or use "
                            "another key, then rerun the same command to resume")
            exc = type(exc)(message, status=exc.status)
        if self._abort_error is None:
            self._abort_error = exc
            self._log.error("aborting", reason=str(exc), error_type=exc.kind
                            if isinstance(exc, ProviderError) else type(exc).__name__)
        self.request_stop("abort")

    # --- result rows ----------------------------------------------------------------------

    def _ok_rows(self, rows: list[RequestRow], request: HttpRequest,
                 sent: _Sent) -> list[ResultRow]:
        if len(rows) == 1:
            return [self._ok_row(rows[0], request, sent, sent.answer)]
        vectors = sent.answer.embeddings or []
        if len(vectors) != len(rows):
            message = f"the server returned {len(vectors)} embeddings for {len(rows)} inputs"
            return [self._error_row(r, message, "invalid_response", attempts=sent.attempts,
                                    status=sent.response.status, latency_ms=sent.latency_ms,
                                    wait_ms=sent.wait_ms, response=sent.response) for r in rows]
        # One request's usage is shared out evenly: the server reports it only in total.
        shares = _split(sent.answer.usage.prompt_tokens, len(rows))
        return [
            self._ok_row(r, request, sent,
                         replace(sent.answer, embedding=vector, embeddings=None,
                                 usage=Usage(prompt_tokens=share, total_tokens=share)))
            for r, vector, share in zip(rows, vectors, shares, strict=True)
        ]

    def _ok_row(self, row: RequestRow, request: HttpRequest, sent: _Sent,
                answer: Answer) -> ResultRow:
        """The output row of ``answer`` (the whole answer, or one input's share of it)."""
        response, usage = sent.response, answer.usage
        # The answered model's price, else the requested one's (gateways rename models).
        cost = cost_usd(self._price(answer.model), usage) if answer.model else None
        if cost is None:
            cost = cost_usd(self._price(request.model), usage)
        return ResultRow(
            id=row.id, status="ok", output=answer.output, parsed=answer.parsed,
            finish_reason=answer.finish_reason,
            finish_reason_raw=answer.finish_reason_raw, model=answer.model,
            prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
            total_tokens=usage.total_tokens, cached_tokens=usage.cached_tokens,
            reasoning_tokens=usage.reasoning_tokens, cost_usd=cost, latency_ms=sent.latency_ms,
            wait_ms=sent.wait_ms, ttft_ms=response.ttft_ms, attempts=sent.attempts,
            http_status=response.status,
            response_id=answer.response_id, tool_calls=answer.tool_calls,
            embedding=answer.embedding,
            raw=(self._redact(response.body.decode("utf-8", "replace"))
                 if self.config.keep_raw else None),
            completed_at=_now_iso(), columns=row.columns,
        )

    def _error_row(self, row: RequestRow, message: str, kind: str, *, attempts: int,
                   status: int | None, latency_ms: float | None, wait_ms: float | None = None,
                   response: HttpResponse | None = None) -> ResultRow:
        raw = None
        if self.config.keep_raw and response is not None:
            raw = self._redact(response.body.decode("utf-8", "replace"))
        return ResultRow(
            id=row.id, status="error", error=self._redact(message), error_type=kind,
            attempts=attempts,
            http_status=status, latency_ms=latency_ms, wait_ms=wait_ms, raw=raw,
            completed_at=_now_iso(),
            columns=row.columns, model=row.model or self.config.model,
        )

    # --- summary --------------------------------------------------------------------------

    def _summary(self, outcome: str, message: str | None, started_at: str, t0: float,
                 totals: Counters) -> RunSummary:
        config, p = self.config, self.progress
        ok, error = p.ok, p.error
        if outcome == "finished" and config.output.exists():
            # The output is the truth for a finished job (earlier runs and retries included).
            statuses = pq.read_table(config.output, columns=["status"]).column("status")
            ok = sum(chunk.to_pylist().count("ok") for chunk in statuses.chunks)
            error = len(statuses) - ok
        if outcome == "aborted":
            code = EXIT_ABORTED
        elif outcome == "interrupted":
            code = EXIT_SIGTERM if self.stop_reason == "sigterm" else EXIT_SIGINT
        else:
            code = EXIT_OK if error == 0 and p.bad_rows == 0 else EXIT_FAILED_ROWS
        summary = RunSummary(
            run_id=self.run_id, job=config.job, model=config.model, input=str(config.input),
            output=str(config.output), started_at=started_at, finished_at=_now_iso(),
            duration_s=round(time.monotonic() - t0, 3), outcome=outcome, exit_code=code,
            message=message, rows=ok + error if outcome == "finished" else p.done,
            ok=ok, error=error, skipped=p.bad_rows, resumed=p.already_done,
            sent_this_run=p.ok + p.error, prompt_tokens=totals.prompt_tokens,
            completion_tokens=totals.completion_tokens, cost_usd=_usd(totals.cost_usd),
            cost_usd_this_run=_usd(p.spend.cost_usd), errors_by_type=dict(self._errors_by_type),
            cache_hits=p.cache_hits, cost_usd_known=round(totals.cost_usd_known, 6),
            rows_priced=totals.rows_priced, rows_cost_unknown=totals.rows_cost_unknown,
            prompt_tokens_known=totals.prompt_tokens_known,
            completion_tokens_known=totals.completion_tokens_known,
            rows_usage_reported=totals.rows_usage_reported,
            rows_usage_unknown=totals.rows_usage_unknown,
        )
        write_summary(config.summary_path, summary)
        return summary


def _usd(amount: float | None) -> float | None:
    return round(amount, 6) if amount is not None else None


def write_summary(path: Path, summary: RunSummary) -> None:
    """Atomically write the summary JSON (tmp + rename) so a reader never sees half of it.
    A disk too full for it costs the summary file, not the run: a warning says so."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{socket.gethostname()}.tmp")
    try:
        tmp.write_bytes(orjson.dumps(summary.to_json(), option=orjson.OPT_INDENT_2))
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        get_logger().warning("summary_not_written", path=str(path), reason=str(exc))


@dataclass(frozen=True, slots=True)
class _Sent:
    response: HttpResponse
    answer: Answer
    attempts: int
    latency_ms: float | None
    wait_ms: float | None


@dataclass(frozen=True, slots=True)
class _Failed:
    error: ProviderError
    attempts: int
    latency_ms: float | None
    wait_ms: float | None
    response: HttpResponse | None


def _split(total: int | None, parts: int) -> list[int | None]:
    """``total`` shared out as evenly as whole numbers allow (None stays None)."""
    if total is None:
        return [None] * parts
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def _input_token_bound(row: RequestRow, model: str | None) -> int:
    """For models whose tokens are only approximated, an upper bound for the budget: byte-level
    BPE tokenizers never make more tokens than the text has UTF-8 bytes."""
    if tokenizer_name(model) != "approx":
        return 0
    text = row.prompt or ""
    if row.messages is not None:
        text = orjson.dumps(row.messages).decode()
    elif row.body is not None:
        text = orjson.dumps(row.body).decode()
    return len(text.encode()) + 16


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    """The exceptions inside a (nested) exception group, depth first."""
    found: list[BaseException] = []
    for exc in group.exceptions:
        found.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return found


def _timing(started: float, wire: list[float]) -> tuple[float | None, float | None]:
    """(latency_ms, wait_ms) of a row: its last send's time on the wire, and the rest of
    the time since ``started`` (None, None when nothing was sent)."""
    if not wire:
        return None, None
    latency = wire[-1]
    return latency, round(max(0.0, _ms_since(started) - latency), 3)


def _ms_since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000.0, 3)


def request_context(config: RunConfig) -> RequestContext:
    """What every request of ``config``'s job shares; ``env:`` header values resolved.
    Refuses (ConfigError, exit 2) to go keyless to a server that is not on this machine."""
    headers = resolve_headers(config.headers)
    api_key = config.api_key()
    check_key(config.base_url, api_key, headers, config.api_key_env)
    return RequestContext(base_url=config.base_url, model=config.model, api_key=api_key,
                          system=config.system, params=dict(config.params), headers=headers,
                          response_schema=config.response_schema)


async def run_job(config: RunConfig, *, run_id: str | None = None) -> RunSummary:
    """Convenience for library users: run one job to the end and return its summary
    (``asyncio.run(run_job(make_config({...})))``). Signals are not handled here; the CLI
    adds that."""
    return await Runner(config, run_id=run_id).run()
