"""The simulator's aiohttp application: routes, request checks, limits, faults and answers.

What a request goes through, in order (the first that applies answers it):

1. the next ``script`` item, if any: a scripted fault answers (after the latency) without
   any of the checks below; ``ok`` and ``cut-stream`` go through them, and a scripted
   request never gets a random fault;
2. ``strict_rpm``: a gateway's limiter in front of everything else, as nginx ``limit_req``
   with no burst: 429 unless ``60 / strict_rpm`` seconds have passed since the last admitted
   request (refusals do not move that clock), with ``retry-after`` (Gemini: a RetryInfo
   ``retryDelay``) only when ``strict_retry_after`` is set, and no ``x-ratelimit-*`` headers;
3. ``require_key``: 401 unless ``Authorization: Bearer``, ``x-api-key``, ``x-goog-api-key``,
   ``api-key`` or ``?key=`` carries the key (the key sent is never echoed);
4. ``quota_exhausted``: 429 with the endpoint's "credit is gone" body;
5. the body: invalid JSON or missing/invalid fields → 400 in the endpoint's error shape;
6. rpm/tpm enforcement in one-second slices → 429 with ``retry-after`` (fractional
   seconds) and, on OpenAI paths, ``retry-after-ms`` (Gemini: a RetryInfo ``retryDelay``);
7. one random draw against the fault rates (``fail_rate`` answers 500, or 529
   ``overloaded_error`` on the Anthropic path);
8. the latency (latency ± jitter; not for hangs), then the fault or the answer.

A cut (``cut-stream``) sends about half of a stream (never its ``[DONE]``/``message_stop``)
and closes the connection; on a request that is not streamed it sends half of the JSON body
under the full Content-Length. A drop reads the request and closes the connection; a hang
holds it until the client gives up or the server shuts down (then the connection closes).
The Batch APIs (``/v1/files``, ``/v1/batches``, ``/v1/messages/batches``; see
:mod:`batcher.simulator.batches`) go through steps 3 and 4 only. Unknown paths answer an
OpenAI-style 404 JSON and are not counted in the stats.

Rate-limit headers go on every answer that reached step 6: ``x-ratelimit-limit-*`` (the
per-minute figure), ``x-ratelimit-remaining-*`` (left in this one-second slice) and
``x-ratelimit-reset-*`` (``"350ms"``: until the next slice) for requests and tokens on
OpenAI paths; ``anthropic-ratelimit-{requests,tokens}-{limit,remaining,reset}`` (reset
as an RFC 3339 time) on the Anthropic path; none on Gemini's (as the real API).
A request costs ``prompt_tokens + max_tokens`` against the TPM, or prompt plus answer
tokens when no max is given (embeddings: the input tokens).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import hmac
import itertools
import math
import os
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import orjson
from aiohttp import web

from batcher.simulator import parse, wire
from batcher.simulator.batches import BatchSim
from batcher.simulator.config import RATE_FIELDS, ScriptItem, SimConfig
from batcher.simulator.limits import IntervalLimiter, SliceLimiter
from batcher.simulator.parse import DEFAULT_MODEL, Invalid, Parser, Plan
from batcher.simulator.stats import Stats

HANG_MAX_S = 3600.0
"""A hung request is released (its connection closed) after this long at most."""

_JSON = "application/json"
_SSE = "text/event-stream; charset=utf-8"
_HTML = "text/html; charset=UTF-8"
_ABORT = frozenset({"drop", "hang"})
_RANDOM_KINDS: dict[str, ScriptItem] = {
    "fail_rate": ScriptItem("fail"),
    "rate_429": ScriptItem("status", 429),  # retry-after filled in per config
    "rate_429_bare": ScriptItem("status", 429),
    "rate_524": ScriptItem("status", 524),
    "rate_invalid_json": ScriptItem("invalid-json"),
    "rate_drop": ScriptItem("drop"),
    "rate_hang": ScriptItem("hang"),
    "rate_cut_stream": ScriptItem("cut-stream"),
}


class _State:
    """Everything one app mutates; lives on the app, touched only by its event loop."""

    def __init__(self, config: SimConfig, clock: Callable[[], float]) -> None:
        self.config = config
        self.clock = clock
        self.stats = Stats()
        self.script: deque[ScriptItem] = deque(config.parsed_script())
        self.fault_rng = random.Random(config.seed)
        # A separate stream, so that changing the jitter does not change which requests fail.
        self.latency_rng = random.Random(f"{config.seed}:latency")
        self.schema_rng = random.Random(f"{config.seed}:schema")
        self.schema_breaks = 0
        self.rpm = SliceLimiter(config.rpm) if config.rpm is not None else None
        self.tpm = SliceLimiter(config.tpm) if config.tpm is not None else None
        self.strict = IntervalLimiter(config.strict_rpm) if config.strict_rpm is not None else None
        self.fault_rate = config.fault_rate
        self.thresholds: list[tuple[float, ScriptItem]] = []
        total = 0.0
        for name in RATE_FIELDS:
            rate = getattr(config, name)
            if rate > 0:
                total += rate
                item = _RANDOM_KINDS[name]
                if name == "rate_429":
                    item = item._replace(retry_after=config.retry_after_s)
                self.thresholds.append((total, item))
        self.has_delay = config.latency_ms > 0 or config.jitter_ms > 0
        self.answered: set[bytes] = set()
        self.failed_at: dict[bytes, float] = {}
        """Raw bodies (sha1) last answered with a 5xx, and when: the next arrival of one is
        the client's retry, whose delay goes to ``Stats.retry_delays_ms``."""
        self.closing = asyncio.Event()
        self._ids = itertools.count(1)
        self._id_base = os.urandom(4).hex()

    @property
    def answer_tokens(self) -> int:
        return self.config.answer_tokens

    @property
    def omit_stream_usage(self) -> bool:
        return self.config.omit_stream_usage

    def new_id(self, prefix: str) -> str:
        return f"{prefix}sim{self._id_base}{next(self._ids):08x}"

    def break_schema(self) -> int | None:
        rate = self.config.rate_bad_schema
        if rate <= 0 or self.schema_rng.random() >= rate:
            return None
        self.stats.count_fault("bad_schema")
        self.schema_breaks += 1
        return self.schema_breaks - 1

    def draw_fault(self) -> ScriptItem | None:
        r = self.fault_rng.random()
        if r >= self.fault_rate:
            return None
        for threshold, item in self.thresholds:
            if r < threshold:
                return item
        return self.thresholds[-1][1]

    def delay(self) -> float:
        """Seconds to wait before answering: latency ± uniform jitter, never negative."""
        cfg = self.config
        jitter = self.latency_rng.uniform(-cfg.jitter_ms, cfg.jitter_ms) if cfg.jitter_ms else 0.0
        return max(0.0, cfg.latency_ms + jitter) / 1000.0

    def reply(self, status: int, body: bytes, content_type: str = _JSON,
              headers: dict[str, str] | None = None) -> web.Response:
        by_status = self.stats.by_status
        by_status[status] = by_status.get(status, 0) + 1
        all_headers = {"Content-Type": content_type}
        if headers:
            all_headers.update(headers)
        return web.Response(status=status, body=body, headers=all_headers)


