"""The Anthropic Messages adapter: ``POST {base}/messages``, plain or streamed.

Finish reasons are normalised with :data:`STOP_REASONS`; tool_use blocks are kept as they
came, as a JSON list, in ``Answer.tool_calls``. Usage: ``prompt_tokens`` counts every input
token (``input_tokens`` + ``cache_read_input_tokens`` + ``cache_creation_input_tokens``),
``cached_tokens`` the cache reads.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

import orjson

from batcher.errors import (
    BadRequest,
    InputError,
    InvalidResponse,
    ProviderError,
    QuotaExhausted,
    ServerError,
    StreamCut,
)
from batcher.providers.base import (
    as_int,
    checked,
    decode_json,
    error_for_status,
    error_from_object,
    error_tokens,
    is_quota_error,
    join_url,
    json_text,
    looks_like_json,
    merge_headers,
    merged_params,
    normalise_finish_reason,
    register,
    require_model,
    schema_conflict,
    snippet,
    user_messages,
)
from batcher.providers.sse import parse_sse
from batcher.schema import SCHEMA_PARAMS
from batcher.types import JSON, Answer, HttpRequest, HttpResponse, RequestContext, RequestRow, Usage

ANTHROPIC_VERSION = "2023-06-01"
"""The ``anthropic-version`` header sent unless the user gives their own."""

DEFAULT_ANTHROPIC_MAX_TOKENS = 1024
"""``max_tokens`` is required by the Messages API; this is sent when no param gives it."""

STOP_REASONS: Mapping[str, str] = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}
"""Anthropic ``stop_reason`` → normalised value; others become ``"stop"`` (raw kept)."""

CREDIT_TOO_LOW = "credit balance is too low"
"""Last resort, documented: Anthropic has answered an exhausted balance as a 400
``invalid_request_error`` whose only distinguishing mark is this message text. Newer answers
carry the ``billing_error`` type, which is checked first; the text is only consulted for a
400 invalid_request_error, so a typo in it can at worst fail rows instead of aborting."""

_PARAM_RENAMES = {"max_completion_tokens": "max_tokens", "stop": "stop_sequences"}


# --- request ---------------------------------------------------------------------------


def split_system(messages: list[dict[str, JSON]]) -> tuple[JSON, list[dict[str, JSON]]]:
    """(system, the rest): leading ``system``/``developer`` messages become the top-level
    system (text joined by blank lines; a lone one keeps its content as given)."""
    leading: list[JSON] = []
    while messages and messages[0].get("role") in ("system", "developer"):
        leading.append(messages[0].get("content"))
        messages = messages[1:]
    if not leading:
        return None, messages
    if len(leading) == 1:
        return leading[0], messages
    return "\n\n".join(str(c) for c in leading), messages


def anthropic_params(params: Mapping[str, JSON]) -> dict[str, JSON]:
    """OpenAI-style names mapped to the Messages API's: ``max_completion_tokens`` →
    ``max_tokens``, ``stop`` → ``stop_sequences`` (a string becomes a one-item list);
    ``stream_options`` (OpenAI only) is dropped; everything else is passed as given."""
    out: dict[str, JSON] = {}
    for key, value in params.items():
        if key == "stream_options":
            continue
        name = _PARAM_RENAMES.get(key, key)
        if name == "stop_sequences" and isinstance(value, str):
            value = [value]
        if name in out and key in _PARAM_RENAMES:
            continue  # the API's own name, when also given, wins
        out[name] = value
    return out


class AnthropicProvider:
    """``POST {base}/messages`` with ``x-api-key`` and ``anthropic-version`` headers."""

    name = "anthropic"

    def build_request(self, row: RequestRow, ctx: RequestContext) -> HttpRequest:
        """Body: model, max_tokens (default :data:`DEFAULT_ANTHROPIC_MAX_TOKENS`), messages
        with any leading system message moved to ``system`` (else ``ctx.system``), params."""
        if row.shape == "batch":
            raise InputError(row.source, "OpenAI Batch lines cannot be sent to the anthropic "
                             "endpoint", row.line, "url")
        model = require_model(row, ctx)
        system, messages = split_system(user_messages(row))
        if system is None:
            system = ctx.system
        if not messages:
            raise InputError(row.source, "no user message to send", row.line, "messages")
        params = anthropic_params(merged_params(row, ctx))
        body: dict[str, JSON] = {"model": model, "max_tokens": DEFAULT_ANTHROPIC_MAX_TOKENS}
        body.update({k: v for k, v in params.items() if k not in ("model", "messages")})
        body["messages"] = messages
        if system:
            body["system"] = system
        if ctx.response_schema is not None:
            # Structured output as the Messages API does it: one tool, forced; its input is
            # the answer.
            schema_conflict(row, params, *SCHEMA_PARAMS["anthropic"])
            body["tools"] = [ctx.response_schema.anthropic_tool()]
            body["tool_choice"] = ctx.response_schema.anthropic_tool_choice()
        headers = {"content-type": "application/json", "anthropic-version": ANTHROPIC_VERSION}
        if ctx.api_key:
            headers["x-api-key"] = ctx.api_key
        headers = merge_headers(headers, ctx.headers)  # the user's anthropic-version wins
        return HttpRequest(
            method="POST",
            url=join_url(ctx.base_url, "/messages"),
            headers=headers,
            body=orjson.dumps(body),
            model=model,
            stream=body.get("stream") is True,
            max_tokens=as_int(body.get("max_tokens")),
            response_schema=ctx.response_schema,
        )

    def parse_response(self, request: HttpRequest, response: HttpResponse) -> Answer:
        if not 200 <= response.status < 300:
            raise anthropic_error(response)
        if request.stream and not looks_like_json(response):
            answer = parse_anthropic_stream(response)
        else:
            answer = parse_anthropic_json(decode_json(response), response)
        if request.response_schema is None:
            return answer
        return structured_answer(answer, request, response.status)


def structured_answer(answer: Answer, request: HttpRequest, status: int) -> Answer:
    """The answer of a --response-format request: the forced tool call's ``input`` as the
    output (checked against the schema), no ``tool_calls``, and finish ``stop`` for the
    ``tool_use`` stop the forced tool makes (the raw value is kept). Without that tool call
    the answer's text is checked instead (and fails, unless the model wrote the JSON)."""
    assert request.response_schema is not None
    name = request.response_schema.name
    blocks = orjson.loads(answer.tool_calls) if answer.tool_calls else []
    call = next((b for b in blocks if isinstance(b, dict) and b.get("name") == name), None)
    if call is None:
        return checked(answer, request, status)
    finish = "stop" if answer.finish_reason == "tool_calls" else answer.finish_reason
    answer = replace(answer, finish_reason=finish, tool_calls=None)
    given = call.get("input")
    # A string is the partial JSON of an input the token limit cut (see the stream parser).
    return checked(answer, request, status,
                   text=given if isinstance(given, str) else json_text(given))


