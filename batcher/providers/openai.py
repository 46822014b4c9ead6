"""OpenAI-compatible adapters: chat completions, legacy completions and embeddings.

Also the helpers the other vendors' adapters share: header merging, usage integers,
tool-call JSON, and turning an ``{"error": …}`` object found in a body or a stream into
the typed error of :mod:`batcher.errors`.

Finish reasons are normalised with :data:`FINISH_REASONS_OPENAI`; the server's own value
is always kept in ``Answer.finish_reason_raw``.
"""

from __future__ import annotations

import base64
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import orjson

from batcher.errors import (
    InputError,
    InvalidResponse,
    ProviderError,
    QuotaExhausted,
    Retryable,
    SchemaError,
    StreamCut,
)
from batcher.providers.base import (
    QUOTA_MARKERS,
    checked,
    decode_json,
    error_for_status,
    join_url,
    merged_params,
    register,
    snippet,
)
from batcher.providers.sse import parse_sse
from batcher.schema import SCHEMA_PARAMS
from batcher.types import JSON, Answer, HttpRequest, HttpResponse, RequestContext, RequestRow, Usage

# --- finish reasons --------------------------------------------------------------------

FINISH_REASONS_OPENAI: Mapping[str, str] = {
    # the model ended on its own
    "stop": "stop",
    "eos": "stop",
    "eos_token": "stop",
    "end_turn": "stop",
    "stop_sequence": "stop",
    # a token limit cut the answer
    "length": "length",
    "max_tokens": "length",
    "model_length": "length",
    # the model asked for a tool
    "tool_calls": "tool_calls",
    "function_call": "tool_calls",
    "tool_use": "tool_calls",
    # a filter blocked or cut the answer
    "content_filter": "content_filter",
    "safety": "content_filter",
    "refusal": "content_filter",
    # the server gave up mid-answer (vLLM, some gateways)
    "error": "error",
    "abort": "error",
}
"""OpenAI-style ``finish_reason`` → normalised value. Any other value becomes ``"stop"``
(the answer did end, and the raw value stays in ``finish_reason_raw``)."""


def normalise_finish_reason(raw: JSON, table: Mapping[str, str] = FINISH_REASONS_OPENAI,
                            default: str = "stop") -> tuple[str | None, str | None]:
    """(normalised, raw) for a vendor's finish reason; (None, None) when the server gave none."""
    if raw is None or raw == "":
        return None, None
    text = str(raw)
    return table.get(text.lower(), default), text


# --- small shared helpers --------------------------------------------------------------


