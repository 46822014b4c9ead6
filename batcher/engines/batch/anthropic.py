"""Anthropic Message Batches: ``POST /messages/batches`` with every request inline, poll until
``processing_status`` is ``ended``, read the JSONL at ``results_url``.

``custom_id`` must match ``^[a-zA-Z0-9_-]{1,64}$``: other row ids are sent under generated
ids, mapped back through the part's ids file. Anthropic batches carry no metadata, so the
instant between "create returned" and "id written" cannot be looked up: :meth:`find` finds
nothing and such a part is submitted again (the only case batch mode may pay twice).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import datetime

import orjson

from batcher.engines.batch.client import BatchClient
from batcher.engines.batch.wire import RemoteBatch, ResultLine, json_bytes
from batcher.errors import ServerError
from batcher.providers.anthropic import anthropic_error
from batcher.providers.base import status_for_error
from batcher.types import JSON, HttpRequest, HttpResponse

CUSTOM_ID = re.compile(r"[a-zA-Z0-9_-]{1,64}")


class AnthropicBatches:
    name = "anthropic"
    max_requests = 100_000
    max_bytes = 256 * 1024 * 1024
    overhead = 1           # the comma between requests
    to_error = staticmethod(anthropic_error)

    def custom_id_ok(self, custom_id: str) -> bool:
        return CUSTOM_ID.fullmatch(custom_id) is not None

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

    async def find(self, client: BatchClient, metadata: Mapping[str, str]) -> RemoteBatch | None:
        return None

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
