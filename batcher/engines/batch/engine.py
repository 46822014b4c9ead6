"""The batch engine: rows sent through a provider's Batch API at the batch price.

Per job: every row is prepared by the job (request, cache, budget: the job reserves each
row's maximum cost, so a part is submitted only once its whole maximum cost is reserved),
placed in a *part* (one provider batch; one per endpoint ``url``, split at the provider's
request and byte caps, measured on the bytes sent), and the part submitted once full. Then
every open part is polled (``--poll-interval``, default 10 s backing off to 60 s) until it
ends; its results are mapped back by ``custom_id`` and finished by the job like live answers
(the row's provider parses each line). Lines that failed retryably, expired or were
cancelled go into new parts, up to ``--max-attempts``; 4xx lines are written as errors; a
batch that failed as a whole has its rows written as errors with the provider's message.

Crash safety is the :mod:`~batcher.engines.batch.ledger`'s: a row already placed in a part
is attached to that part again on resume, never submitted again; a part with no recorded
batch id is looked up by its metadata first. ``--no-wait`` submits, collects what has
ended, and returns with the rest left pending (the run exits 75).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from batcher.config import RunConfig
from batcher.engine import Job, Prepared
from batcher.engines.batch.anthropic import AnthropicBatches
from batcher.engines.batch.client import BatchApiDown, BatchClient, StopWaiting
from batcher.engines.batch.ledger import Ledger, Placed
from batcher.engines.batch.openai import OpenAIBatches
from batcher.engines.batch.wire import BatchWire, RemoteBatch, ResultLine
from batcher.errors import (
    Aborted,
    BadRequest,
    JobFatal,
    ProviderError,
    Retryable,
    ServerError,
)
from batcher.log import get_logger
from batcher.pool import Transport
from batcher.providers.anthropic import anthropic_error
from batcher.providers.base import openai_error
from batcher.results import Failed, Sent
from batcher.types import HttpRequest, HttpResponse, RequestRow

FIRST_POLL = 10.0
"""Seconds before the first poll without ``--poll-interval``; it grows 1.5× to LAST_POLL."""
LAST_POLL = 60.0
ENDED_STATES = frozenset({"completed", "failed", "expired", "cancelled", "ended"})
"""Provider batch states (OpenAI's and Anthropic's) after which nothing changes."""
BATCH_ID_COLUMN = "batch_id"
"""The output column naming the provider batch a row's result came from."""


def wire_for(config: RunConfig) -> BatchWire:
    """The Batch API of ``config``'s endpoint (anthropic → Message Batches, else OpenAI's)."""
    return AnthropicBatches() if config.endpoint == "anthropic" else OpenAIBatches()


@dataclass(slots=True)
class _Waiting:
    prepared: Prepared
    attempt: int


@dataclass(slots=True)
class _Part:
    """A part of this run: its lines until submitted, its rows until answered."""

    endpoint: str
    number: int | None = None
    batch_id: str | None = None
    lines: list[bytes] = field(default_factory=list)
    size: int = 0
    waiting: dict[str, _Waiting] = field(default_factory=dict)