STATS_KEY = web.AppKey("batcher_simulator_stats", Stats)
"""``app[STATS_KEY]``: the live :class:`Stats` of an app made by :func:`make_app`."""

_STATE_KEY = web.AppKey("batcher_simulator_state", _State)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def make_app(config: SimConfig, *, clock: Callable[[], float] = time.monotonic,
             ) -> web.Application:
    """The simulator as an aiohttp application.

    Routes: ``POST /v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings``,
    ``/v1/messages`` (Anthropic), ``/v1beta/models/{model}:generateContent`` and
    ``:streamGenerateContent`` (Gemini; also under ``/v1/models/``), ``GET /v1/models`` and
    ``GET /_stats`` (the :class:`Stats` as JSON). ``clock`` (seconds, monotonic) decides
    the rate-limit slices; tests pass a fake one.
    """
    app = web.Application(client_max_size=64 * 1024 * 1024)
    state = _State(config, clock)
    app[_STATE_KEY] = state
    app[STATS_KEY] = state.stats
    router = app.router
    router.add_post("/v1/chat/completions", _endpoint("openai", parse.parse_chat))
    router.add_post("/v1/completions", _endpoint("openai", parse.parse_completions))
    router.add_post("/v1/embeddings", _endpoint("openai", parse.parse_embeddings))
    router.add_post("/v1/messages", _endpoint("anthropic", parse.parse_messages))
    gemini = _endpoint("gemini", parse.parse_gemini)
    router.add_post("/v1beta/models/{call}", gemini)
    router.add_post("/v1/models/{call}", gemini)
    if config.batch_api:
        BatchSim(state, state.stats, clock=clock, seconds=config.batch_seconds,
                 fail_rate=config.batch_fail_rate, expire_rate=config.batch_expire_rate,
                 cancel_rate=config.batch_cancel_rate, seed=config.seed,
                 ).add_routes(router, functools.partial(_guard, state))
    router.add_get("/v1/models", _list_models)
    router.add_get("/_stats", _get_stats)
    router.add_route("*", "/{tail:.*}", _not_found)
    app.on_shutdown.append(_release_hung)
    return app


