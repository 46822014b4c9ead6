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
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import replace

import orjson
import pyarrow.parquet as pq

from batcher.cache import CACHEABLE_FINISH, ResponseCache, is_deterministic, request_key
from batcher.checkpoint import Counters, StateStore, ensure_output_folder, input_fingerprint
from batcher.config import RunConfig
from batcher.engine import Engine, Prepared
from batcher.engines import get_engine
from batcher.errors import (
    Aborted,
    AuthError,
    BadRequest,
    BatcherError,
    BudgetExceeded,
    ConfigError,
    ExitCode,
    InputError,
    JobFatal,
    ProviderError,
    QuotaExhausted,
    SchemaCut,
    SchemaError,
    ServerDown,
    ServerRefuses,
    TransportError,
)
from batcher.io.flatten import flat_fields
from batcher.io.idindex import (
    SMALL_PLAN_ROWS,
    RowPlan,
    build_plan,
    input_plan_key,
    load_input_plan,
    plan_from_ordinals,
    plan_without_results,
    save_input_plan,
)
from batcher.io.location import InputLocation
from batcher.io.readers import (
    InputProblem,
    ReaderOptions,
    count_rows,
    iter_batches,
    iter_row_ids,
)
from batcher.io.writer import (
    NoOrdinals,
    iter_id_status,
    iter_ordinal_status,
    release_memory,
    warm_up_arrow,
)
from batcher.log import get_logger
from batcher.pricing import (
    Budget,
    Price,
    batch_price,
    context_window,
    genai_price,
    load_table,
    max_cost_usd,
    price_for,
    table_loaded,
)
from batcher.providers import Provider, get_provider, provider_for_row
from batcher.providers.base import MultiInputProvider
from batcher.resources import explain_os_error, fit_open_files
from batcher.results import Failed, RowBuilder, Sent, now_iso
from batcher.secrets import redactor
from batcher.summary import Progress, RunSummary, usd, write_summary
from batcher.tokens import (
    APPROX_FACTOR,
    request_input_tokens,
    request_max_output_tokens,
    tokenizer_name,
)
from batcher.types import (
    JSON,
    HttpRequest,
    RequestRow,
    ResultRow,
)

MAX_PROBLEMS_LOGGED = 20
"""Bad rows logged one by one; beyond this only counted (the summary has the total)."""
SAME_ERROR_ABORT = 20
"""Consecutive rows refused with the same client error, and no success, that stop the job."""
INPUT_PLAN = "input-plan.arrow"
"""In the state folder: what the first pass over the input's ids found (its rows and
duplicates), for resuming by ordinals (see :meth:`Runner._plan`)."""



