"""The OpenAI Batch API: JSONL input file (``POST /files``), ``POST /batches``, poll, download.

Also what OpenAI-compatible gateways and vLLM serve. A line's ``url`` and the batch's
``endpoint`` are the version-prefixed path (``/v1/chat/completions``).
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping

import orjson

from batcher.engines.batch.client import BatchClient
from batcher.engines.batch.wire import Lookup, RemoteBatch, ResultLine, json_bytes, listed
from batcher.errors import ServerError
from batcher.providers.base import error_from_object, openai_error
from batcher.types import JSON, HttpRequest, HttpResponse

ENDED = frozenset({"completed", "failed", "expired", "cancelled"})
NOT_ANSWERED = frozenset({"batch_expired", "batch_cancelled"})
"""Error codes of lines the batch did not get to: sent again in a new batch."""


class OpenAIBatches:
    name = "openai"
    max_requests = 50_000
    max_bytes = 200 * 1024 * 1024
    overhead = 0
    to_error = staticmethod(openai_error)

    def custom_id(self, row_id: str, key: str) -> str | None:
        return row_id if 0 < len(row_id) <= 512 else None

    def line(self, custom_id: str, endpoint: str, request: HttpRequest) -> bytes:
        body = request.body
        if b'"stream' in body:     # a Batch API answers whole bodies, never streams
            data = orjson.loads(body)
            if isinstance(data, dict):
                data.pop("stream", None)
                data.pop("stream_options", None)
            body = orjson.dumps(data)
        # The body as built, not decoded and encoded again (a million rows: seconds).
        return (b'{"custom_id":' + orjson.dumps(custom_id) + b',"method":"POST","url":'
                + orjson.dumps(endpoint) + b',"body":' + body + b"}\n")

    async def submit(self, client: BatchClient, endpoint: str, lines: list[bytes],
                     metadata: Mapping[str, str]) -> RemoteBatch:
        boundary = "batcher-" + secrets.token_hex(12)
        name = f"batcher-{metadata.get('batcher_job', '')}-{metadata.get('batcher_part', '')}"
        head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\n"
                f"batch\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
                f"filename=\"{name}.jsonl\"\r\nContent-Type: application/jsonl\r\n\r\n")
        body = b"".join([head.encode(), *lines, f"\r\n--{boundary}--\r\n".encode()])
        response = await client.send("POST", client.url("/files"), body,
                                     f"multipart/form-data; boundary={boundary}")
        del body
        uploaded = orjson.loads(response.body)
        data = await client.json("POST", "/batches", {
            "input_file_id": uploaded["id"], "endpoint": endpoint,
            "completion_window": "24h", "metadata": dict(metadata)})
        return _batch(data)

    async def find(self, client: BatchClient, lookup: Lookup) -> RemoteBatch | None:
        async for item in listed(client, "/batches", "after"):
            found = item.get("metadata")
            if isinstance(found, dict) and all(found.get(k) == v
                                               for k, v in lookup.metadata.items()):
                return _batch(item)
        return None

    async def get(self, client: BatchClient, batch_id: str) -> RemoteBatch:
        return _batch(await client.json("GET", f"/batches/{batch_id}"))

    async def cancel(self, client: BatchClient, batch_id: str) -> RemoteBatch:
        return _batch(await client.json("POST", f"/batches/{batch_id}/cancel", {}))

    async def results(self, client: BatchClient, batch: RemoteBatch) -> list[ResultLine]:
        lines: list[ResultLine] = []
        for key in ("output_file_id", "error_file_id"):
            file_id = batch.raw.get(key)
            if not isinstance(file_id, str) or not file_id:
                continue
            response = await client.send("GET", client.url(f"/files/{file_id}/content"))
            for raw in response.body.splitlines():
                line = _result_line(raw)
                if line is not None:
                    lines.append(line)
        return lines


def _result_line(raw: bytes) -> ResultLine | None:
    """One output/error file line; None for a blank or undecodable line (its row is then
    not answered, and is sent again)."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("custom_id"), str):
        return None
    custom_id = data["custom_id"]
    response = data.get("response")
    if isinstance(response, dict) and isinstance(response.get("status_code"), int):
        body = response.get("body")
        raw_body = body.encode() if isinstance(body, str) else json_bytes(body)
        return ResultLine(custom_id, HttpResponse(response["status_code"], {}, raw_body))
    error = data.get("error")
    code = error.get("code") if isinstance(error, dict) else None
    if code in NOT_ANSWERED or not isinstance(error, dict):
        message = error.get("message") if isinstance(error, dict) else None
        return ResultLine(custom_id, None, ServerError(
            f"not answered by the batch ({code or 'no result'}): {message or ''}".strip()))
    return ResultLine(custom_id, None, error_from_object(error, HttpResponse(200, {}, raw),
                                                         "batch line error"))


def _batch(data: JSON) -> RemoteBatch:
    if not isinstance(data, dict) or not isinstance(data.get("id"), str):
        raise ServerError(f"not a batch object: {str(data)[:200]}")
    state = str(data.get("status") or "unknown")
    message = None
    errors = data.get("errors")
    if isinstance(errors, dict) and isinstance(errors.get("data"), list):
        message = "; ".join(
            f"{e.get('code') or 'error'}: {e.get('message') or ''}"
            + (f" (line {e['line']})" if e.get("line") is not None else "")
            for e in errors["data"][:5] if isinstance(e, dict))
    counts = data.get("request_counts")
    created = data.get("created_at")
    return RemoteBatch(id=data["id"], state=state, ended=state in ENDED,
                       failed=state == "failed", message=message,
                       counts=counts if isinstance(counts, dict) else {},
                       created_at=float(created) if isinstance(created, int | float) else None,
                       raw=data)
