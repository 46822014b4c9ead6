"""What a provider's Batch API looks like to the engine: one small interface, two wires."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import orjson

from batcher.engines.batch.client import BatchClient
from batcher.errors import ProviderError
from batcher.types import JSON, HttpRequest, HttpResponse


def json_bytes(value: JSON) -> bytes:
    """``value`` as compact JSON bytes, in an allocation of their own size: orjson's own
    result keeps a buffer of 4 kB or more, and a batch's results hold 50,000 of them."""
    return memoryview(orjson.dumps(value)).tobytes()


FIND_PAGES = 20
"""Pages of 100 batches listed, at most, to look a part's batch up."""


async def listed(client: BatchClient, path: str, cursor: str
                 ) -> AsyncIterator[Mapping[str, JSON]]:
    """The objects of a provider's paged list at ``path`` (newest first), up to FIND_PAGES
    pages of 100; ``cursor`` is the query parameter naming the last object seen."""
    after: str | None = None
    for _ in range(FIND_PAGES):
        page = await client.json("GET", f"{path}?limit=100"
                                 + (f"&{cursor}={after}" if after else ""))
        data = page.get("data") if isinstance(page, dict) else None
        if not isinstance(page, dict) or not isinstance(data, list) or not data:
            return
        for item in data:
            if isinstance(item, dict):
                yield item
        last = data[-1]
        if not page.get("has_more") or not isinstance(last, dict):
            return
        after = str(last.get("id"))


@dataclass(frozen=True, slots=True)
class RemoteBatch:
    """A provider batch as last polled. ``ended``: no line will change any more (completed,
    failed, expired, cancelled); ``failed``: it failed as a whole (``message`` says why);
    ``counts`` the provider's request counts; ``created_at`` Unix seconds."""

    id: str
    state: str
    ended: bool
    failed: bool = False
    message: str | None = None
    counts: Mapping[str, JSON] = field(default_factory=dict)
    created_at: float | None = None
    raw: Mapping[str, JSON] = field(default_factory=dict, repr=False)


@dataclass(frozen=True, slots=True)
class ResultLine:
    """One line of a batch's results: the answer as an HTTP response (parsed by the row's
    provider, like a live answer), or the error that stands for its absence."""

    custom_id: str
    response: HttpResponse | None
    error: ProviderError | None = None


@dataclass(frozen=True, slots=True)
class Lookup:
    """What names a part's batch at the provider when its id was never written: the
    ``metadata`` it was created with (OpenAI); for a provider that keeps none (Anthropic), its
    number of ``requests``, when the part was announced (``since``, Unix seconds) and the batch
    ids the output already knows (``known``: none of them is this part's)."""

    metadata: Mapping[str, str]
    requests: int
    since: float | None
    known: frozenset[str]


class BatchWire(Protocol):
    """One provider's Batch API. ``max_requests`` and ``max_bytes`` are its caps per batch
    (bytes as sent: the input file, or the create call's body)."""

    name: str
    max_requests: int
    max_bytes: int
    overhead: int
    """Bytes each line adds to the request beyond its own (a separator)."""

    def custom_id(self, row_id: str, key: str) -> str | None:
        """The ``custom_id`` a row is sent under, derived from its id (and the output's
        ``key``); None when none can be (the row is then sent under a generated one)."""
        ...

    def line(self, custom_id: str, endpoint: str, request: HttpRequest) -> bytes:
        """The request's line in a batch, as sent."""
        ...

    async def submit(self, client: BatchClient, endpoint: str, lines: list[bytes],
                     metadata: Mapping[str, str]) -> RemoteBatch:
        """Create one batch of ``lines``; returns as soon as the provider has it."""
        ...

    async def find(self, client: BatchClient, lookup: Lookup) -> RemoteBatch | None:
        """The part's batch as ``lookup`` describes it, if the provider lists one."""
        ...

    async def get(self, client: BatchClient, batch_id: str) -> RemoteBatch: ...

    async def results(self, client: BatchClient, batch: RemoteBatch) -> list[ResultLine]:
        """Every line the ended ``batch`` has a result or an error for, in any order."""
        ...

    async def cancel(self, client: BatchClient, batch_id: str) -> RemoteBatch: ...