def as_int(value: JSON) -> int | None:
    """An integer token count, or None for anything that is not one (bools included)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def json_text(value: JSON) -> str:
    """Compact JSON text (UTF-8, not ASCII-escaped) of a decoded value."""
    return orjson.dumps(value).decode("utf-8")


def merge_headers(base: Mapping[str, str], extra: Mapping[str, str]) -> dict[str, str]:
    """``base`` with ``extra`` laid over it; names compare case-insensitively, so a user's
    ``authorization`` replaces ours rather than being sent twice."""
    merged = dict(base)
    for name, value in extra.items():
        for existing in [k for k in merged if k.lower() == name.lower()]:
            del merged[existing]
        merged[name] = value
    return merged


def has_header(headers: Mapping[str, str], name: str) -> bool:
    return any(k.lower() == name.lower() for k in headers)


def param_max_tokens(params: Mapping[str, JSON]) -> int | None:
    """The answer-length cap the user asked for, whatever the vendor calls it."""
    for key in ("max_tokens", "max_completion_tokens", "max_output_tokens", "maxOutputTokens"):
        value = as_int(params.get(key))
        if value is not None:
            return value
    return None


def require_model(row: RequestRow, ctx: RequestContext, given: JSON = None) -> str:
    """The model for a row: ``given`` (e.g. a Batch body's), the row's, then the job's."""
    model = given or row.model or ctx.model
    if not model or not isinstance(model, str):
        raise InputError(row.source, "no model: give --model or a per-row model", row.line,
                         "model")
    return model


def user_messages(row: RequestRow) -> list[dict[str, JSON]]:
    """The row's chat messages: as given, or its prompt as one user message."""
    if row.messages is not None:
        return [dict(m) for m in row.messages]
    if row.prompt is None:
        raise InputError(row.source, "row has neither prompt nor messages", row.line, "prompt")
    return [{"role": "user", "content": row.prompt}]


# --- errors inside bodies --------------------------------------------------------------

QUOTA_CODES = frozenset({
    "insufficient_quota",
    "insufficient_user_quota",  # one-api/new-api gateways
    "billing_hard_limit_reached",
    "billing_not_active",
    "billing_error",  # Anthropic 402
    "quota_exceeded",
})
"""Error codes/types meaning the account has no credit; such an error aborts the job."""

ERROR_CODE_STATUS: Mapping[str, int] = {
    # rate limits
    "rate_limit_exceeded": 429, "rate_limit_error": 429, "rate_limited": 429,
    "too_many_requests": 429, "resource_exhausted": 429,
    # authentication / permission
    "invalid_api_key": 401, "authentication_error": 401, "unauthenticated": 401,
    "invalid_authentication": 401, "unauthorized": 401,
    "permission_error": 403, "permission_denied": 403, "access_denied": 403, "forbidden": 403,
    # the request itself
    "invalid_request_error": 400, "invalid_argument": 400, "bad_request": 400,
    "context_length_exceeded": 400, "invalid_value": 400, "failed_precondition": 400,
    "not_found_error": 404, "not_found": 404, "model_not_found": 404,
    "request_too_large": 413,
    # the server
    "server_error": 500, "api_error": 500, "internal": 500, "internal_error": 500,
    "internal_server_error": 500, "unavailable": 503, "service_unavailable": 503,
    "overloaded_error": 529, "overloaded": 529,
    "timeout": 504, "timeout_error": 504, "deadline_exceeded": 504,
}
"""Machine error codes/types (OpenAI, Anthropic, Gemini and gateways) → the HTTP status they
stand for. Used when an error object arrives with a 2xx status (in a body or a stream)."""

UNKNOWN_ERROR_STATUS = 500
"""An error object whose code we do not know is treated as a server fault (retried, bounded
by --max-attempts) rather than silently failing the row."""


def error_tokens(err: Mapping[str, JSON]) -> list[str]:
    """The machine identifiers of an error object (code, type, status), lower-cased."""
    return [str(err[k]).strip().lower() for k in ("code", "type", "status")
            if isinstance(err.get(k), str | int) and not isinstance(err.get(k), bool)]


def is_quota_error(tokens: list[str]) -> bool:
    return any(t in QUOTA_CODES or any(m in t for m in QUOTA_MARKERS) for t in tokens)


def status_for_error(err: Mapping[str, JSON]) -> int:
    """The HTTP status an error object stands for: a numeric code or status (400–599) first,
    then the known codes of :data:`ERROR_CODE_STATUS`, else :data:`UNKNOWN_ERROR_STATUS`."""
    for key in ("code", "status"):
        value = err.get(key)
        number = int(value) if isinstance(value, str) and value.isdigit() else as_int(value)
        if number is not None and 400 <= number <= 599:
            return number
    for token in error_tokens(err):
        if token in ERROR_CODE_STATUS:
            return ERROR_CODE_STATUS[token]
    return UNKNOWN_ERROR_STATUS


def retag(error: ProviderError, message: str, status: int | None) -> ProviderError:
    """The same error class with another message and HTTP status (retry advice kept)."""
    if isinstance(error, Retryable):
        return type(error)(message, status=status, retry_after=error.retry_after)
    return type(error)(message, status=status)


def error_message(err: Mapping[str, JSON], fallback: bytes = b"") -> str:
    message = err.get("message")
    if isinstance(message, str) and message:
        return " ".join(message.split())[:300]
    return snippet(fallback or orjson.dumps(err))


def error_from_object(err: JSON, response: HttpResponse,
                      where: str = "error object") -> ProviderError:
    """The typed error for an ``{"error": …}`` object found in a 2xx body or a stream.

    The class is decided by the object's machine code (never by its message): quota codes
    → QuotaExhausted; otherwise the status from :func:`status_for_error`, classed as
    :func:`batcher.providers.base.error_for_status` would class that status.
    ``status`` on the error stays the real HTTP status of the response.
    """
    if not isinstance(err, Mapping):
        text = str(err) if err is not None else "unknown error"
        err = {"message": text}
    tokens = error_tokens(err)
    message = f"HTTP {response.status} {where}: {error_message(err)}"
    if is_quota_error(tokens):
        return QuotaExhausted(message, status=response.status)
    synthetic = HttpResponse(status_for_error(err), response.headers,
                             orjson.dumps({"error": err}))
    return retag(error_for_status(synthetic), message, response.status)


def body_error_tokens(body: bytes) -> list[str]:
    """Error codes of a non-2xx body (empty when it is not a JSON error object)."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return []
    err = data.get("error") if isinstance(data, dict) else None
    return error_tokens(err) if isinstance(err, dict) else []


def openai_error(response: HttpResponse) -> ProviderError:
    """The typed error for a non-2xx OpenAI-style answer: :func:`error_for_status`, except
    that a quota/billing error code aborts as QuotaExhausted whatever the status (gateways
    send ``insufficient_user_quota`` with 403 or 400)."""
    error = error_for_status(response)
    if not isinstance(error, QuotaExhausted) and is_quota_error(body_error_tokens(response.body)):
        return QuotaExhausted(error.message, status=response.status)
    return error


def raise_body_error(data: JSON, response: HttpResponse) -> None:
    """Raise the typed error when a 2xx JSON body is an error object (gateways do this)."""
    if isinstance(data, dict) and data.get("error") not in (None, "", {}):
        raise error_from_object(data["error"], response)


def looks_like_json(response: HttpResponse) -> bool:
    """A body that is a JSON object rather than an event stream (a server may ignore
    ``stream: true``, or answer an error as plain JSON)."""
    return response.body.lstrip()[:1] == b"{"


# --- usage ---------------------------------------------------------------------------------


def openai_usage(usage: JSON) -> Usage:
    """Normalised usage from an OpenAI-style ``usage`` object (absent → all None)."""
    if not isinstance(usage, dict):
        return Usage()
    prompt = as_int(usage.get("prompt_tokens"))
    completion = as_int(usage.get("completion_tokens"))
    total = as_int(usage.get("total_tokens"))
    if total is None and prompt is not None:
        total = prompt + (completion or 0)
    prompt_details = usage.get("prompt_tokens_details")
    cached = as_int(prompt_details.get("cached_tokens")) if isinstance(prompt_details, dict) \
        else None
    if cached is None:
        cached = as_int(usage.get("prompt_cache_hit_tokens"))  # DeepSeek's name
    completion_details = usage.get("completion_tokens_details")
    reasoning = as_int(completion_details.get("reasoning_tokens")) \
        if isinstance(completion_details, dict) else None
    return Usage(prompt, completion, total, cached, reasoning)


# --- request building --------------------------------------------------------------------


def _headers(ctx: RequestContext) -> dict[str, str]:
    headers = {"Content-Type": "application/json"}
    if ctx.api_key:
        headers["Authorization"] = f"Bearer {ctx.api_key}"
    return merge_headers(headers, ctx.headers)


def refuse_schema(row: RequestRow, ctx: RequestContext, endpoint: str) -> None:
    """InputError for a row of a ``--response-format`` job sent where no schema can go."""
    if ctx.response_schema is not None:
        raise InputError(row.source, f"--response-format cannot be sent to the {endpoint} "
                         "endpoint (chat, anthropic and gemini take a schema)", row.line,
                         "url" if row.shape == "batch" else None)


def schema_conflict(row: RequestRow, given: Mapping[str, JSON], *names: str) -> None:
    """InputError when a row's (or the job's) params set what --response-format sets."""
    for name in names:
        if name in given:
            raise InputError(row.source, f"{name!r} is given as a parameter and "
                             "--response-format sets it too; give one of them", row.line, name)


def _response_format(row: RequestRow, ctx: RequestContext,
                     params: Mapping[str, JSON]) -> dict[str, JSON]:
    """The ``response_format`` of a --response-format job (empty without one)."""
    if ctx.response_schema is None:
        return {}
    schema_conflict(row, params, *SCHEMA_PARAMS["chat"])
    return {"response_format": ctx.response_schema.openai_response_format()}


def _batch_request(row: RequestRow, ctx: RequestContext, default_path: str) -> HttpRequest:
    """A Batch API line: its body as is (plus the model when it has none, and the job's
    ``--response-format``) to its url."""
    body = dict(row.body or {})
    model = require_model(row, ctx, body.get("model"))
    body.setdefault("model", model)
    body.update(_response_format(row, ctx, body))
    return HttpRequest(
        method="POST",
        url=join_url(ctx.base_url, row.url or default_path),
        headers=_headers(ctx),
        body=orjson.dumps(body),
        model=model,
        stream=body.get("stream") is True,
        max_tokens=param_max_tokens(body),
        response_schema=ctx.response_schema,
    )


def _request(row: RequestRow, ctx: RequestContext, path: str,
             payload: dict[str, JSON]) -> HttpRequest:
    """POST ``payload`` (model and input) plus the merged params to ``path``."""
    params = merged_params(row, ctx)
    model = require_model(row, ctx)
    body: dict[str, JSON] = {"model": model}
    body.update({k: v for k, v in params.items() if k not in payload and k != "model"})
    body.update(payload)
    body.update(_response_format(row, ctx, params))
    stream = body.get("stream") is True
    if stream and "stream_options" not in body:
        # without it OpenAI sends no usage on streams, and cost accounting would be blind
        body["stream_options"] = {"include_usage": True}
    return HttpRequest(
        method="POST",
        url=join_url(ctx.base_url, path),
        headers=_headers(ctx),
        body=orjson.dumps(body),
        model=model,
        stream=stream,
        max_tokens=param_max_tokens(params),
        response_schema=ctx.response_schema,
    )


def with_system(messages: list[dict[str, JSON]], system: str | None) -> list[dict[str, JSON]]:
    """``system`` prepended as a system message unless the messages already open with one
    (``system`` or OpenAI's newer ``developer`` role)."""
    if not system or (messages and messages[0].get("role") in ("system", "developer")):
        return messages
    return [{"role": "system", "content": system}, *messages]


# --- response parsing --------------------------------------------------------------------


def _first_choice(data: JSON,
                  response: HttpResponse) -> tuple[dict[str, JSON], dict[str, JSON]]:
    """(the body, its first choice); InvalidResponse when the body has no choices."""
    raise_body_error(data, response)
    if not isinstance(data, dict):
        raise InvalidResponse(f"HTTP {response.status} body is not a JSON object: "
                              f"{snippet(response.body)}", status=response.status)
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise InvalidResponse(f"HTTP {response.status} answer has no choices: "
                              f"{snippet(response.body)}", status=response.status)
    return data, choices[0]


def _text_content(content: JSON) -> str | None:
    """Message content as text: a string, or the text parts of a list of content parts."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(p.get("text") or "") for p in content
                       if isinstance(p, dict) and p.get("type") in ("text", "output_text"))
    return str(content)


def _answer(data: dict[str, JSON], output: str | None, finish: JSON,
            tool_calls: str | None) -> Answer:
    normalised, raw = normalise_finish_reason(finish)
    model = data.get("model")
    rid = data.get("id")
    return Answer(
        output=output,
        finish_reason=normalised,
        finish_reason_raw=raw,
        model=model if isinstance(model, str) else None,
        usage=openai_usage(data.get("usage")),
        response_id=rid if isinstance(rid, str) else None,
        tool_calls=tool_calls,
    )


def parse_chat_json(data: JSON, response: HttpResponse) -> Answer:
    """A non-streamed chat completion → Answer (first choice)."""
    body, choice = _first_choice(data, response)
    message = choice.get("message")
    if not isinstance(message, dict):
        raise InvalidResponse(f"HTTP {response.status} choice has no message: "
                              f"{snippet(response.body)}", status=response.status)
    calls: JSON = message.get("tool_calls")
    if not calls and isinstance(message.get("function_call"), dict):
        # the legacy single function call, shaped like one tool call
        calls = [{"type": "function", "function": message["function_call"]}]
    return _answer(body, _text_content(message.get("content")), choice.get("finish_reason"),
                   json_text(calls) if calls else None)


def refuse_if_refused(data: JSON, answer: Answer, status: int) -> None:
    """A structured-output answer whose message is a refusal (OpenAI puts it in
    ``message.refusal`` and leaves ``content`` null): a SchemaError that quotes it, rather than
    "no JSON". Retried like any answer that does not fit (another sample may answer)."""
    choices = data.get("choices") if isinstance(data, dict) else None
    message = choices[0].get("message") if isinstance(choices, list) and choices \
        and isinstance(choices[0], dict) else None
    refusal = message.get("refusal") if isinstance(message, dict) else None
    if isinstance(refusal, str) and refusal.strip():
        text = " ".join(refusal.split())
        raise SchemaError(f"the model refused to answer in the schema: {text[:300]}", status,
                          output=refusal, finish_reason=answer.finish_reason)


def parse_completion_json(data: JSON, response: HttpResponse) -> Answer:
    """A non-streamed legacy completion → Answer (first choice's ``text``)."""
    body, choice = _first_choice(data, response)
    text = choice.get("text")
    if not isinstance(text, str):
        raise InvalidResponse(f"HTTP {response.status} choice has no text: "
                              f"{snippet(response.body)}", status=response.status)
    return _answer(body, text, choice.get("finish_reason"), None)


@dataclass
class _ToolCall:
    """One tool call rebuilt from stream deltas."""

    id: JSON = None
    type: JSON = "function"
    name: JSON = None
    arguments: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, JSON]:
        return {"id": self.id, "type": self.type,
                "function": {"name": self.name, "arguments": "".join(self.arguments)}}


@dataclass
class _StreamState:
    """What a chat/completions stream has said so far."""

    parts: list[str] = field(default_factory=list)
    calls: dict[int, _ToolCall] = field(default_factory=dict)
    finish: JSON = None
    usage: JSON = None
    model: JSON = None
    rid: JSON = None
    done: bool = False
    saw_choice: bool = False

    def merge_tool_calls(self, deltas: JSON) -> None:
        """Tool-call deltas merged by ``index``: id/type/name set when given, arguments
        appended in arrival order."""
        if not isinstance(deltas, list):
            return
        for position, delta in enumerate(deltas):
            if not isinstance(delta, dict):
                continue
            index = as_int(delta.get("index"))
            call = self.calls.setdefault(position if index is None else index, _ToolCall())
            call.id = delta.get("id") or call.id
            call.type = delta.get("type") or call.type
            fn = delta.get("function")
            if isinstance(fn, dict):
                call.name = fn.get("name") or call.name
                if isinstance(fn.get("arguments"), str):
                    call.arguments.append(fn["arguments"])

    def tool_calls_json(self) -> str | None:
        if not self.calls:
            return None
        return json_text([self.calls[i].as_json() for i in sorted(self.calls)])


def parse_openai_stream(response: HttpResponse,
                        text_of: Callable[[dict[str, JSON]], JSON]) -> Answer:
    """A whole chat/completions event stream → Answer.

    Complete means a finish_reason was seen (a ``[DONE]`` line alone is not enough); otherwise
    the stream was cut and InvalidResponse (retryable) is raised: a truncated answer is never returned as
    ok. An error event or error object in the stream raises its typed error.
    """
    events, _clean = parse_sse(response.body)
    state = _StreamState()
    for event in events:
        data = event.data.strip()
        if data == "[DONE]":
            state.done = True
            break
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise InvalidResponse(f"stream cut or garbled: chunk is not JSON: "
                                  f"{snippet(data.encode())}", status=response.status) from None
        if event.event == "error" or (isinstance(chunk, dict) and chunk.get("error")):
            err = chunk.get("error", chunk) if isinstance(chunk, dict) else chunk
            raise error_from_object(err, response, where="stream error")
        if not isinstance(chunk, dict):
            continue
        state.model = chunk.get("model") or state.model
        state.rid = chunk.get("id") or state.rid
        if chunk.get("usage"):
            state.usage = chunk["usage"]
        choices = chunk.get("choices")
        for choice in choices if isinstance(choices, list) else []:
            if not isinstance(choice, dict) or (as_int(choice.get("index")) or 0) != 0:
                continue
            state.saw_choice = True
            text = text_of(choice)
            if isinstance(text, str):
                state.parts.append(text)
            delta = choice.get("delta")
            if isinstance(delta, dict):
                state.merge_tool_calls(delta.get("tool_calls"))
                if isinstance(delta.get("function_call"), dict):
                    state.merge_tool_calls([{"index": 0, "function": delta["function_call"]}])
            if choice.get("finish_reason"):
                state.finish = choice["finish_reason"]
    if state.finish is None:
        # A [DONE] alone is not enough: llama-cpp-python ends a stream it interrupts (a new
        # request arrived) with [DONE] and no finish_reason. Every complete answer has one.
        seen = "[DONE] but" if state.done else "no [DONE] and"
        raise StreamCut(
            f"stream cut: {seen} no finish_reason after {len(events)} events",
            status=response.status)
    if not state.saw_choice:
        raise InvalidResponse("stream ended without any choice", status=response.status)
    output = "".join(state.parts)
    calls = state.tool_calls_json()
    data_like: dict[str, JSON] = {"model": state.model, "id": state.rid, "usage": state.usage}
    return _answer(data_like, output if output or not calls else None, state.finish, calls)


def _chat_delta_text(choice: dict[str, JSON]) -> JSON:
    delta = choice.get("delta")
    return _text_content(delta.get("content")) if isinstance(delta, dict) else None


def _completion_delta_text(choice: dict[str, JSON]) -> JSON:
    return choice.get("text")


# --- the adapters ------------------------------------------------------------------------


class ChatProvider:
    """``POST {base}/chat/completions`` (OpenAI Chat Completions and compatible servers)."""

    name = "chat"
    path = "/chat/completions"

    def build_request(self, row: RequestRow, ctx: RequestContext) -> HttpRequest:
        """Body: model, messages (``ctx.system`` first unless the row opens with a system
        message), then the merged params. A Batch row's body is sent as is to its url."""
        if row.shape == "batch" or row.body is not None:
            return _batch_request(row, ctx, self.path)
        messages = with_system(user_messages(row), ctx.system)
        return _request(row, ctx, self.path, {"messages": messages})

    def parse_response(self, request: HttpRequest, response: HttpResponse) -> Answer:
        if not 200 <= response.status < 300:
            raise openai_error(response)
        if request.stream and not looks_like_json(response):
            answer = parse_openai_stream(response, _chat_delta_text)
        else:
            data = decode_json(response)
            answer = parse_chat_json(data, response)
            if request.response_schema is not None and answer.output is None:
                refuse_if_refused(data, answer, response.status)
        return checked(answer, request, response.status)


class CompletionsProvider:
    """``POST {base}/completions`` (legacy text completions): rows must carry a prompt.

    Messages rows are refused (InputError) rather than flattened: a flattening would be a
    chat template of our own invention, and the server's would differ.
    """

    name = "completions"
    path = "/completions"

    def build_request(self, row: RequestRow, ctx: RequestContext) -> HttpRequest:
        refuse_schema(row, ctx, self.name)
        if row.shape == "batch" or row.body is not None:
            return _batch_request(row, ctx, self.path)
        if row.prompt is None:
            raise InputError(row.source, "the completions endpoint needs a text prompt, "
                             "not messages (use --endpoint chat)", row.line, "prompt")
        prompt = row.prompt if not ctx.system else f"{ctx.system}\n\n{row.prompt}"
        return _request(row, ctx, self.path, {"prompt": prompt})

    def parse_response(self, request: HttpRequest, response: HttpResponse) -> Answer:
        if not 200 <= response.status < 300:
            raise openai_error(response)
        if request.stream and not looks_like_json(response):
            return parse_openai_stream(response, _completion_delta_text)
        return parse_completion_json(decode_json(response), response)


def _vector(value: JSON) -> list[float] | None:
    """An embedding as floats: a JSON list, or base64 of little-endian float32
    (``encoding_format: "base64"``)."""
    if isinstance(value, list) and all(isinstance(x, int | float) and not isinstance(x, bool)
                                       for x in value):
        return [float(x) for x in value]
    if isinstance(value, str):
        try:
            raw = base64.b64decode(value, validate=True)
        except ValueError:
            return None
        if len(raw) % 4:
            return None
        return list(struct.unpack(f"<{len(raw) // 4}f", raw))
    return None


def parse_embeddings(body: JSON) -> list[list[float]]:
    """The vectors of an embeddings answer, in input order (by each item's ``index``).

    Raises InvalidResponse when ``data`` is missing or an item has no usable vector.
    """
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list) or not data:
        raise InvalidResponse(f"embeddings answer has no data: "
                              f"{snippet(orjson.dumps(body))}")
    indexed: list[tuple[int, list[float]]] = []
    for position, item in enumerate(data):
        vector = _vector(item.get("embedding")) if isinstance(item, dict) else None
        if vector is None:
            raise InvalidResponse(f"embeddings item {position} has no usable embedding")
        index = as_int(item.get("index"))
        indexed.append((position if index is None else index, vector))
    indexed.sort(key=lambda pair: pair[0])
    return [vector for _, vector in indexed]


