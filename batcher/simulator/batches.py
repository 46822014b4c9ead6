"""The simulator's Batch APIs: OpenAI Files + Batches and Anthropic Message Batches.

A batch takes ``batch_seconds`` (its ``request_counts`` grow evenly over that time) and then
ends; its lines are answered as the live endpoints would answer them (the same parsers), and
the results are written in *reverse* input order (providers promise no order: clients must
map by ``custom_id``). Faults hit a ``custom_id`` only the first time the simulator sees it,
so a client that sends the line again gets an answer: ``batch_fail_rate`` answers 500 (in
the error file; Anthropic: ``errored`` with ``api_error``), ``batch_expire_rate`` leaves it
unanswered and the batch ``expired``, ``batch_cancel_rate`` leaves it unanswered and the
batch ``cancelled``. A create whose lines are malformed (OpenAI) fails the whole batch with
the reasons in ``errors``. ``POST …/cancel`` cancels: the lines done by then keep results.

:class:`BatchCounters` (``/_stats`` → ``batches``) counts files, creates (``creates_by_part``
by the metadata's ``batcher_job``/``batcher_part``, to prove nothing is submitted twice),
lines and cancels. Without ``batch_api`` the routes are absent (404, as on a live-only server).
"""

from __future__ import annotations

import math
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import web

from batcher.simulator import parse, wire
from batcher.simulator.parse import Context, Invalid, Parser
from batcher.simulator.stats import BatchCounters, Stats

ENDPOINTS: dict[str, Parser] = {
    "/v1/chat/completions": parse.parse_chat,
    "/v1/completions": parse.parse_completions,
    "/v1/embeddings": parse.parse_embeddings,
}
ANTHROPIC_ID = re.compile(r"[a-zA-Z0-9_-]{1,64}")
_JSON = "application/json"

Guard = Callable[[web.Request, wire.Dialect], web.Response | None]
"""The app's checks before any handler (API key, quota): a refusal, or None to go on."""


__all__ = ["BatchCounters", "BatchSim"]


@dataclass(slots=True)
class _Batch:
    obj: dict[str, Any]
    dialect: wire.Dialect
    lines: list[dict[str, Any]]
    started: float
    ended: bool = False
    cancelled_at: float | None = None
    results: list[bytes] = field(default_factory=list)
    errors: list[bytes] = field(default_factory=list)