# --- errors ----------------------------------------------------------------------------


def _error_object(body: bytes) -> dict[str, JSON]:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return {}
    err = data.get("error") if isinstance(data, dict) else None
    return err if isinstance(err, dict) else {}


def anthropic_error(response: HttpResponse) -> ProviderError:
    """The typed error of a non-2xx Messages answer: by status as everywhere, refined by the
    body's ``error.type``: ``billing_error`` → QuotaExhausted, ``overloaded_error`` (which
    gateways pass on with other statuses) → ServerError, and the credit-balance last resort
    (see :data:`CREDIT_TOO_LOW`)."""
    error = error_for_status(response)
    err = _error_object(response.body)
    tokens = error_tokens(err)
    if is_quota_error(tokens):
        return QuotaExhausted(error.message, status=response.status)
    if "overloaded_error" in tokens and not isinstance(error, ServerError):
        return ServerError(error.message, status=response.status)
    message = err.get("message")
    if (isinstance(error, BadRequest) and response.status == 400
            and "invalid_request_error" in tokens
            and isinstance(message, str) and CREDIT_TOO_LOW in message.lower()):
        return QuotaExhausted(error.message, status=response.status)
    return error


# --- parsing ---------------------------------------------------------------------------


def anthropic_usage(usage: JSON, base: Usage | None = None) -> Usage:
    """Normalised usage; fields missing from ``usage`` keep their value in ``base``."""
    if not isinstance(usage, dict):
        return base or Usage()
    prev = base or Usage()
    fresh = as_int(usage.get("input_tokens"))
    cache_read = as_int(usage.get("cache_read_input_tokens"))
    cache_write = as_int(usage.get("cache_creation_input_tokens"))
    if fresh is None and cache_read is None and cache_write is None:
        prompt = prev.prompt_tokens
        cached = prev.cached_tokens
    else:
        prompt = (fresh or 0) + (cache_read or 0) + (cache_write or 0)
        cached = cache_read if cache_read is not None else prev.cached_tokens
    completion = as_int(usage.get("output_tokens"))
    if completion is None:
        completion = prev.completion_tokens
    total = prompt + completion if prompt is not None and completion is not None else None
    return Usage(prompt, completion, total, cached, None)


