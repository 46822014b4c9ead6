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

Memory: a part being built holds its request lines (what is uploaded); everything else a
row's result needs is streamed to the part's files in the ledger and read back, one row at a
time, when the part ends. A resumed run also keeps, per part, the custom_ids still pending.

Crash safety is the :mod:`~batcher.engines.batch.ledger`'s: a row already placed in a part
is attached to that part again on resume, never submitted again; a part with no recorded
batch id is looked up by its metadata first. ``--no-wait`` submits, collects what has
ended, and returns with the rest left pending (the run exits 75).

``batcher cancel`` runs the output's own command again with ``cancelling`` set: nothing new
is submitted; every running batch is asked to cancel and waited for; what the batches answered
is written as usual, and every other row (cancelled, failed retryably, never submitted) as an
error of type ``cancelled``, so the output is complete and ``--retry-failed`` sends the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime

import orjson

from batcher.config import RunConfig
from batcher.engine import Job, Prepared, prepared_to_send
from batcher.engines.batch.anthropic import AnthropicBatches
from batcher.engines.batch.client import BatchApiDown, BatchClient, StopWaiting
from batcher.engines.batch.ledger import Ledger, PartWriter, Placed, Slot
from batcher.engines.batch.openai import OpenAIBatches
from batcher.engines.batch.wire import BatchWire, Lookup, RemoteBatch, ResultLine
from batcher.errors import (
    Aborted,
    BadRequest,
    Cancelled,
    JobFatal,
    ProviderError,
    Retryable,
    ServerError,
)
from batcher.log import get_logger
from batcher.pool import Transport
from batcher.providers import BATCH_URLS, Provider, get_provider
from batcher.providers.anthropic import anthropic_error
from batcher.providers.base import openai_error
from batcher.results import Failed, Sent
from batcher.schema import ResponseSchema
from batcher.types import HttpRequest, RequestRow

FIRST_POLL = 10.0
"""Seconds before the first poll without ``--poll-interval``; it grows 1.5× to LAST_POLL."""
LAST_POLL = 60.0
ENDED_STATES = frozenset({"completed", "failed", "expired", "cancelled", "ended"})
"""Provider batch states (OpenAI's and Anthropic's) after which nothing changes."""
BATCH_ID_COLUMN = "batch_id"
"""The output column naming the provider batch a row's result came from."""
YIELD_EVERY = 1000
"""Rows finished between two turns given to the writer while a part is collected."""
CANCELLED = "cancelled (batcher cancel) "
"""How a cancelled row's error begins; ``--retry-failed`` sends it again."""


def poll_intervals(fixed: float | None) -> Iterator[float]:
    """Seconds between polls: ``fixed`` (``--poll-interval``) every time, else FIRST_POLL
    growing 1.5× per poll up to LAST_POLL (batches take minutes to hours: polling fast at
    first catches small ones, and slowing down spares the provider's rate limit)."""
    interval = fixed if fixed is not None else FIRST_POLL
    while True:
        yield interval
        if fixed is None:
            interval = min(interval * 1.5, LAST_POLL)


def wire_for(config: RunConfig) -> BatchWire:
    """The Batch API of ``config``'s endpoint (anthropic → Message Batches, else OpenAI's)."""
    return AnthropicBatches() if config.endpoint == "anthropic" else OpenAIBatches()


@dataclass(slots=True)
class _Part:
    """One part of this run. ``lines`` until submitted; ``pending`` is None when every row
    of the part's files waits for its result (a part this run built), else the custom_ids
    that do (a part of an earlier run: the rows this run still has), with their reservation."""

    endpoint: str
    number: int
    batch_id: str | None = None
    writer: PartWriter | None = None
    lines: list[bytes] = field(default_factory=list)
    size: int = 0
    ids: set[str] = field(default_factory=set)
    pending: dict[str, float] | None = None
    rows: int = 0
    """Rows of the part waiting for their result."""
    reserved: float = 0.0
    """Budget reserved by those rows (a part this run built; else ``pending`` has it)."""


