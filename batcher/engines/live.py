"""The live engine: requests sent now, through an async pool with pacing and retries.

Workers take rows from the job's queue, group rows into one multi-input request where the
endpoint allows it (embeddings ``--batch-size``), and send each through one
:class:`~batcher.sender.Sender` (pacing, the aiohttp pool, retries by error type, throttle
feedback, the server-down watch). Everything else is the job's (see :mod:`batcher.engine`).
"""

from __future__ import annotations

import asyncio

from batcher.config import RunConfig
from batcher.engine import Job, prepared_to_send
from batcher.limits import Throttle
from batcher.log import get_logger
from batcher.pool import Transport
from batcher.results import Failed, Sent
from batcher.sender import Sender
from batcher.types import RequestRow


class LiveEngine:
    """``--concurrency`` workers sharing one sender; see the module docstring."""

    name = "live"

    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self._sender: Sender | None = None
        self._workers: list[asyncio.Task[None]] = []
        # With a cache, embeddings go one row per request: a group's key would depend on
        # which rows happened to be queued together, and almost never hit again.
        self._group_size = (config.batch_size if config.endpoint == "embeddings"
                            and config.cache is None else 1)

    async def run(self, rows: asyncio.Queue[RequestRow | None], job: Job) -> None:
        config = self.config
        async with Transport(concurrency=config.concurrency, timeout=config.timeout) as transport:
            self._sender = Sender(
                throttle=Throttle(rpm=config.rpm, tpm=config.tpm,
                                  concurrency=config.concurrency),
                transport=transport, max_attempts=config.max_attempts,
                max_rate_limit_wait=config.max_rate_limit_wait,
                server_down_after=config.server_down_after, base_url=config.base_url,
                log=get_logger(), abort=job.abort, stop=job.stop, counters=job.progress,
                on_first_send=job.first_send)
            self._workers = [asyncio.create_task(self._work(rows, job))
                             for _ in range(job.consumers)]
            if job.stop.is_set():          # stopped before the workers existed
                self.stop(now=False)
            outcomes = await asyncio.gather(*self._workers, return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, Exception):   # a defect: the runner reports it
                raise outcome

    def stop(self, *, now: bool) -> int:
        sending = self._sender.sending if self._sender is not None else set()
        for task in self._workers:
            if now or task not in sending:
                task.cancel()
        return len(sending)

    async def _work(self, rows: asyncio.Queue[RequestRow | None], job: Job) -> None:
        while not job.stop.is_set():
            row = await rows.get()
            if row is None or job.stop.is_set():
                return
            group, rest, last = self._gather(row, rows)
            await self._send(group, job)
            if rest is not None and not job.stop.is_set():
                await self._send([rest], job)
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

    async def _send(self, rows: list[RequestRow], job: Job) -> None:
        prepared = prepared_to_send(job, rows)
        if prepared is None:
            return
        assert self._sender is not None
        outcome: Sent | Failed | None = None
        try:
            outcome = await self._sender.send(prepared.rows[0], prepared.provider,
                                              prepared.request, prepared.tokens)
        finally:
            # No await from the answer to here: a stop cannot lose an answer paid for.
            job.finish(prepared, outcome)