def _guard(state: _State, request: web.Request, dialect: wire.Dialect) -> web.Response | None:
    """The checks every route makes before its own (steps 3 and 4 above): key, quota."""
    stats = state.stats
    stats.requests += 1
    stats.by_path[request.path] = stats.by_path.get(request.path, 0) + 1
    if state.config.require_key is not None and not _has_key(request, state.config.require_key):
        return state.reply(401, wire.error_body(dialect, 401))
    if state.config.quota_exhausted:
        return state.reply(429, wire.quota_body(dialect))
    return None


async def _release_hung(app: web.Application) -> None:
    app[_STATE_KEY].closing.set()


def _endpoint(dialect: wire.Dialect, parse: Parser) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        state = request.app[_STATE_KEY]
        stats = state.stats
        stats.requests += 1
        path = request.path
        stats.by_path[path] = stats.by_path.get(path, 0) + 1
        stats.in_flight += 1
        if stats.in_flight > stats.max_in_flight:
            stats.max_in_flight = stats.in_flight
        try:
            return await _answer(request, state, dialect, parse)
        finally:
            stats.in_flight -= 1

    return handle


async def _answer(request: web.Request, state: _State, dialect: wire.Dialect,
                  parse: Parser) -> web.StreamResponse:
    config = state.config
    raw = await request.read()
    digest = hashlib.sha1(raw).digest()
    if digest in state.answered:
        state.stats.resent_after_ok += 1
    failed_at = state.failed_at.pop(digest, None)
    if failed_at is not None:
        state.stats.record_retry((state.clock() - failed_at) * 1000.0)

    item = state.script.popleft() if state.script else None
    if item is not None and item.kind not in ("ok", "cut-stream"):
        if state.has_delay and item.kind != "hang":
            await asyncio.sleep(state.delay())
        return await _fault(request, state, dialect, item, None, {}, digest)

    if state.strict is not None:
        refused = _enforce_strict(state, dialect, state.strict)
        if refused is not None:
            return refused
    if config.require_key is not None and not _has_key(request, config.require_key):
        return state.reply(401, wire.error_body(dialect, 401))
    if config.quota_exhausted:
        return state.reply(429, wire.quota_body(dialect))

    try:
        plan = parse(orjson.loads(raw), request, state)
    except orjson.JSONDecodeError:
        return state.reply(400, wire.error_body(
            dialect, 400, "We could not parse the JSON body of your request."))
    except Invalid as exc:
        return state.reply(exc.status, wire.error_body(
            dialect, exc.status, exc.message, param=exc.param, code=exc.code))

    headers: dict[str, str] = {}
    if state.rpm is not None or state.tpm is not None:
        refused = _enforce(state, dialect, plan, headers)
        if refused is not None:
            return refused

    fault = item
    if fault is None and state.fault_rate:
        fault = state.draw_fault()
    if state.has_delay and (fault is None or fault.kind != "hang"):
        await asyncio.sleep(state.delay())
    if fault is not None and fault.kind != "ok":
        return await _fault(request, state, dialect, fault, plan, headers, digest)
    return await _send(request, state, plan, headers, digest)