class EmbeddingsProvider:
    """``POST {base}/embeddings`` with one row's prompt as ``input``."""

    name = "embeddings"
    path = "/embeddings"

    def build_request(self, row: RequestRow, ctx: RequestContext) -> HttpRequest:
        refuse_schema(row, ctx, self.name)
        if row.shape == "batch" or row.body is not None:
            return _batch_request(row, ctx, self.path)
        if row.prompt is None:
            raise InputError(row.source, "the embeddings endpoint needs a text prompt, "
                             "not messages", row.line, "prompt")
        return _request(row, ctx, self.path, {"input": row.prompt})

    def build_group_request(self, rows: Sequence[RequestRow], ctx: RequestContext) -> HttpRequest:
        """Several rows' prompts as one ``input`` array (they share model and params)."""
        return _request(rows[0], ctx, self.path, {"input": [r.prompt for r in rows]})

    def parse_response(self, request: HttpRequest, response: HttpResponse) -> Answer:
        if not 200 <= response.status < 300:
            raise openai_error(response)
        data = decode_json(response)
        raise_body_error(data, response)
        try:
            vectors = parse_embeddings(data)
        except InvalidResponse as exc:
            raise InvalidResponse(exc.message, status=response.status) from None
        body: dict[str, JSON] = data  # parse_embeddings accepted it, so it is an object
        usage = openai_usage(body.get("usage"))
        model = body.get("model")
        rid = body.get("id")
        return Answer(
            output=None,
            finish_reason=None,
            finish_reason_raw=None,
            model=model if isinstance(model, str) else None,
            usage=Usage(prompt_tokens=usage.prompt_tokens, total_tokens=usage.total_tokens),
            response_id=rid if isinstance(rid, str) else None,
            embedding=vectors[0],
            embeddings=vectors,
        )


register(ChatProvider())
register(CompletionsProvider())
register(EmbeddingsProvider())
