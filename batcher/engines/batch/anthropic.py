"""Anthropic Message Batches: ``POST /messages/batches`` with every request inline, poll until
``processing_status`` is ``ended``, read the JSONL at ``results_url``.

``custom_id`` must match ``^[a-zA-Z0-9_-]{1,64}$``. A row is sent as ``KEY_ROWID``: the first
:data:`KEY_PREFIX` characters of the output's random key before its id, so that no other
job's batch holds this output's custom_ids. Ids that do not fit are sent under generated ids,
mapped back through the part's ids file.

Anthropic batches carry no metadata. For the instant between "create returned" and "id
written", :meth:`find` lists the account's batches (newest first) and takes the one batch
created since the part was announced (less :data:`CLOCK_SKEW`) with the part's number of
requests that the output does not already know. Only one part at a time can be in that instant
(parts are created one after another), so a second such batch is someone else's: when there
are several, none is taken and the part is submitted again (then, and only then, batch mode
may pay twice). A batch taken that was not the part's after all (the part was never created,
and someone else made one of the same size meanwhile) holds none of its custom_ids: its rows
come back unanswered and go into a new part.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import datetime

import orjson

from batcher.engines.batch.client import BatchClient
from batcher.engines.batch.wire import Lookup, RemoteBatch, ResultLine, json_bytes, listed
from batcher.errors import ServerError
from batcher.log import get_logger
from batcher.providers.anthropic import anthropic_error
from batcher.providers.base import status_for_error
from batcher.types import JSON, HttpRequest, HttpResponse

CUSTOM_ID = re.compile(r"[a-zA-Z0-9_-]{1,64}")
CLOCK_SKEW = 120.0
"""Seconds the provider's clock may be behind ours when a batch is looked up by its time."""
KEY_PREFIX = 8
"""Characters of the output's key that begin each custom_id (see the module docstring)."""


class AnthropicBatches:
    name = "anthropic"
    max_requests = 100_000
    max_bytes = 256 * 1024 * 1024
    overhead = 1           # the comma between requests
    to_error = staticmethod(anthropic_error)

    def custom_id(self, row_id: str, key: str) -> str | None:
        custom_id = f"{key[:KEY_PREFIX]}_{row_id}"
        return custom_id if CUSTOM_ID.fullmatch(custom_id) else None

    def line(self, custom_id: str, endpoint: str, request: HttpRequest) -> bytes:
        params = request.body
        if b'"stream' in params:
            data = orjson.loads(params)
            if isinstance(data, dict):
                data.pop("stream", None)
            params = orjson.dumps(data)
        return b'{"custom_id":' + orjson.dumps(custom_id) + b',"params":' + params + b"}"

    async def submit(self, client: BatchClient, endpoint: str, lines: list[bytes],
                     metadata: Mapping[str, str]) -> RemoteBatch:
        body = b'{"requests":[' + b",".join(lines) + b"]}"
        response = await client.send("POST", client.url("/messages/batches"), body,
                                     "application/json")
        return _batch(orjson.loads(response.body))

    async def find(self, client: BatchClient, lookup: Lookup) -> RemoteBatch | None:
        if lookup.since is None:
            return None
        since = lookup.since - CLOCK_SKEW
        found: list[RemoteBatch] = []
        async for item in listed(client, "/messages/batches", "after_id"):
            try:
                batch = _batch(item)
            except ServerError:
                continue
            if batch.created_at is not None and batch.created_at < since:
                break                     # newest first: the rest are older still
            if batch.id not in lookup.known and _requests(batch) == lookup.requests:
                found.append(batch)
        if len(found) > 1:
            get_logger().warning("batch_lookup_ambiguous", requests=lookup.requests,
                                 candidates=[b.id for b in found])
        return found[0] if len(found) == 1 else None

    async def get(self, client: BatchClient, batch_id: str) -> RemoteBatch:
        return _batch(await client.json("GET", f"/messages/batches/{batch_id}"))

    async def cancel(self, client: BatchClient, batch_id: str) -> RemoteBatch:
        return _batch(await client.json("POST", f"/messages/batches/{batch_id}/cancel", {}))

    async def results(self, client: BatchClient, batch: RemoteBatch) -> list[ResultLine]:
        url = batch.raw.get("results_url")
        if not isinstance(url, str) or not url:
            return []
        response = await client.send("GET", url)
        lines: list[ResultLine] = []
        for raw in response.body.splitlines():
            line = _result_line(raw)
            if line is not None:
                lines.append(line)
        return lines


def _result_line(raw: bytes) -> ResultLine | None:
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("custom_id"), str):
        return None
    result = data.get("result")
    kind = result.get("type") if isinstance(result, dict) else None
    if kind == "succeeded" and isinstance(result, dict):
        return ResultLine(data["custom_id"], HttpResponse(200, {},
                                                          json_bytes(result.get("message"))))
    if kind == "errored" and isinstance(result, dict):
        # {"type": "error", "error": {"type": "overloaded_error", "message": …}}: answered
        # as the HTTP error it stands for, so the provider's one error path classes it.
        outer = result.get("error")
        inner = outer.get("error") if isinstance(outer, dict) else None
        err = inner if isinstance(inner, dict) else outer if isinstance(outer, dict) else {}
        body = json_bytes({"type": "error", "error": err})
        return ResultLine(data["custom_id"], HttpResponse(status_for_error(err), {}, body))
    return ResultLine(data["custom_id"], None,
                      ServerError(f"not answered by the batch ({kind or 'no result'})"))


def _requests(batch: RemoteBatch) -> int:
    """The batch's number of requests: the sum of its counts (processing, succeeded, …)."""
    return sum(v for v in batch.counts.values() if isinstance(v, int))


def _batch(data: JSON) -> RemoteBatch:
    if not isinstance(data, dict) or not isinstance(data.get("id"), str):
        raise ServerError(f"not a message batch object: {str(data)[:200]}")
    state = str(data.get("processing_status") or "unknown")
    counts = data.get("request_counts")
    created: float | None = None
    if isinstance(data.get("created_at"), str):
        try:
            created = datetime.fromisoformat(data["created_at"].replace("Z", "+00:00")).timestamp()
        except ValueError:
            created = None
    return RemoteBatch(id=data["id"], state=state, ended=state == "ended",
                       counts=counts if isinstance(counts, dict) else {}, created_at=created,
                       raw=data)