class BatchSim:
    """The batch routes' state; ``ctx`` is the app's (ids, answers), ``clock`` its clock."""

    def __init__(self, ctx: Context, stats: Stats, *, clock: Callable[[], float], seconds: float,
                 fail_rate: float, expire_rate: float, cancel_rate: float, seed: int) -> None:
        self.ctx = ctx
        self.stats = stats
        self.clock = clock
        self.seconds = seconds
        self.rates = (fail_rate, expire_rate, cancel_rate)
        self.rng = random.Random(f"{seed}:batch")
        self.counters = stats.batches
        self.files: dict[str, bytes] = {}
        self.batches: dict[str, _Batch] = {}
        self.seen: set[str] = set()

    def add_routes(self, router: web.UrlDispatcher, guard: Guard) -> None:
        def guarded(dialect: wire.Dialect, handler: Callable[[web.Request], Any]
                    ) -> Callable[[web.Request], Any]:
            async def handle(request: web.Request) -> web.StreamResponse:
                refused = guard(request, dialect)
                if refused is not None:
                    return refused
                try:
                    response: web.StreamResponse = await handler(request)
                except Invalid as exc:
                    return _reply(exc.status, wire.error_body(dialect, exc.status, exc.message,
                                                              param=exc.param, code=exc.code))
                return response
            return handle

        router.add_post("/v1/files", guarded("openai", self.upload))
        router.add_get("/v1/files/{id}/content", guarded("openai", self.content))
        router.add_post("/v1/batches", guarded("openai", self.create))
        router.add_get("/v1/batches", guarded("openai", self.list_openai))
        router.add_get("/v1/batches/{id}", guarded("openai", self.get))
        router.add_post("/v1/batches/{id}/cancel", guarded("openai", self.cancel))
        router.add_post("/v1/messages/batches", guarded("anthropic", self.create_anthropic))
        router.add_get("/v1/messages/batches", guarded("anthropic", self.list_anthropic))
        router.add_get("/v1/messages/batches/{id}", guarded("anthropic", self.get))
        router.add_get("/v1/messages/batches/{id}/results",
                       guarded("anthropic", self.results_anthropic))
        router.add_post("/v1/messages/batches/{id}/cancel", guarded("anthropic", self.cancel))

    # --- OpenAI ---------------------------------------------------------------------------

    async def upload(self, request: web.Request) -> web.Response:
        form = await request.post()
        upload = form.get("file")
        if form.get("purpose") != "batch" or not isinstance(upload, web.FileField):
            raise Invalid("Expected multipart fields 'purpose=batch' and 'file'.", "file")
        data = upload.file.read()
        file_id = self.ctx.new_id("file-")
        self.files[file_id] = data
        self.counters.files += 1
        self.counters.largest_input = max(self.counters.largest_input, len(data))
        return _json({"id": file_id, "object": "file", "bytes": len(data),
                      "created_at": int(time.time()), "filename": upload.filename,
                      "purpose": "batch"})

    async def content(self, request: web.Request) -> web.Response:
        data = self.files.get(request.match_info["id"])
        if data is None:
            raise Invalid("No such file.", status=404)
        return web.Response(body=data, content_type="application/octet-stream")

    async def create(self, request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        endpoint = body.get("endpoint")
        if endpoint not in ENDPOINTS:
            raise Invalid(f"Invalid endpoint {endpoint!r}.", "endpoint")
        data = self.files.get(body.get("input_file_id"))
        if data is None:
            raise Invalid("No such input file.", "input_file_id", status=404)
        metadata = body.get("metadata") or {}
        lines, problems = _openai_lines(data, endpoint)
        obj = {
            "id": self.ctx.new_id("batch_"), "object": "batch", "endpoint": endpoint,
            "errors": None, "input_file_id": body["input_file_id"],
            "completion_window": body.get("completion_window", "24h"),
            "status": "validating", "output_file_id": None, "error_file_id": None,
            "created_at": int(time.time()), "metadata": metadata,
            "request_counts": {"total": len(lines), "completed": 0, "failed": 0},
        }
        batch = self._add(obj, "openai", lines, metadata)
        if problems:
            batch.ended = True
            obj["status"] = "failed"
            obj["errors"] = {"object": "list", "data": problems}
        return _json(obj)

    async def list_openai(self, request: web.Request) -> web.Response:
        items = [b.obj for b in reversed(self.batches.values()) if b.dialect == "openai"]
        for batch in items:
            self._advance(self.batches[batch["id"]])
        limit = int(request.query.get("limit", "20"))
        after = request.query.get("after")
        if after is not None:
            ids = [b["id"] for b in items]
            items = items[ids.index(after) + 1:] if after in ids else []
        page = items[:limit]
        return _json({"object": "list", "data": page, "has_more": len(items) > limit,
                      "first_id": page[0]["id"] if page else None,
                      "last_id": page[-1]["id"] if page else None})

    # --- Anthropic ------------------------------------------------------------------------

    async def create_anthropic(self, request: web.Request) -> web.Response:
        raw = await request.read()
        self.counters.largest_input = max(self.counters.largest_input, len(raw))
        body = orjson.loads(raw)
        requests = body.get("requests") if isinstance(body, dict) else None
        if not isinstance(requests, list) or not requests:
            raise Invalid("requests: expected a non-empty list.", "requests")
        seen: set[str] = set()
        for item in requests:
            custom_id = item.get("custom_id") if isinstance(item, dict) else None
            if not isinstance(custom_id, str) or not ANTHROPIC_ID.fullmatch(custom_id):
                raise Invalid(f"custom_id {custom_id!r}: String should match pattern "
                              "'^[a-zA-Z0-9_-]{1,64}$'", "custom_id")
            if custom_id in seen:
                raise Invalid(f"Duplicate custom_id {custom_id!r}.", "custom_id")
            seen.add(custom_id)
        now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
        batch_id = self.ctx.new_id("msgbatch_")
        obj = {
            "id": batch_id, "type": "message_batch", "processing_status": "in_progress",
            "request_counts": {"processing": len(requests), "succeeded": 0, "errored": 0,
                               "canceled": 0, "expired": 0},
            "created_at": now, "ended_at": None, "cancel_initiated_at": None,
            "expires_at": None, "results_url": None,
        }
        self._add(obj, "anthropic", requests, {})
        origin = str(request.url.origin())
        obj["results_url"] = f"{origin}/v1/messages/batches/{batch_id}/results"
        hidden = dict(obj)
        hidden["results_url"] = None
        return _json(hidden)

    async def list_anthropic(self, request: web.Request) -> web.Response:
        items = [self._view(b) for b in reversed(self.batches.values())
                 if b.dialect == "anthropic"]
        return _json({"data": items, "has_more": False})

    async def results_anthropic(self, request: web.Request) -> web.Response:
        batch = self.batches.get(request.match_info["id"])
        if batch is None or not batch.ended:
            raise Invalid("No results yet.", status=404 if batch is None else 400)
        return web.Response(body=b"".join(batch.results), content_type="application/binary")

    # --- both -----------------------------------------------------------------------------

    async def get(self, request: web.Request) -> web.Response:
        self.counters.polls += 1
        batch = self.batches.get(request.match_info["id"])
        if batch is None:
            raise Invalid("No such batch.", status=404)
        return _json(self._view(batch))

    async def cancel(self, request: web.Request) -> web.Response:
        batch = self.batches.get(request.match_info["id"])
        if batch is None:
            raise Invalid("No such batch.", status=404)
        self._advance(batch)
        if not batch.ended and batch.cancelled_at is None:
            batch.cancelled_at = self.clock()
            self.counters.cancels += 1
            if batch.dialect == "openai":
                batch.obj["status"] = "cancelling"
            else:
                batch.obj["processing_status"] = "canceling"
        return _json(self._view(batch))

    def _add(self, obj: dict[str, Any], dialect: wire.Dialect, lines: list[dict[str, Any]],
             metadata: Any) -> _Batch:
        batch = _Batch(obj, dialect, lines, self.clock())
        self.batches[obj["id"]] = batch
        counters = self.counters
        counters.creates += 1
        counters.lines += len(lines)
        if isinstance(metadata, dict) and "batcher_part" in metadata:
            key = f"{metadata.get('batcher_job')}:{metadata['batcher_part']}"
            counters.creates_by_part[key] = counters.creates_by_part.get(key, 0) + 1
        return batch

    def _view(self, batch: _Batch) -> dict[str, Any]:
        self._advance(batch)
        if batch.dialect == "anthropic" and not batch.ended:
            return {**batch.obj, "results_url": None}
        return batch.obj

    def _done_by(self, batch: _Batch, now: float) -> int:
        total = len(batch.lines)
        if self.seconds <= 0:
            return total
        return min(total, math.floor(total * (now - batch.started) / self.seconds))

    def _advance(self, batch: _Batch) -> None:
        """Bring a batch up to the clock: counts, and its end once its time is up."""
        if batch.ended:
            return
        now = self.clock()
        if batch.cancelled_at is not None:
            self._finish(batch, self._done_by(batch, batch.cancelled_at), cancelled=True)
            return
        done = self._done_by(batch, now)
        if done >= len(batch.lines):
            self._finish(batch, done, cancelled=False)
            return
        if batch.dialect == "openai":
            batch.obj["status"] = "in_progress"
            batch.obj["request_counts"]["completed"] = done
        else:
            batch.obj["request_counts"]["processing"] = len(batch.lines) - done

    def _finish(self, batch: _Batch, done: int, *, cancelled: bool) -> None:
        batch.ended = True
        expired = False
        counts = {"ok": 0, "errored": 0, "expired": 0, "canceled": 0}
        for index, line in enumerate(batch.lines):
            custom_id = str(line.get("custom_id"))
            fault = self._fault(custom_id)
            if index >= done:
                fault = "cancel"
            if fault == "expire":
                expired = True
                counts["expired"] += 1
                continue
            if fault == "cancel":
                cancelled = True
                counts["canceled"] += 1
                continue
            ok, text = self._answer(batch, line, fault == "fail")
            counts["ok" if ok else "errored"] += 1
            (batch.results if ok or batch.dialect == "anthropic" else batch.errors).append(text)
        batch.results.reverse()
        batch.errors.reverse()
        if batch.dialect == "anthropic":
            batch.obj["processing_status"] = "ended"
            batch.obj["ended_at"] = datetime.now(UTC).isoformat().replace("+00:00", "Z")
            batch.obj["request_counts"] = {"processing": 0, "succeeded": counts["ok"],
                                           "errored": counts["errored"],
                                           "canceled": counts["canceled"],
                                           "expired": counts["expired"]}
            return
        obj = batch.obj
        obj["status"] = "expired" if expired else "cancelled" if cancelled else "completed"
        obj["request_counts"] = {"total": len(batch.lines), "completed": counts["ok"],
                                 "failed": counts["errored"]}
        for key, lines in (("output_file_id", batch.results), ("error_file_id", batch.errors)):
            if lines:
                file_id = self.ctx.new_id("file-")
                self.files[file_id] = b"".join(lines)
                obj[key] = file_id

    def _fault(self, custom_id: str) -> str | None:
        """A line's fault, drawn only the first time its custom_id is seen."""
        if custom_id in self.seen:
            return None
        self.seen.add(custom_id)
        draw = self.rng.random()
        total = 0.0
        for kind, rate in zip(("fail", "expire", "cancel"), self.rates, strict=True):
            total += rate
            if draw < total:
                return kind
        return None

    def _answer(self, batch: _Batch, line: dict[str, Any], fail: bool) -> tuple[bool, bytes]:
        """(answered 2xx, the result line) for one input line."""
        custom_id = line.get("custom_id")
        dialect = batch.dialect
        status, body = 500, orjson.loads(wire.error_body(dialect, 500 if dialect == "openai"
                                                         else 529))
        if not fail:
            parser = ENDPOINTS.get(str(batch.obj.get("endpoint"))) if dialect == "openai" \
                else parse.parse_messages
            payload = line.get("body") if dialect == "openai" else line.get("params")
            try:
                assert parser is not None
                plan = parser(payload, _NO_REQUEST, self.ctx)
                if plan.frames is not None:
                    raise Invalid("Streaming is not supported in a batch.", "stream")
                status, body = 200, orjson.loads(plan.body)
                self.stats.record_ok(plan.model, plan.prompt_tokens, plan.completion_tokens)
            except Invalid as exc:
                status = exc.status
                body = orjson.loads(wire.error_body(dialect, exc.status, exc.message,
                                                    param=exc.param, code=exc.code))
        if dialect == "anthropic":
            if status == 200:
                result: dict[str, Any] = {"type": "succeeded", "message": body}
            else:
                result = {"type": "errored", "error": body}
            return status == 200, orjson.dumps({"custom_id": custom_id, "result": result}) + b"\n"
        return status == 200, orjson.dumps({
            "id": self.ctx.new_id("batch_req_"), "custom_id": custom_id,
            "response": {"status_code": status, "request_id": self.ctx.new_id("req_"),
                         "body": body},
            "error": None}) + b"\n"


_NO_REQUEST: Any = None
"""The OpenAI and Anthropic parsers read only the body; a batch line has no HTTP request."""


def _openai_lines(data: bytes, endpoint: str) -> tuple[list[dict[str, Any]],
                                                       list[dict[str, Any]]]:
    """The file's lines and the problems that fail the batch (code, message, line)."""
    lines: list[dict[str, Any]] = []
    problems: list[dict[str, Any]] = []
    seen: set[str] = set()
    for number, raw in enumerate(data.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            line = orjson.loads(raw)
        except orjson.JSONDecodeError:
            problems.append({"code": "invalid_json", "message": "Line is not valid JSON.",
                             "param": None, "line": number})
            continue
        custom_id = line.get("custom_id") if isinstance(line, dict) else None
        if not isinstance(custom_id, str) or custom_id in seen:
            problems.append({"code": "duplicate_custom_id" if custom_id in seen
                             else "missing_required_parameter",
                             "message": "custom_id must be unique and present.",
                             "param": "custom_id", "line": number})
            continue
        seen.add(custom_id)
        if line.get("url") != endpoint or line.get("method") != "POST":
            problems.append({"code": "mismatched_endpoint",
                             "message": f"The url must be {endpoint} with method POST.",
                             "param": "url", "line": number})
            continue
        lines.append(line)
    return lines, problems


def _json(data: Any) -> web.Response:
    return _reply(200, orjson.dumps(data))


def _reply(status: int, body: bytes) -> web.Response:
    return web.Response(status=status, body=body, content_type=_JSON)