class BatchEngine:
    """See the module docstring. ``max_bytes`` overrides the wire's byte cap (tests)."""

    name = "batch"

    def __init__(self, config: RunConfig, *, max_bytes: int | None = None) -> None:
        self.config = config
        self.wire = wire_for(config)
        self.max_requests = min(config.batch_max_requests or self.wire.max_requests,
                                self.wire.max_requests)
        self.max_bytes = max_bytes or self.wire.max_bytes
        self._task: asyncio.Task[None] | None = None
        self._sending = False
        self._building: dict[str, _Part] = {}
        self._open: dict[int, _Part] = {}
        self._log = get_logger()
        self._sent_first = False
        self._retries: list[_Waiting] = []
        self._ctx = config.request_context()

    def stop(self, *, now: bool) -> int:
        if self._task is not None and (now or not self._sending):
            self._task.cancel()
        return 1 if self._sending else 0

    async def run(self, rows: asyncio.Queue[RequestRow | None], job: Job) -> None:
        config = self.config
        ledger = Ledger.open(config.state_dir, wire=self.wire.name, base_url=config.base_url,
                             api_key_env=config.api_key_env)
        ctx = self._ctx
        to_error = anthropic_error if self.wire.name == "anthropic" else openai_error
        try:
            async with Transport(concurrency=4, timeout=config.timeout) as transport:
                client = BatchClient(transport, base_url=config.base_url,
                                     headers=_auth_headers(self.wire.name, ctx.api_key,
                                                           ctx.headers),
                                     to_error=to_error, stop=job.stop)
                # Its own task, so that a stop cancels the engine's work and nothing else.
                self._task = task = asyncio.create_task(self._run(rows, job, ledger, client))
                if job.stop.is_set():
                    task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    if not task.cancelled():   # this coroutine itself is being cancelled
                        raise
        except (JobFatal, Aborted) as exc:
            job.abort(exc)
        except Retryable as exc:    # a Batch API answer that is not what it should be
            job.abort(BatchApiDown(f"the Batch API answered unexpectedly: {exc}"))
        except StopWaiting:
            pass
        finally:
            self._release(job)
            ledger.close()

    # --- the run ----------------------------------------------------------------------------

    async def _run(self, rows: asyncio.Queue[RequestRow | None], job: Job, ledger: Ledger,
                   client: BatchClient) -> None:
        placed = ledger.placements()
        ends = 0
        while ends < job.consumers:
            if job.stop.is_set():
                return
            row = await rows.get()
            if row is None:
                ends += 1
                continue
            if job.stop.is_set():
                return
            prepared = job.prepare([row])
            if prepared is None:        # the budget refused: the job is stopping
                return
            if isinstance(prepared, list):
                for result in prepared:
                    job.deliver(result)
                continue
            prepared.request = replace(prepared.request, stream=False)
            where = placed.pop(row.id, None)
            if where is not None and self._waits_on(where, ledger):
                self._attach(where, prepared, ledger)
            else:
                await self._place(prepared, (where.attempt + 1) if where else 1, job, ledger,
                                  client)
        del placed
        await self._reopen(job, ledger, client)
        await self._flush(job, ledger, client)
        await self._poll(job, ledger, client)

    def _waits_on(self, where: Placed, ledger: Ledger) -> bool:
        """Whether a row placed by an earlier run waits for that part's result: yes, unless
        the part is unknown or (``--retry-failed``: the row's error is to be sent again)
        the part had already ended."""
        record = ledger.parts.get(where.part)
        if record is None:
            return False
        return not (self.config.retry_failed and record.state in ENDED_STATES)

    def _attach(self, where: Placed, prepared: Prepared, ledger: Ledger) -> None:
        """A row placed in a part by an earlier run: it waits for that part's result."""
        part = self._open.get(where.part)
        if part is None:
            record = ledger.parts[where.part]
            part = self._open[where.part] = _Part(record.endpoint, where.part, record.batch_id)
        part.waiting[where.custom_id] = _Waiting(prepared, where.attempt)

    async def _place(self, prepared: Prepared, attempt: int, job: Job, ledger: Ledger,
                     client: BatchClient) -> None:
        """Put a row in the building part of its endpoint; submit that part when full."""
        request = self._rebuilt(prepared)
        endpoint = _endpoint(request, self.config.base_url)
        row = prepared.rows[0]
        part = self._building.get(endpoint)
        custom_id = row.id if self.wire.custom_id_ok(row.id) else ""
        if not custom_id or (part is not None and custom_id in part.waiting):
            custom_id = "g" + secrets.token_hex(8)
        line = self.wire.line(custom_id, endpoint, request)
        cost = len(line) + self.wire.overhead
        if cost > self.max_bytes:
            job.finish(prepared, Failed(BadRequest(
                f"the request is {len(line):,} bytes: more than the Batch API takes in one "
                f"batch ({self.max_bytes:,} bytes)"), attempt, None, None, None))
            return
        if part is not None and (len(part.waiting) >= self.max_requests
                                 or part.size + cost > self.max_bytes):
            del self._building[endpoint]
            await self._submit(part, job, ledger, client)
            part = None
        if part is None:
            part = self._building[endpoint] = _Part(endpoint)
        part.lines.append(line)
        part.size += cost
        # The body is in the line now; the row keeps only what parsing its answer needs.
        prepared.request = replace(request, body=b"")
        part.waiting[custom_id] = _Waiting(prepared, attempt)

    async def _flush(self, job: Job, ledger: Ledger, client: BatchClient) -> None:
        building, self._building = self._building, {}
        for part in building.values():
            await self._submit(part, job, ledger, client)

    async def _submit(self, part: _Part, job: Job, ledger: Ledger, client: BatchClient) -> None:
        """Record the part, then create its batch and record the id at once."""
        if part.number is None:
            part.number = ledger.next_part()
            ledger.record_part(part.number, part.endpoint,
                               ((cid, w.prepared.rows[0].id, w.attempt)
                                for cid, w in part.waiting.items()))
        self._open[part.number] = part
        if not self._sent_first:
            self._sent_first = True
            job.first_send()
        self._sending = True
        try:
            batch = await self.wire.submit(client, part.endpoint, part.lines,
                                           _metadata(ledger, part.number))
            ledger.record_created(part.number, batch.id)
        finally:
            self._sending = False
        part.batch_id, part.lines = batch.id, []
        job.progress.in_flight += len(part.waiting)
        self._log.info("batch_submitted", part=part.number, batch_id=batch.id,
                       requests=len(part.waiting), bytes=part.size, endpoint=part.endpoint)

    async def _reopen(self, job: Job, ledger: Ledger, client: BatchClient) -> None:
        """Parts of earlier runs with rows waiting: a part whose batch id was never written
        is looked up by its metadata, and submitted again only when the provider has none."""
        for number, part in list(self._open.items()):
            if part.batch_id is not None:
                job.progress.in_flight += len(part.waiting)
                continue
            found = await self.wire.find(client, _metadata(ledger, number))
            if found is not None:
                ledger.record_created(number, found.id)
                part.batch_id = found.id
                job.progress.in_flight += len(part.waiting)
                self._log.info("batch_found", part=number, batch_id=found.id)
                continue
            for custom_id, waiting in part.waiting.items():
                # The body was never kept for an earlier run's row: build the line again.
                part.lines.append(self.wire.line(custom_id, part.endpoint,
                                                 self._rebuilt(waiting.prepared)))
            await self._submit(part, job, ledger, client)

    def _rebuilt(self, prepared: Prepared) -> HttpRequest:
        if prepared.request.body:
            return prepared.request
        return replace(prepared.provider.build_request(prepared.rows[0], self._ctx),
                       stream=False)

    async def _poll(self, job: Job, ledger: Ledger, client: BatchClient) -> None:
        fixed = self.config.poll_interval
        interval = fixed if fixed is not None else FIRST_POLL
        while True:
            for number, part in list(self._open.items()):
                if not part.waiting:
                    del self._open[number]
                    continue
                assert part.batch_id is not None
                batch = await self.wire.get(client, part.batch_id)
                ledger.record_state(number, batch.state, dict(batch.counts))
                if batch.ended:
                    await self._collect(part, batch, job, client)
                    del self._open[number]
            retries, self._retries = self._retries, []
            for waiting in retries:
                await self._place(waiting.prepared, waiting.attempt, job, ledger, client)
            await self._flush(job, ledger, client)     # the lines sent again
            left = sum(len(p.waiting) for p in self._open.values())
            if not left:
                return
            if self.config.no_wait:
                job.leave_pending(left)
                self._log.info("batches_pending", batches=len(self._open), rows=left)
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(job.stop.wait(), interval)
            if job.stop.is_set():
                return
            if fixed is None:
                interval = min(interval * 1.5, LAST_POLL)

    async def _collect(self, part: _Part, batch: RemoteBatch, job: Job,
                       client: BatchClient) -> None:
        lines = await self.wire.results(client, batch)
        self._log.info("batch_ended", part=part.number, batch_id=batch.id, state=batch.state,
                       lines=len(lines), message=batch.message)
        for line in lines:
            waiting = part.waiting.pop(line.custom_id, None)
            if waiting is not None:
                job.progress.in_flight -= 1
                self._settle(waiting, line, batch.id, job)
        for custom_id, waiting in list(part.waiting.items()):
            del part.waiting[custom_id]
            job.progress.in_flight -= 1
            error: ProviderError
            if batch.failed:
                error = BadRequest(f"batch {batch.id} failed: {batch.message or 'no reason given'}")
            else:
                error = ServerError(f"not answered by batch {batch.id} ({batch.state})")
            self._settle(waiting, ResultLine(custom_id, None, error), batch.id, job)

    def _settle(self, waiting: _Waiting, line: ResultLine, batch_id: str, job: Job) -> None:
        """Finish one row from its result line, or place it again (a retryable error)."""
        prepared = waiting.prepared
        prepared.rows = [_with_batch_id(r, batch_id) for r in prepared.rows]
        error = line.error
        response: HttpResponse | None = line.response
        if response is not None:
            try:
                answer = prepared.provider.parse_response(prepared.request, response)
            except ProviderError as exc:
                error = exc
            else:
                job.finish(prepared, Sent(response, answer, waiting.attempt, None, None))
                return
        assert error is not None
        if isinstance(error, Retryable) and waiting.attempt < self.config.max_attempts:
            job.progress.retries += 1
            self._retries.append(_Waiting(prepared, waiting.attempt + 1))
            return
        job.finish(prepared, Failed(error, waiting.attempt, None, None, response))

    def _release(self, job: Job) -> None:
        """Rows not answered when the engine ends stay pending; their reservations go."""
        for part in [*self._open.values(), *self._building.values()]:
            for waiting in part.waiting.values():
                job.finish(waiting.prepared, None)
            part.waiting.clear()
        self._open, self._building = {}, {}


def _with_batch_id(row: RequestRow, batch_id: str) -> RequestRow:
    return replace(row, columns={**row.columns, BATCH_ID_COLUMN: batch_id})


def _metadata(ledger: Ledger, part: int) -> dict[str, str]:
    """What names a part at the provider: the output's key and the part number."""
    return {"batcher_job": ledger.key, "batcher_part": str(part)}


def _endpoint(request: HttpRequest, base_url: str) -> str:
    """The version-prefixed path a Batch API line names: ``/v1/chat/completions``."""
    base = base_url.rstrip("/")
    path = request.url[len(base):] if request.url.startswith(base) else request.url
    path = "/" + path.lstrip("/")
    return path if path.startswith("/v1/") else "/v1" + path


def _auth_headers(wire: str, api_key: str, extra: Mapping[str, str]) -> dict[str, str]:
    from batcher.providers.anthropic import ANTHROPIC_VERSION
    from batcher.providers.base import merge_headers

    headers: dict[str, str] = {}
    if wire == "anthropic":
        headers["anthropic-version"] = ANTHROPIC_VERSION
        if api_key:
            headers["x-api-key"] = api_key
    elif api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return merge_headers(headers, extra)