class BatchEngine:
    """See the module docstring."""

    name = "batch"

    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self.wire = wire_for(config)
        self.max_requests = min(config.batch_max_requests or self.wire.max_requests,
                                self.wire.max_requests)
        self._task: asyncio.Task[None] | None = None
        self._sending = False
        self._building: dict[str, _Part] = {}
        self._open: dict[int, _Part] = {}
        self._retries: list[tuple[str, Slot]] = []
        self._next_part = 0
        self._log = get_logger()
        self._sent_first = False
        self._ctx = config.request_context()
        self._schema = config.response_schema
        self._client: BatchClient | None = None
        self._cancelled: set[int] = set()
        """``batcher cancel``: the parts whose batch this run asked to cancel."""
        self._key = ""
        """The output's key (the ledger's), from which custom_ids may be derived."""

    def stop(self, *, now: bool) -> int:
        if self._task is not None and (now or not self._sending):
            self._task.cancel()
        return 1 if self._sending else 0

    async def run(self, rows: asyncio.Queue[RequestRow | None], job: Job) -> None:
        config, ctx = self.config, self._ctx
        ledger = Ledger.open(config.state_dir, wire=self.wire.name, base_url=config.base_url,
                             api_key_env=config.api_key_env)
        self._next_part = ledger.next_part()
        to_error = anthropic_error if self.wire.name == "anthropic" else openai_error
        try:
            async with Transport(concurrency=4, timeout=config.timeout) as transport:
                client = BatchClient(transport, base_url=config.base_url,
                                     headers=_auth_headers(self.wire.name, ctx.api_key,
                                                           ctx.headers),
                                     to_error=to_error, stop=job.stop)
                self._client = client
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
        except ProviderError as exc:  # a 4xx on a create, a poll or a download
            job.abort(Aborted(f"the Batch API refused a call ({exc}); the batches already "
                              "submitted are kept: rerun the same command to resume"))
        except StopWaiting:
            pass
        finally:
            self._release(job)
            ledger.close()

    # --- reading and placing ----------------------------------------------------------------

    async def _run(self, rows: asyncio.Queue[RequestRow | None], job: Job, ledger: Ledger,
                   client: BatchClient) -> None:
        self._key = key = ledger.key
        placed = ledger.placements(lambda row_id: self.wire.custom_id(row_id, key))
        ends = 0
        while ends < job.consumers:
            if job.stop.is_set():
                return
            row = await rows.get()
            if row is None:
                ends += 1
                continue
            prepared = prepared_to_send(job, [row])
            if prepared is None:        # delivered already, or refused (the job stops)
                continue
            where = placed.pop(row.id, None)
            if where is not None and self._waits_on(where, ledger):
                self._attach(where, where.custom_id or self.wire.custom_id(row.id, key) or row.id,
                             prepared.reserved, ledger)
                continue
            if self.config.cancelling:       # nothing new is submitted
                job.finish(prepared, Failed(Cancelled(CANCELLED + "before it was submitted"),
                                            where.attempt if where else 0, None, None, None))
                continue
            slot = self._slot(prepared, (where.attempt + 1) if where else 1, job)
            if slot is not None:
                await self._place(_endpoint(prepared.request, self.config.base_url), slot,
                                  job, ledger, client)
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

    def _attach(self, where: Placed, custom_id: str, reserved: float, ledger: Ledger) -> None:
        """A row placed in a part by an earlier run: it waits for that part's result."""
        part = self._open.get(where.part)
        if part is None:
            record = ledger.parts[where.part]
            part = self._open[where.part] = _Part(record.endpoint, where.part, record.batch_id,
                                                  pending={})
        assert part.pending is not None
        part.pending[custom_id] = reserved
        part.rows += 1

    def _slot(self, prepared: Prepared, attempt: int, job: Job) -> Slot | None:
        """The row's slot, its request line included; None (the row written as an error)
        when the line alone is over the provider's size cap."""
        row, request = prepared.rows[0], prepared.request
        endpoint = _endpoint(request, self.config.base_url)
        custom_id = self.wire.custom_id(row.id, self._key) or "g" + secrets.token_hex(8)
        line = self.wire.line(custom_id, endpoint, request)
        if len(line) + self.wire.overhead > self.wire.max_bytes:
            job.finish(prepared, Failed(BadRequest(
                f"the request is {len(line):,} bytes: more than the Batch API takes in one "
                f"batch ({self.wire.max_bytes:,} bytes)"), attempt, None, None, None))
            return None
        return Slot(custom_id, row.id, attempt, prepared.reserved, request.model, row.model,
                    row.source, row.line, dict(row.columns), line, prepared.cache_key,
                    row.ordinal)

    async def _place(self, endpoint: str, slot: Slot, job: Job, ledger: Ledger,
                     client: BatchClient) -> None:
        """Put a slot in the building part of its endpoint; submit that part when full."""
        cost = len(slot.line) + self.wire.overhead
        part = self._building.get(endpoint)
        if part is not None and (part.rows >= self.max_requests
                                 or part.size + cost > self.wire.max_bytes):
            del self._building[endpoint]
            await self._submit(part, job, ledger, client)
            part = None
        if part is None:
            part = self._building[endpoint] = _Part(endpoint, self._next_part)
            self._next_part += 1
            part.writer = ledger.part_writer(part.number)
        if slot.custom_id in part.ids:   # a generated id met a row's own (or one another)
            slot = _relabel(slot, "g" + secrets.token_hex(8))
        part.ids.add(slot.custom_id)
        assert part.writer is not None
        part.writer.add(slot)
        part.lines.append(slot.line)
        part.size += cost
        part.rows += 1
        part.reserved += slot.reserved

    async def _flush(self, job: Job, ledger: Ledger, client: BatchClient) -> None:
        for endpoint in list(self._building):
            if job.stop.is_set():
                return
            await self._submit(self._building.pop(endpoint), job, ledger, client)

    async def _submit(self, part: _Part, job: Job, ledger: Ledger, client: BatchClient) -> None:
        """Record the part, then create its batch and record the id at once."""
        if part.writer is not None:
            ledger.record_part(part.number, part.endpoint, part.writer)
            part.writer = None
        part.ids = set()
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
        job.progress.in_flight += part.rows
        self._log.info("batch_submitted", part=part.number, batch_id=batch.id,
                       requests=part.rows, bytes=part.size, endpoint=part.endpoint)

    async def _reopen(self, job: Job, ledger: Ledger, client: BatchClient) -> None:
        """Parts of earlier runs with rows waiting: a part whose batch id was never written
        is looked up by its metadata, and submitted again only when the provider has none."""
        for number, part in list(self._open.items()):
            if part.batch_id is not None:
                job.progress.in_flight += part.rows
                continue
            found = await self.wire.find(client, _lookup(ledger, number))
            if found is None and self.config.cancelling:   # never created: nothing to wait for
                self._cancel_unsubmitted(part, job, ledger)
                del self._open[number]
                continue
            if found is not None:
                ledger.record_created(number, found.id)
                part.batch_id = found.id
                job.progress.in_flight += part.rows
                self._log.info("batch_found", part=number, batch_id=found.id)
                continue
            # Never created: the same part again, every line of it (its files are on disk).
            part.lines = [slot.line for slot in ledger.slots(number)]
            part.size = sum(len(line) + self.wire.overhead for line in part.lines)
            await self._submit(part, job, ledger, client)

    def _cancel_unsubmitted(self, part: _Part, job: Job, ledger: Ledger) -> None:
        """``batcher cancel``: the rows of a part that was never created are cancelled."""
        assert part.pending is not None
        for slot in ledger.slots(part.number):
            reserved = part.pending.pop(slot.custom_id, None)
            if reserved is not None:
                prepared = self._prepared(part.endpoint, slot, reserved, None)
                job.finish(prepared, Failed(Cancelled(CANCELLED + "before it was submitted"),
                                            slot.attempt - 1, None, None, None))
        part.rows = 0

    # --- polling and collecting -------------------------------------------------------------

    async def _poll(self, job: Job, ledger: Ledger, client: BatchClient) -> None:
        intervals = poll_intervals(self.config.poll_interval)
        while True:
            states: dict[str, int] = {}
            for number, part in list(self._open.items()):
                if job.stop.is_set():
                    return
                assert part.batch_id is not None
                batch = await self.wire.get(client, part.batch_id)
                if self.config.cancelling and not batch.ended and number not in self._cancelled:
                    batch = await self.wire.cancel(client, part.batch_id)
                    self._cancelled.add(number)
                    ledger.record_cancel(number)
                    self._log.info("batch_cancel_requested", part=number, batch_id=batch.id)
                ledger.record_state(number, batch.state, dict(batch.counts))
                states[batch.state] = states.get(batch.state, 0) + 1
                if batch.ended:
                    if not await self._collect(part, batch, job, ledger):
                        return
                    del self._open[number]
            retries, self._retries = self._retries, []
            for endpoint, slot in retries:
                await self._place(endpoint, slot, job, ledger, client)
            await self._flush(job, ledger, client)     # the lines sent again
            job.progress.stage = "batches: " + ", ".join(
                f"{n} {state}" for state, n in sorted(states.items()))
            left = sum(p.rows for p in self._open.values())
            if not left:
                return
            if self.config.no_wait and not self.config.cancelling:
                job.leave_pending(left)
                self._log.info("batches_pending", batches=len(self._open), rows=left)
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(job.stop.wait(), next(intervals))
            if job.stop.is_set():
                return

    async def _collect(self, part: _Part, batch: RemoteBatch, job: Job, ledger: Ledger
                       ) -> bool:
        """Finish every pending row of an ended part from its results. False when the job
        stopped midway (the rows not finished stay pending: a rerun collects them)."""
        assert self._client is not None
        lines = {line.custom_id: line for line in await self.wire.results(self._client, batch)}
        self._log.info("batch_ended", part=part.number, batch_id=batch.id, state=batch.state,
                       lines=len(lines), message=batch.message)
        finished = 0
        for slot in ledger.slots(part.number):
            if part.pending is None:
                reserved = slot.reserved
                part.reserved -= reserved
            else:
                found = part.pending.pop(slot.custom_id, None)
                if found is None:
                    continue              # answered before, or not this run's row
                reserved = found
            line = lines.pop(slot.custom_id, None)
            if line is None:
                error: ProviderError = (
                    BadRequest(f"batch {batch.id} failed: {batch.message or 'no reason given'}")
                    if batch.failed else
                    ServerError(f"not answered by batch {batch.id} ({batch.state})"))
                line = ResultLine(slot.custom_id, None, error)
            part.rows -= 1
            job.progress.in_flight -= 1
            self._settle(part.endpoint, slot, reserved, line, batch.id, job)
            finished += 1
            if finished % YIELD_EVERY == 0:
                await asyncio.sleep(0)     # the writer takes what is finished: memory stays flat
                if job.stop.is_set():
                    return False
        return True

    def _settle(self, endpoint: str, slot: Slot, reserved: float, line: ResultLine,
                batch_id: str, job: Job) -> None:
        """Finish one row from its result line, or place it again (a retryable error)."""
        prepared = self._prepared(endpoint, slot, reserved, batch_id)
        error = line.error
        response = line.response
        if response is not None:
            try:
                answer = prepared.provider.parse_response(prepared.request, response)
            except ProviderError as exc:
                error = exc
            else:
                job.finish(prepared, Sent(response, answer, slot.attempt, None, None))
                return
        assert error is not None
        if isinstance(error, Retryable) and self.config.cancelling:   # not sent again
            error = Cancelled(CANCELLED + f"before it was answered ({error.message})")
        if isinstance(error, Retryable) and slot.attempt < self.config.max_attempts:
            job.progress.retries += 1
            # The reservation goes with the row into its next batch.
            self._retries.append((endpoint, replace(slot, attempt=slot.attempt + 1,
                                                    reserved=reserved)))
            return
        job.finish(prepared, Failed(error, slot.attempt, None, None, response))

    def _prepared(self, endpoint: str, slot: Slot, reserved: float,
                  batch_id: str | None) -> Prepared:
        """What the job needs to finish a slot's row: its row (id, model, columns plus the
        batch id), the provider that parses its answer, and its request's model and schema."""
        columns = dict(slot.columns)
        if batch_id is not None:
            columns[BATCH_ID_COLUMN] = batch_id
        row = RequestRow(id=slot.row_id, shape="prompt", source=slot.source, line=slot.line_no,
                         model=slot.row_model, columns=columns, ordinal=slot.ordinal)
        return Prepared([row], self._provider(endpoint), _stub_request(slot, self._schema),
                        0, reserved, slot.cache_key)

    def _provider(self, endpoint: str) -> Provider:
        if self.wire.name == "anthropic":
            return get_provider("anthropic")
        return get_provider(BATCH_URLS.get(endpoint, self.config.endpoint))

    def _release(self, job: Job) -> None:
        """Rows not answered when the engine ends stay pending; their reservations go (one
        release per row, each an even share of its part's total: no row is read back)."""
        for part in [*self._open.values(), *self._building.values()]:
            if part.writer is not None:
                part.writer.discard()
            total = sum(part.pending.values()) if part.pending is not None else part.reserved
            stub = Prepared([], self._provider(part.endpoint),
                            HttpRequest("POST", "", {}, b""), 0, 0.0, None)
            for _ in range(part.rows):
                job.finish(replace(stub, reserved=max(total, 0.0) / part.rows), None)
        for endpoint, slot in self._retries:
            job.finish(self._prepared(endpoint, slot, slot.reserved, None), None)
        self._open, self._building, self._retries = {}, {}, []


def _stub_request(slot: Slot, schema: ResponseSchema | None) -> HttpRequest:
    """The request as parsing needs it: its model and ``--response-format`` schema."""
    return HttpRequest("POST", "", {}, b"", model=slot.model, response_schema=schema)


def _relabel(slot: Slot, custom_id: str) -> Slot:
    """The slot under another custom_id (both wires' lines are JSON objects naming it)."""
    data = orjson.loads(slot.line)
    data["custom_id"] = custom_id
    end = b"\n" if slot.line.endswith(b"\n") else b""
    return replace(slot, custom_id=custom_id, line=orjson.dumps(data) + end)


def _lookup(ledger: Ledger, part: int) -> Lookup:
    """How the provider may name a part's batch whose id was never written."""
    record = ledger.parts[part]
    since = (datetime.fromisoformat(record.submitted_at.replace("Z", "+00:00")).timestamp()
             if record.submitted_at else None)
    return Lookup(_metadata(ledger, part), record.requests, since,
                  frozenset(r.batch_id for r in ledger.parts.values() if r.batch_id))


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