class Runner:
    """Runs one job described by a :class:`RunConfig`. Usable from Python::

        summary = asyncio.run(Runner(config).run())

    ``request_stop(reason)`` may be called from a signal handler; a second call abandons
    in-flight requests at once (state stays consistent; they are re-sent on resume).
    """

    def __init__(self, config: RunConfig, *, run_id: str | None = None,
                 on_problem: Callable[[InputProblem], None] | None = None,
                 command: Sequence[str] | None = None) -> None:
        self.config = config
        self.command = list(command) if command is not None else None
        """The command line that started the run (secret headers masked), kept in the
        state's meta.json with its working folder: ``batcher cancel`` runs it again."""
        self.run_id = run_id or uuid.uuid4().hex[:12]
        self.progress = Progress()
        self.stop_reason: str | None = None
        self._abort_error: Aborted | JobFatal | None = None
        self._input_error: InputError | ConfigError | None = None
        self._on_problem = on_problem
        self._log = get_logger()
        self.stop = asyncio.Event()
        self._pending: list[ResultRow] = []
        self._pending_event = asyncio.Event()
        self._workers_done = False
        self._reader: asyncio.Task[None] | None = None
        self._errors_by_type: Counter[str] = Counter()
        self._held: list[ResultRow] = []
        """Rows that failed to reach the server: written once a later request succeeds (the
        failure was theirs), left pending if the job aborts first (the server was down)."""
        self._refused: list[ResultRow] = []
        """Rows refused with the same client error, no success between (see _refused_streak)."""
        self._streak_key: tuple[int | None, str] | None = None
        self._streak_mark = 0
        self._successes = 0
        self._engine: Engine | None = None
        self._input = InputLocation(config.input)
        """The input, with the engine's scan once the engine is made."""
        self._left_pending = 0
        """Rows the engine left pending at the provider (batch mode ``--no-wait``)."""
        self.consumers = config.concurrency
        """Engine workers reading the row queue (one end marker each)."""
        self._price_cache: dict[str | None, Price | None] = {}
        self._budget = Budget(config.max_cost)
        self._cache: ResponseCache | None = None
        self._warned_uncacheable = False
        self._context_warned: set[str] = set()
        self._warming: threading.Thread | None = None
        """Imports what Arrow needs while the first requests are out (see :meth:`_plan`)."""
        self._unchecked: list[tuple[list[RequestRow], HttpRequest]] = []
        """Requests sent before the price table (and so the context windows) was loaded."""
        self._table: asyncio.Future[None] | None = None
        self._ctx = config.request_context()
        self._redact = redactor(self._ctx.api_key, self._ctx.headers)
        """The text with the API key and secret header values masked."""
        self._rows = RowBuilder(price_of=self._price, redact=self._redact,
                                keep_raw=config.keep_raw, default_model=config.model)

    # --- public ---------------------------------------------------------------------------

    def request_stop(self, reason: str) -> None:
        """Stop dispatching; in-flight requests finish within ``grace`` seconds. Called a
        second time (a second Ctrl-C), in-flight requests are abandoned at once."""
        if self.stop_reason is not None:
            if reason in ("sigint", "sigterm"):
                self._log.warning("stopping_now", reason=reason)
                self._abandon_in_flight()
            return
        self.stop_reason = reason
        self.stop.set()
        if self._reader is not None:
            self._reader.cancel()
        # Work not on the wire ends now; requests on the wire get `grace` seconds.
        in_flight = self._engine.stop(now=False) if self._engine is not None else 0
        if reason in ("sigint", "sigterm"):
            self._log.warning("stopping", reason=reason, grace_s=self.config.grace,
                              in_flight=in_flight)
        loop = asyncio.get_running_loop()
        loop.call_later(self.config.grace, self._abandon_in_flight)

    async def run(self) -> RunSummary:
        try:
            return await self._run()
        finally:
            if self._input.scan is not None:
                self._input.scan.close()

    async def _run(self) -> RunSummary:
        started_at, t0 = now_iso(), time.monotonic()
        get_provider(self.config.endpoint)
        pool, warning = fit_open_files(self.config.concurrency)
        if warning is not None:
            self._log.warning("concurrency_capped", reason=warning)
            self.config = replace(self.config, concurrency=pool)
            self.consumers = pool
        config = self.config
        # Before the state is opened: an engine that cannot run here (Ray not installed)
        # is a usage error (exit 2) that leaves no trace.
        self._engine = get_engine(config)
        self._input.scan = getattr(self._engine, "scan", None)   # optional (see engine.py)
        options = config.reader_options()
        total = count_rows(self._input)
        self._warn_if_slow(total)
        iter_batches(self._input, options)  # checks the file and options up front (exit 2)
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
            plan = self._plan(store, options, fingerprint, total)
            release_memory()  # the plan's working memory: not kept through the run
            # The cap is for the output, not for one run: earlier runs' spend counts.
            self._budget.spent = store.spend.cost_usd_known
            self.progress.total = total
            self.progress.already_done = plan.done
            started: dict[str, JSON] = {"status": "running", "total_rows": total,
                                        "started_at": started_at}
            if self.command is not None:
                started.update(command=list(self.command), cwd=os.getcwd())
            store.update_meta(**started)
            self._log.info("run_started", input=str(config.input), output=str(config.output),
                           rows=total, already_done=plan.done, endpoint=config.endpoint,
                           model=config.model, concurrency=config.concurrency)
            try:
                await self._pipeline(store, options, plan)
            except OSError as exc:
                explained = explain_os_error(exc, config.output, config.state_dir)
                if explained is None:
                    raise
                self.abort(explained)
            if self._input_error is not None:
                store.update_meta(status="input_error")
                raise self._input_error
            if self._abort_error is not None:
                outcome, message = "aborted", str(self._abort_error)
            elif self.stop_reason is not None:
                outcome = "interrupted"
            elif self._left_pending:
                outcome = "pending"
                message = (f"{self._left_pending:,} rows are still with the provider's Batch "
                           "API; run the same command again to collect them")
            meta: dict[str, JSON] = {"status": outcome, "bad_rows": self.progress.bad_rows}
            if outcome == "finished":
                # Now known: rows that can be answered (bad input rows are not pending).
                meta["total_rows"] = total - self.progress.bad_rows
            try:
                store.update_meta(**meta)
                if outcome == "finished":
                    schema = config.response_schema
                    ordered = config.order == "input"
                    store.finalize(flat_fields(schema.schema)
                                   if config.flatten and schema is not None else (),
                                   input_ids=iter_row_ids(self._input, options)
                                   if ordered else None, input_rows=total)
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
            if self._warming is not None and self._warming.ident is not None:
                self._warming.join()  # no thread left importing as the process exits
            if self._cache is not None:
                self._cache.close()
            try:
                store.close()
            except OSError as exc:
                # The journal stays; the next open compacts it.
                self._log.warning("state_close_failed", reason=str(exc))

    # --- setup ----------------------------------------------------------------------------

    def _plan(self, store: StateStore, options: ReaderOptions, fingerprint: dict[str, JSON],
              total: int) -> RowPlan:
        """Which rows are done and which are duplicates.

        Resuming an input this state has read before (what it learnt of the input is kept in
        :data:`INPUT_PLAN`), the rows done are told by the input ordinals their results carry:
        no pass over the input. Otherwise (the first run, results from before a
        ``--force-resume`` or without ordinals): one pass over the input's ids and the
        state's, spilled beside the state (nothing kept per row), and what it learnt of the
        input is kept for the next resume. A first run of a small input
        (:data:`~batcher.io.idindex.SMALL_PLAN_ROWS`) does that pass in Python, without Arrow
        (see :func:`~batcher.io.idindex.plan_without_results`)."""
        config = self.config
        kept = store.state_dir / INPUT_PLAN
        key = input_plan_key(fingerprint)
        sources = store.result_sources()
        if not store.meta.get("force_resumed_at"):
            known = load_input_plan(kept, key)
            if known is not None:
                try:
                    plan = plan_from_ordinals(known, (iter_ordinal_status(p) for p in sources),
                                              ok_only=config.retry_failed)
                except NoOrdinals:
                    plan = None
                if plan is not None:
                    self._log.debug("resume_by_ordinals", done=plan.done)
                    return plan
        if not sources and total <= SMALL_PLAN_ROWS:
            # A small first run: the plan without Arrow, so that pandas is imported later,
            # while the first requests are out (see _warm_up_arrow).
            plan = plan_without_results(iter_row_ids(self._input, options))
            self._warming = threading.Thread(target=warm_up_arrow, name="batcher-warm-up",
                                             daemon=True)
            save_input_plan(kept, key, plan)
            return plan
        plan = build_plan(iter_row_ids(self._input, options),
                          (iter_id_status(p) for p in sources),
                          rows_hint=total + store.result_rows(), ok_only=config.retry_failed,
                          folder=config.state_dir)
        save_input_plan(kept, key, plan)
        return plan

    def _fingerprint(self) -> dict[str, JSON]:
        c = self.config
        return {
            "input": input_fingerprint(self._input), "endpoint": c.endpoint, "model": c.model,
            "params": dict(sorted(c.params.items())), "template": c.template,
            "system": c.system, "id_column": c.id_column, "prompt_column": c.prompt_column,
            # Only when set, so that states written before the option existed still match.
            **({"response_format": c.response_schema.digest} if c.response_schema else {}),
            # Live and batch runs of one output must not mix: a batch's rows may be paid for
            # at the provider while no result is here yet.
            **({"mode": c.mode} if c.mode != "live" else {}),
        }

    def _check_output_writable(self) -> None:
        """Refuse outputs that would destroy data: the input itself, or an existing file that
        batcher did not write (no state beside it) unless ``--restart`` says to replace it."""
        config = self.config
        output = config.output.resolve()
        source = None if isinstance(config.input, str) else config.input.resolve()
        if source is not None and (output == source or source in output.parents):
            raise ConfigError(f"output {config.output} would overwrite the input {config.input}")
        if output.exists() and not config.state_dir.exists() and not config.restart:
            raise ConfigError(
                f"output {config.output} already exists and was not written by batcher (no "
                f"{config.state_dir.name} beside it); choose another -o, or pass --restart to "
                "replace it")
        ensure_output_folder(config.output)

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
        if not table_loaded() and (self._table is None or not self._table.done()):
            # The first requests need not wait for the table (~0.3 s): it loads in a thread,
            # and the requests sent meanwhile are checked once it is there. (Should loading
            # fail, the next check loads it here and fails as it always did.)
            self._unchecked.append((rows, request))
            if self._table is None:
                self._table = asyncio.get_running_loop().run_in_executor(None, load_table)
                self._table.add_done_callback(self._check_unchecked)
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

    def _check_unchecked(self, loaded: asyncio.Future[None]) -> None:
        """The context checks held while the price table loaded (dropped if it failed)."""
        held, self._unchecked = self._unchecked, []
        if loaded.cancelled() or loaded.exception() is not None:
            return
        for rows, request in held:
            self._warn_if_over_context(rows, request)

    def _validate_strict(self, options: ReaderOptions) -> None:
        """--strict: one full pass before anything is sent; any bad row is fatal."""
        problems: list[InputProblem] = []
        for batch in iter_batches(self._input, options):
            problems.extend(batch.problems)
            if len(problems) >= MAX_PROBLEMS_LOGGED:
                break
        if problems:
            first = problems[0]
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise InputError(first.source, f"{first.message}{more}; --strict sends nothing "
                             "while the input has bad rows", line=first.line, field=first.field)

    # --- the pipeline ---------------------------------------------------------------------

    async def _pipeline(self, store: StateStore, options: ReaderOptions, plan: RowPlan) -> None:
        config = self.config
        rows: asyncio.Queue[RequestRow | None] = asyncio.Queue(maxsize=2 * config.concurrency)
        engine = self._engine
        assert engine is not None   # made in run()
        try:
            async with asyncio.TaskGroup() as group:
                writer = group.create_task(self._write(store))
                self._reader = group.create_task(self._read(rows, options, plan))
                await engine.run(rows, self)
                if self._table is not None:
                    await asyncio.wait([self._table])   # the held context checks are done
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
                    plan: RowPlan) -> None:
        try:
            for batch in iter_batches(self._input, options, plan=plan):
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
        for _ in range(self.consumers):
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

    def deliver(self, result: ResultRow) -> None:
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
        if self._engine is not None:
            self._engine.stop(now=True)

    # --- one row --------------------------------------------------------------------------

    def _price(self, model: str | None) -> Price | None:
        if model not in self._price_cache:
            c = self.config
            price = price_for(model, price_input=c.price_input,
                              price_output=c.price_output, table=c.prices)
            self._price_cache[model] = batch_price(price) if c.mode == "batch" else price
        return self._price_cache[model]

    def prepare(self, rows: list[RequestRow]) -> Prepared | list[ResultRow] | None:
        """One request for ``rows`` (one input row, or several for embeddings), checked by
        the budget gate; or the rows' results already (an input error, a cache hit); or
        None when the budget refused it (the job is stopping; the rows stay pending)."""
        config, ctx = self.config, self._ctx
        row = rows[0]
        try:
            provider = provider_for_row(row, config.endpoint)
            if len(rows) > 1 and isinstance(provider, MultiInputProvider):
                request = provider.build_group_request(rows, ctx)
            else:
                request = provider.build_request(row, ctx)
        except InputError as exc:
            return [self._rows.error_row(r, exc.detail, "input", attempts=0, status=None,
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
                self.abort(BudgetExceeded(
                    f"--max-cost needs a price, and the price of model {request.model!r} is "
                    "unknown: give --price-input and --price-output (USD per 1M tokens)"))
                return None
            bound = sum(_input_token_bound(r, request.model) for r in rows)
            reserved = max_cost_usd(price, max(input_tokens, bound), max_output) or 0.0
            if not self._budget.try_reserve(reserved):
                self.abort(BudgetExceeded(
                    f"budget reached: ${self._budget.spent:.4f} spent and "
                    f"${self._budget.reserved:.4f} reserved by requests in flight, of "
                    f"--max-cost ${config.max_cost:g}; the next request could cost up to "
                    f"${reserved:.4f}. Rerun with a higher --max-cost to continue"))
                return None
        return Prepared(rows, provider, request, input_tokens + max_output, reserved, key)

    def finish(self, prepared: Prepared, outcome: Sent | Failed | None) -> None:
        """Turn what the engine got for ``prepared`` into result rows, delivered or held,
        and settle the budget. ``outcome`` None: abandoned, the rows stay pending."""
        rows, request = prepared.rows, prepared.request
        results: list[ResultRow] = []
        try:
            if isinstance(outcome, Sent):
                self._successes += 1
                if self._held or self._refused:
                    self._release_held()
                results = self._rows.ok_rows(rows, request, outcome)
                if prepared.cache_key is not None:
                    self._remember(prepared.cache_key, outcome, results)
            elif isinstance(outcome, Failed) and isinstance(outcome.error, TransportError):
                self._hold([self._rows.error_row(r, outcome.error.message, outcome.error.kind,
                                                 attempts=outcome.attempts, status=None,
                                                 latency_ms=outcome.latency_ms,
                                                 wait_ms=outcome.wait_ms) for r in rows])
            elif isinstance(outcome, Failed):
                results = [self._rows.error_row(r, outcome.error.message, outcome.error.kind,
                                                attempts=outcome.attempts,
                                                status=outcome.error.status,
                                                latency_ms=outcome.latency_ms,
                                                wait_ms=outcome.wait_ms,
                                                response=outcome.response) for r in rows]
                if isinstance(outcome.error, SchemaError | SchemaCut):
                    for r in results:  # the last answer, to see what did not fit
                        r.output, r.finish_reason = (outcome.error.output,
                                                     outcome.error.finish_reason)
                # A Batch API's 4xx lines are each their own row's fault (the batch itself
                # was accepted): written at once, never taken for a server refusing all.
                if isinstance(outcome.error, BadRequest) and self.config.mode == "live":
                    self._refused_streak(outcome.error, results)
                    results = []
            for result in results:
                self.deliver(result)
        finally:
            if self.config.max_cost is not None:
                self._budget.settle(prepared.reserved,
                                    self._spent_on(results, prepared.reserved))

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
        results = self._rows.ok_rows(rows, request, Sent(response, answer, 0, _ms_since(started),
                                                        None))
        for r in results:
            r.cost_usd_original, r.cost_usd, r.cached = r.cost_usd, 0.0, True
        self.progress.cache_hits += 1
        return results

    def _remember(self, key: str, sent: Sent, results: list[ResultRow]) -> None:
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
            self.abort(ServerDown(
                f"the server looks down: cannot reach {self.config.base_url}; every request so far "
                f"failed ({reason}). Check --base-url and that the server is up, then rerun "
                "the same command to resume"))
            return
        self._held.extend(results)

    def leave_pending(self, rows: int) -> None:
        """The engine ends with ``rows`` rows still being answered elsewhere (a provider
        batch): the run ends ``pending`` (exit 75) unless it aborted or was stopped."""
        self._left_pending += rows

    def first_send(self) -> None:
        """Load the price table in a thread while the first request is on the wire (~0.2 s),
        not on the loop at the first answer (nor while a resume still skips done rows).
        Then warm Arrow up (see :meth:`_warm_up_arrow`)."""
        if self.config.model:
            loaded = asyncio.get_running_loop().run_in_executor(None, genai_price,
                                                                self.config.model)
            loaded.add_done_callback(self._warm_up_arrow)
        else:
            self._warm_up_arrow(None)

    def _warm_up_arrow(self, _: object) -> None:
        """After a small first run's plan (:meth:`_plan`), import what Arrow's conversions
        need (pandas, ~0.3 s of CPU; the journal's parts and the output need it) in a thread,
        once the price table is loaded: the first answer waits for that table, and two
        threads importing at once would make it wait for both (an import waits for the
        modules another thread is importing)."""
        warming = self._warming
        if warming is not None and warming.ident is None and not self._workers_done:
            warming.start()

    def _release_held(self) -> None:
        for result in self._held:
            self.deliver(result)
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
            self.abort(ServerRefuses(
                f"the server refused {len(self._refused)} requests in a row with the same "
                f"error and none succeeded (HTTP {error.status}: {self._redact(error.message)}); "
                "fix the server or the request, then rerun the same command to resume"))

    def _release_refused(self) -> None:
        for result in self._refused:
            self.deliver(result)
        self._refused = []
        self._streak_key = None

    def _spent_on(self, results: list[ResultRow], reserved: float) -> float:
        """What a request cost, for the budget: an answer whose cost is unknown (no usage,
        unpriced model) counts as its whole reservation, never as $0."""
        if any(r.status == "ok" and r.cost_usd is None for r in results):
            return reserved
        return sum(r.cost_usd or 0.0 for r in results)

    def abort(self, exc: Aborted | JobFatal) -> None:
        """End the job (exit 3) with ``exc``, kept as the reason; the first one wins."""
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
            code = ExitCode.ABORTED
        elif outcome == "interrupted":
            code = ExitCode.SIGTERM if self.stop_reason == "sigterm" else ExitCode.SIGINT
        elif outcome == "pending":
            code = ExitCode.PENDING
        else:
            code = ExitCode.OK if error == 0 and p.bad_rows == 0 else ExitCode.FAILED_ROWS
        summary = RunSummary(
            run_id=self.run_id, job=config.job, model=config.model, input=str(config.input),
            output=str(config.output), started_at=started_at, finished_at=now_iso(),
            duration_s=round(time.monotonic() - t0, 3), outcome=outcome, exit_code=int(code),
            message=message, rows=ok + error if outcome == "finished" else p.done,
            ok=ok, error=error, skipped=p.bad_rows, resumed=p.already_done,
            sent_this_run=p.ok + p.error - p.cache_hits, prompt_tokens=totals.prompt_tokens,
            completion_tokens=totals.completion_tokens, cost_usd=usd(totals.cost_usd),
            cost_usd_this_run=usd(p.spend.cost_usd), errors_by_type=dict(self._errors_by_type),
            cache_hits=p.cache_hits, cost_usd_known=round(totals.cost_usd_known, 6),
            rows_priced=totals.rows_priced, rows_cost_unknown=totals.rows_cost_unknown,
            prompt_tokens_known=totals.prompt_tokens_known,
            completion_tokens_known=totals.completion_tokens_known,
            rows_usage_reported=totals.rows_usage_reported,
            rows_usage_unknown=totals.rows_usage_unknown,
        )
        write_summary(config.summary_path, summary)
        return summary


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


def _ms_since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000.0, 3)


async def run_job(config: RunConfig, *, run_id: str | None = None) -> RunSummary:
    """Convenience for library users: run one job to the end and return its summary
    (``asyncio.run(run_job(make_config({...})))``). Signals are not handled here; the CLI
    adds that."""
    return await Runner(config, run_id=run_id).run()