async def _send(request: web.Request, state: _State, plan: Plan, headers: dict[str, str],
                digest: bytes | None, cut: bool = False) -> web.StreamResponse:
    """Send the planned answer; ``cut`` sends about half of it and closes the connection."""
    stats = state.stats
    if plan.frames is None and not cut:
        response = state.reply(200, plan.body, _JSON, headers)
        if digest is not None:
            state.answered.add(digest)
        stats.record_ok(plan.model, plan.prompt_tokens, plan.completion_tokens)
        return response

    stats.by_status[200] = stats.by_status.get(200, 0) + 1
    if plan.frames is None:
        resp = web.StreamResponse(status=200, headers={"Content-Type": _JSON, **headers})
        resp.content_length = len(plan.body)
        payload = plan.body[: len(plan.body) // 2]
    else:
        resp = web.StreamResponse(status=200, headers={
            "Content-Type": _SSE, "Cache-Control": "no-cache", **headers})
        frames = plan.frames
        payload = b"".join(frames[: max(1, len(frames) // 2)] if cut else frames)
    try:
        await resp.prepare(request)
        await resp.write(payload)
        if cut:
            _abort(request)
            return resp
        await resp.write_eof()
    except ConnectionResetError:  # the client went away mid-answer: not an ok answer
        return resp
    if digest is not None:
        state.answered.add(digest)
    stats.record_ok(plan.model, plan.prompt_tokens, plan.completion_tokens)
    return resp


async def _fault(request: web.Request, state: _State, dialect: wire.Dialect, item: ScriptItem,
                 plan: Plan | None, headers: dict[str, str],
                 digest: bytes) -> web.StreamResponse:
    kind = item.kind
    status = item.status or (529 if dialect == "anthropic" else 500)
    state.stats.count_fault(str(status) if kind in ("status", "fail") else kind)
    if kind in ("status", "fail") and status >= 500:
        state.failed_at[digest] = state.clock()
    if kind in _ABORT:
        if kind == "hang":
            await _hang(state)
        _abort(request)
        return web.Response(status=204)  # never sent: the connection is gone
    if kind == "invalid-json":
        return state.reply(200, wire.INVALID_JSON_BODY, _JSON, headers)
    if kind == "quota":
        return state.reply(429, wire.quota_body(dialect))
    if kind == "cut-stream" and plan is not None:
        return await _send(request, state, plan, headers, None, cut=True)
    if 520 <= status <= 524:
        return state.reply(status, wire.cloudflare_page(status), _HTML)
    extra = dict(headers)
    delay = item.retry_after
    if item.retry_after_ms is not None and delay is None:
        delay = item.retry_after_ms / 1000.0
    if dialect != "gemini":
        if item.retry_after is not None:
            extra["retry-after"] = _seconds(item.retry_after)
        if item.retry_after_ms is not None:
            extra["retry-after-ms"] = _seconds(item.retry_after_ms)
    body = wire.error_body(dialect, status, retry_delay=delay if dialect == "gemini" else None)
    return state.reply(status, body, _JSON, extra)


async def _hang(state: _State) -> None:
    """Wait until the app shuts down, the client goes away (the handler is then cancelled,
    when the runner cancels handlers) or HANG_MAX_S passes."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(state.closing.wait(), HANG_MAX_S)


def _abort(request: web.Request) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()


def _has_key(request: web.Request, key: str) -> bool:
    expected = key.encode()
    headers = request.headers
    candidates = [headers.get("x-api-key"), headers.get("x-goog-api-key"),
                  headers.get("api-key"), request.query.get("key")]
    auth = headers.get("Authorization", "")
    if auth[:7].lower() == "bearer ":
        candidates.append(auth[7:].strip())
    return any(c is not None and hmac.compare_digest(c.encode(), expected) for c in candidates)


def _enforce(state: _State, dialect: wire.Dialect, plan: Plan,
             headers: dict[str, str]) -> web.Response | None:
    """Admit the request into the current slice, or answer the 429; fills ``headers``."""
    now = state.clock()
    rpm, tpm = state.rpm, state.tpm
    fits_requests = rpm is None or rpm.fits(now, 1)
    fits_tokens = tpm is None or tpm.fits(now, plan.limit_tokens)
    if fits_requests and fits_tokens:
        if rpm is not None:
            rpm.take(now, 1)
        if tpm is not None:
            tpm.take(now, plan.limit_tokens)
    headers.update(_limit_headers(dialect, now, rpm, tpm))
    if fits_requests and fits_tokens:
        return None

    state.stats.rate_limited += 1
    waits = []
    if not fits_requests and rpm is not None:
        waits.append(rpm.retry_after(now, 1))
    if not fits_tokens and tpm is not None:
        waits.append(tpm.retry_after(now, plan.limit_tokens))
    wait = max(waits)
    which, short, limiter, amount = (
        ("requests", "RPM", rpm, 1) if not fits_requests else
        ("tokens", "TPM", tpm, plan.limit_tokens))
    assert limiter is not None
    message = (f"Rate limit reached for {plan.model} in organization org-simulator on "
               f"{which} per min ({short}): Limit {_number(limiter.view(now).limit)}, "
               f"Requested {amount}. Please try again in {math.ceil(wait * 1000)}ms.")
    if dialect == "gemini":
        body = wire.error_body("gemini", 429, message, retry_delay=wait)
    else:
        headers["retry-after"] = _seconds(wait)
        if dialect == "openai":
            headers["retry-after-ms"] = str(math.ceil(wait * 1000))
        body = wire.error_body(dialect, 429, message, type_=which if dialect == "openai"
                               else None, code="rate_limit_exceeded")
    return state.reply(429, body, _JSON, headers)


def _enforce_strict(state: _State, dialect: wire.Dialect,
                    limiter: IntervalLimiter) -> web.Response | None:
    """Admit the request through the gateway's interval limiter, or answer its 429."""
    stats = state.stats
    if limiter.try_take(state.clock()):
        stats.strict_admitted += 1
        return None
    stats.strict_refused += 1
    retry_after = state.config.strict_retry_after
    message = ("Too many requests: the gateway admits one request per "
               f"{_seconds(limiter.interval)} s.")
    headers: dict[str, str] = {}
    if retry_after is not None and dialect != "gemini":
        headers["retry-after"] = _seconds(retry_after)
    body = wire.error_body(dialect, 429, message, code="rate_limit_exceeded",
                           retry_delay=retry_after if dialect == "gemini" else None)
    return state.reply(429, body, _JSON, headers)


def _limit_headers(dialect: wire.Dialect, now: float, rpm: SliceLimiter | None,
                   tpm: SliceLimiter | None) -> dict[str, str]:
    out: dict[str, str] = {}
    if dialect == "gemini":
        return out
    for name, limiter in (("requests", rpm), ("tokens", tpm)):
        if limiter is None:
            continue
        view = limiter.view(now)
        if dialect == "anthropic":
            reset = datetime.now(UTC) + timedelta(seconds=view.reset)
            out[f"anthropic-ratelimit-{name}-limit"] = _number(view.limit)
            out[f"anthropic-ratelimit-{name}-remaining"] = str(view.remaining)
            out[f"anthropic-ratelimit-{name}-reset"] = reset.isoformat(
                timespec="seconds").replace("+00:00", "Z")
        else:
            out[f"x-ratelimit-limit-{name}"] = _number(view.limit)
            out[f"x-ratelimit-remaining-{name}"] = str(view.remaining)
            out[f"x-ratelimit-reset-{name}"] = f"{math.ceil(view.reset * 1000)}ms"
    return out


def _seconds(value: float) -> str:
    """A header number: ``2``, ``0.35`` (milliseconds precision, no trailing zeros)."""
    return f"{value:.3f}".rstrip("0").rstrip(".") or "0"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


# --- service routes ---------------------------------------------------------------------


async def _list_models(request: web.Request) -> web.Response:
    stats = request.app[STATS_KEY]
    names = sorted({DEFAULT_MODEL, *stats.usage_by_model})
    data = [{"id": name, "object": "model", "created": 0, "owned_by": "batcher-simulator"}
            for name in names]
    return web.Response(body=orjson.dumps({"object": "list", "data": data}),
                        content_type=_JSON)


async def _not_found(request: web.Request) -> web.Response:
    body = orjson.dumps({"error": {
        "message": f"Invalid URL ({request.method} {request.path})",
        "type": "invalid_request_error", "param": None, "code": None}})
    return web.Response(status=404, body=body, content_type=_JSON)


async def _get_stats(request: web.Request) -> web.Response:
    return web.Response(body=orjson.dumps(request.app[STATS_KEY].as_dict()),
                        content_type=_JSON)