def _answer(text_parts: list[str], tool_uses: Sequence[JSON], stop_reason: JSON, model: JSON,
            rid: JSON, usage: Usage) -> Answer:
    finish, raw = normalise_finish_reason(stop_reason, STOP_REASONS)
    output = "".join(text_parts) if text_parts or not tool_uses else None
    return Answer(
        output=output,
        finish_reason=finish,
        finish_reason_raw=raw,
        model=model if isinstance(model, str) else None,
        usage=usage,
        response_id=rid if isinstance(rid, str) else None,
        tool_calls=json_text(tool_uses) if tool_uses else None,
    )


def parse_anthropic_json(data: JSON, response: HttpResponse) -> Answer:
    """A non-streamed Messages answer → Answer: text blocks joined, tool_use blocks kept."""
    if isinstance(data, dict) and (data.get("type") == "error" or data.get("error")):
        raise error_from_object(data.get("error"), response)
    content = data.get("content") if isinstance(data, dict) else None
    if not isinstance(data, dict) or not isinstance(content, list):
        raise InvalidResponse(f"HTTP {response.status} answer has no content: "
                              f"{snippet(response.body)}", status=response.status)
    texts = [str(b.get("text") or "") for b in content
             if isinstance(b, dict) and b.get("type") == "text"]
    tools = [b for b in content if isinstance(b, dict) and b.get("type") == "tool_use"]
    return _answer(texts, tools, data.get("stop_reason"), data.get("model"), data.get("id"),
                   anthropic_usage(data.get("usage")))


def parse_anthropic_stream(response: HttpResponse) -> Answer:
    """A whole Messages event stream → Answer.

    Text deltas are joined per content block, ``input_json_delta`` pieces rebuild each
    tool_use block's ``input``. Without ``message_stop`` the stream was cut: InvalidResponse
    (retryable), never a truncated answer. An ``error`` event raises its typed error.
    """
    events, _clean = parse_sse(response.body)
    blocks: dict[int, dict[str, JSON]] = {}
    texts: dict[int, list[str]] = {}
    partial_json: dict[int, list[str]] = {}
    model: JSON = None
    rid: JSON = None
    stop_reason: JSON = None
    usage = Usage()
    stopped = False
    for event in events:
        if event.data.strip() == "[DONE]":  # some gateways append OpenAI's terminator
            continue
        try:
            data = orjson.loads(event.data)
        except orjson.JSONDecodeError:
            raise InvalidResponse(f"stream cut or garbled: event is not JSON: "
                                  f"{snippet(event.data.encode())}",
                                  status=response.status) from None
        if not isinstance(data, dict):
            continue
        kind = data.get("type") or event.event
        if kind == "error" or event.event == "error":
            raise error_from_object(data.get("error", data), response, where="stream error")
        if kind == "message_start" and isinstance(data.get("message"), dict):
            message = data["message"]
            model, rid = message.get("model"), message.get("id")
            usage = anthropic_usage(message.get("usage"), usage)
        elif kind == "content_block_start" and isinstance(data.get("content_block"), dict):
            index = as_int(data.get("index")) or 0
            block = dict(data["content_block"])
            blocks[index] = block
            if block.get("type") == "text":
                texts.setdefault(index, []).append(str(block.get("text") or ""))
        elif kind == "content_block_delta" and isinstance(data.get("delta"), dict):
            index = as_int(data.get("index")) or 0
            delta = data["delta"]
            if delta.get("type") == "text_delta":
                texts.setdefault(index, []).append(str(delta.get("text") or ""))
            elif delta.get("type") == "input_json_delta":
                partial_json.setdefault(index, []).append(str(delta.get("partial_json") or ""))
        elif kind == "message_delta":
            delta = data.get("delta")
            if isinstance(delta, dict) and delta.get("stop_reason"):
                stop_reason = delta["stop_reason"]
            usage = anthropic_usage(data.get("usage"), usage)
        elif kind == "message_stop":
            stopped = True
    if not stopped:
        raise StreamCut(f"stream cut: no message_stop after {len(events)} events",
                              status=response.status)
    tools: list[JSON] = []
    for index in sorted(blocks):
        block = blocks[index]
        if block.get("type") != "tool_use":
            continue
        pieces = "".join(partial_json.get(index, []))
        if pieces:
            try:
                block["input"] = orjson.loads(pieces)
            except orjson.JSONDecodeError:
                if stop_reason == "max_tokens":
                    # The token limit cut the input mid-way: an answer cut by `length`, as a
                    # cut text is; the partial JSON is kept as it came.
                    block["input"] = pieces
                else:
                    raise InvalidResponse(f"stream tool input is not JSON: {pieces[:200]}",
                                          status=response.status) from None
        tools.append(block)
    text_parts = ["".join(texts[i]) for i in sorted(texts)]
    return _answer(text_parts, tools, stop_reason, model, rid, usage)


register(AnthropicProvider())
