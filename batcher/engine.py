"""The engine seam: the one part of a job that differs with the way rows are sent.

A job (:mod:`batcher.runner`) is: read rows → an *engine* turns rows into results → one
durable state and one writer. The runner owns everything that must not depend on how rows
were sent: reading and bad-row reports, the state, the writer, the budget gate, the cache,
result rows, the summary and the exit code. An engine owns only the sending.

The contract, for a new engine (``--mode batch``, ``--engine ray``) in one new module:

- **Receives** a queue of :class:`~batcher.types.RequestRow` values, ended by one ``None``
  per consumer (``Job.consumers``), and the :class:`Job`.
- **Per request**: ``job.prepare(rows)`` first. It returns a :class:`Prepared` request to
  send, or the rows' results already (a cache hit, an input error: hand them to
  ``job.deliver``), or None (the budget gate refused: the job is stopping; drop the rows,
  they stay pending). After sending, ``job.finish(prepared, outcome)`` with a
  :class:`~batcher.results.Sent`, a :class:`~batcher.results.Failed`, or None when the
  request was abandoned (stop, abort): the job builds, delivers or holds the result rows and
  settles the budget. An engine never writes rows itself. :func:`prepared_to_send` does the
  first step's delivering for it.
- **Progress**: the engine keeps ``job.progress.in_flight``, ``.retries`` and
  ``.rate_limited`` up to date; the job counts rows.
- **Rows left elsewhere**: an engine that returns while rows are still being answered
  outside this process (a provider batch, ``--no-wait``) says how many with
  ``job.leave_pending(n)``: the run ends pending (exit 75) and a rerun collects them.
- **Errors that end the job** (auth, quota, server down) go to ``job.abort(exc)``.
- **Input** (optional): an engine with a ``scan`` attribute (a
  :class:`~batcher.io.location.InputScan`) says how the input's content is streamed to the
  runner's reader (``--engine ray``: Ray Data); without one (or None) it is read in this
  process. The runner closes it when the job is over (after the finalize, which reads the
  input's ids).
- **Cancellation**: ``job.stop`` is set when the job stops; then the runner calls
  :meth:`Engine.stop` once (and again with ``now=True`` after the grace, or on a second
  Ctrl-C). :meth:`Engine.run` returns when the queue is drained or the engine stopped.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from batcher.config import RunConfig
from batcher.errors import Aborted, JobFatal
from batcher.providers import Provider
from batcher.results import Failed, Sent
from batcher.types import HttpRequest, RequestRow, ResultRow


@dataclass(slots=True)
class Prepared:
    """One request ready to send: its rows (several for a multi-input embeddings request),
    the provider that built it, the tokens it charges against ``--tpm`` (input plus maximum
    output; 0 when nothing needs the count), the dollars the budget reserved for it, and its
    cache key (None: not cached)."""

    rows: list[RequestRow]
    provider: Provider
    request: HttpRequest
    tokens: int
    reserved: float
    cache_key: str | None


class Counters(Protocol):
    in_flight: int
    retries: int
    rate_limited: int
    stage: str
    """A few words on what the engine is doing (shown beside the progress bar)."""


class Job(Protocol):
    """What the runner offers an engine (see the module docstring)."""

    config: RunConfig
    stop: asyncio.Event
    consumers: int

    @property
    def progress(self) -> Counters: ...

    def prepare(self, rows: list[RequestRow]) -> Prepared | list[ResultRow] | None: ...

    def finish(self, prepared: Prepared, outcome: Sent | Failed | None) -> None: ...

    def deliver(self, result: ResultRow) -> None: ...

    def abort(self, exc: Aborted | JobFatal) -> None: ...

    def leave_pending(self, rows: int) -> None:
        """The engine returns with ``rows`` rows still being answered elsewhere (a provider
        batch left running by ``--no-wait``): the run ends pending, exit 75."""

    def first_send(self) -> None:
        """Called once, as the first request leaves (the runner warms its price table)."""


class Engine(Protocol):
    """Turns rows into results for a :class:`Job` (see the module docstring)."""

    name: str

    async def run(self, rows: asyncio.Queue[RequestRow | None], job: Job) -> None: ...

    def stop(self, *, now: bool) -> int:
        """Stop sending: work not on the wire ends at once; with ``now``, requests on the
        wire are abandoned too (they stay pending). Returns how many are on the wire."""
        ...


EngineFactory = Callable[[RunConfig], Engine]


def prepared_to_send(job: Job, rows: list[RequestRow]) -> Prepared | None:
    """``job.prepare(rows)``, with the results it already has (a cache hit, an input error)
    handed to ``job.deliver``: the request to send, or None when there is none (the rows are
    done, or the budget refused and ``job.stop`` is set)."""
    prepared = job.prepare(rows)
    if isinstance(prepared, list):
        for result in prepared:
            job.deliver(result)
        return None
    return prepared
