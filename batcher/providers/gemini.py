"""The Gemini adapter: ``POST {base}/models/{model}:generateContent`` (not streamed).

Finish reasons are normalised with :data:`FINISH_REASONS_GEMINI`. Usage:
``completion_tokens`` = ``candidatesTokenCount`` + ``thoughtsTokenCount`` (as OpenAI counts
reasoning inside completion tokens, and as both are billed as output);
``reasoning_tokens`` = ``thoughtsTokenCount``; ``cached_tokens`` = ``cachedContentTokenCount``.
"""

from __future__ import annotations

from collections.abc import Mapping

import orjson

from batcher.errors import (
    AuthError,
    InputError,
    InvalidResponse,
    ProviderError,
    QuotaExhausted,
    RateLimited,
    Retryable,
)
from batcher.providers.base import (
    as_int,
    checked,
    decode_json,
    error_for_status,
    error_from_object,
    join_url,
    json_text,
    merge_headers,
    merged_params,
    normalise_finish_reason,
    parse_duration,
    register,
    require_model,
    schema_conflict,
    snippet,
    user_messages,
)
from batcher.schema import SCHEMA_PARAMS
from batcher.types import JSON, Answer, HttpRequest, HttpResponse, RequestContext, RequestRow, Usage

FINISH_REASONS_GEMINI: Mapping[str, str] = {
    "stop": "stop",
    "max_tokens": "length",
    "safety": "content_filter",
    "recitation": "content_filter",
    "blocklist": "content_filter",
    "prohibited_content": "content_filter",
    "spii": "content_filter",
    "image_safety": "content_filter",
    "malformed_function_call": "error",
    "unexpected_tool_call": "error",
}
"""Gemini ``finishReason`` (compared lower-cased) → normalised value; any other value
(``OTHER``, ``LANGUAGE``, ``FINISH_REASON_UNSPECIFIED``, …) becomes ``"stop"``, raw kept.
``STOP`` with function-call parts becomes ``tool_calls``."""

GENERATION_CONFIG: Mapping[str, str] = {
    "max_tokens": "maxOutputTokens",
    "max_completion_tokens": "maxOutputTokens",
    "max_output_tokens": "maxOutputTokens",
    "temperature": "temperature",
    "top_p": "topP",
    "top_k": "topK",
    "stop": "stopSequences",
    "stop_sequences": "stopSequences",
    "n": "candidateCount",
    "candidate_count": "candidateCount",
    "seed": "seed",
    "presence_penalty": "presencePenalty",
    "frequency_penalty": "frequencyPenalty",
    "response_mime_type": "responseMimeType",
    "response_schema": "responseSchema",
    "thinking_config": "thinkingConfig",
}
"""Parameter names (OpenAI-style or snake_case) → ``generationConfig`` field."""

TOP_LEVEL = {
    "safetySettings": "safetySettings", "safety_settings": "safetySettings",
    "tools": "tools", "toolConfig": "toolConfig", "tool_config": "toolConfig",
    "cachedContent": "cachedContent", "cached_content": "cachedContent",
    "labels": "labels",
}
"""Parameters that belong at the top of the body, not in ``generationConfig``."""

IGNORED_PARAMS = frozenset({"stream", "stream_options"})
"""Streaming is not used for Gemini: the request is always ``generateContent``."""

RETRY_INFO_TYPE = "type.googleapis.com/google.rpc.RetryInfo"
ERROR_INFO_TYPE = "type.googleapis.com/google.rpc.ErrorInfo"

AUTH_REASONS = frozenset({"API_KEY_INVALID", "API_KEY_EXPIRED", "API_KEY_SERVICE_BLOCKED"})
"""ErrorInfo reasons that mean the key is bad. Gemini answers an invalid key with HTTP 400
INVALID_ARGUMENT; without this every row would fail one by one instead of the job aborting."""


# --- request ---------------------------------------------------------------------------


def _parts(content: JSON, row: RequestRow) -> list[JSON]:
    """Gemini parts of one message's content: a string, or a list of text parts (OpenAI
    ``{"type": "text"}`` or already Gemini-shaped parts)."""
    if isinstance(content, str):
        return [{"text": content}]
    if isinstance(content, list):
        parts: list[JSON] = []
        for part in content:
            if isinstance(part, str):
                parts.append({"text": part})
            elif isinstance(part, dict) and part.get("type") == "text":
                parts.append({"text": part.get("text", "")})
            elif isinstance(part, dict) and "type" not in part:
                parts.append(part)  # already a Gemini part (text, inlineData, fileData, …)
            else:
                raise InputError(row.source, f"message part {part!r:.80} cannot be sent to "
                                 "gemini", row.line, "messages")
        return parts
    raise InputError(row.source, "message content must be text or a list of parts",
                     row.line, "messages")


def gemini_contents(row: RequestRow) -> tuple[list[JSON] | None, list[JSON]]:
    """(systemInstruction parts or None, contents) from a row's prompt or messages.

    Roles: ``user`` stays, ``assistant``/``model`` → ``model``; leading ``system`` or
    ``developer`` messages become the system instruction; any other role is an InputError.
    """
    messages = user_messages(row)
    system: list[JSON] = []
    while messages and messages[0].get("role") in ("system", "developer"):
        system.extend(_parts(messages[0].get("content"), row))
        messages = messages[1:]
    contents: list[JSON] = []
    for message in messages:
        role = message.get("role")
        if role not in ("user", "assistant", "model"):
            raise InputError(row.source, f"role {role!r} cannot be sent to gemini "
                             "(user, assistant/model, and a leading system only)",
                             row.line, "messages")
        parts = message["parts"] if isinstance(message.get("parts"), list) \
            else _parts(message.get("content"), row)
        contents.append({"role": "user" if role == "user" else "model", "parts": parts})
    if not contents:
        raise InputError(row.source, "no user message to send", row.line, "messages")
    return (system or None), contents


def gemini_body_params(params: Mapping[str, JSON]) -> tuple[dict[str, JSON], dict[str, JSON]]:
    """(generationConfig, top-level fields) from the merged params. A ``generationConfig``
    param is merged in as given; unknown names go into generationConfig as given (the API
    accepts both camelCase and snake_case field names)."""
    config: dict[str, JSON] = {}
    top: dict[str, JSON] = {}
    for key, value in params.items():
        if key in IGNORED_PARAMS:
            continue
        if key in ("generationConfig", "generation_config") and isinstance(value, dict):
            config.update(value)
        elif key in TOP_LEVEL:
            top[TOP_LEVEL[key]] = value
        else:
            name = GENERATION_CONFIG.get(key, key)
            if name == "stopSequences" and isinstance(value, str):
                value = [value]
            config[name] = value
    return config, top


class GeminiProvider:
    """``POST {base}/models/{model}:generateContent`` with the ``x-goog-api-key`` header."""

    name = "gemini"

    def build_request(self, row: RequestRow, ctx: RequestContext) -> HttpRequest:
        if row.shape == "batch":
            raise InputError(row.source, "OpenAI Batch lines cannot be sent to the gemini "
                             "endpoint", row.line, "url")
        model = require_model(row, ctx).removeprefix("models/")
        system, contents = gemini_contents(row)
        if system is None and ctx.system:
            system = [{"text": ctx.system}]
        config, top = gemini_body_params(merged_params(row, ctx))
        if ctx.response_schema is not None:
            schema_conflict(row, config, *SCHEMA_PARAMS["gemini"])
            config["responseMimeType"] = "application/json"
            config["responseSchema"] = ctx.response_schema.gemini_schema()
        body: dict[str, JSON] = {"contents": contents}
        if system:
            body["systemInstruction"] = {"parts": system}
        if config:
            body["generationConfig"] = config
        body.update(top)
        headers = {"Content-Type": "application/json"}
        if ctx.api_key:
            headers["x-goog-api-key"] = ctx.api_key
        return HttpRequest(
            method="POST",
            url=join_url(ctx.base_url, f"/models/{model}:generateContent"),
            headers=merge_headers(headers, ctx.headers),
            body=orjson.dumps(body),
            model=model,
            stream=False,
            max_tokens=as_int(config.get("maxOutputTokens")),
            response_schema=ctx.response_schema,
        )

    def parse_response(self, request: HttpRequest, response: HttpResponse) -> Answer:
        if not 200 <= response.status < 300:
            raise gemini_error(response)
        data = decode_json(response)
        if isinstance(data, list) and len(data) == 1:
            data = data[0]  # some gateways wrap the answer in a one-item array
        return checked(parse_gemini_json(data, response), request, response.status)


# --- errors ----------------------------------------------------------------------------


def retry_info_seconds(err: JSON) -> float | None:
    """The ``retryDelay`` of a google.rpc.RetryInfo detail (``"2s"``, ``"1.5s"``), seconds."""
    details = err.get("details") if isinstance(err, dict) else None
    for detail in details if isinstance(details, list) else []:
        if isinstance(detail, dict) and detail.get("@type") == RETRY_INFO_TYPE:
            delay = detail.get("retryDelay")
            if isinstance(delay, str):
                return parse_duration(delay)
            if isinstance(delay, dict):  # the proto form {"seconds": …, "nanos": …}
                seconds = as_int(delay.get("seconds")) or 0
                return seconds + (as_int(delay.get("nanos")) or 0) / 1e9
    return None


def error_info_reasons(err: JSON) -> set[str]:
    """The ``reason`` values of the google.rpc.ErrorInfo details of an error object."""
    details = err.get("details") if isinstance(err, dict) else None
    return {str(d.get("reason")) for d in (details if isinstance(details, list) else [])
            if isinstance(d, dict) and d.get("@type") == ERROR_INFO_TYPE and d.get("reason")}


def _with_retry_info(error: ProviderError, err: JSON, response: HttpResponse) -> ProviderError:
    """A retryable error gets the server's RetryInfo delay when no header gave a wait; a bad
    key reported as ErrorInfo (see :data:`AUTH_REASONS`) becomes AuthError."""
    if error_info_reasons(err) & AUTH_REASONS and not isinstance(error, AuthError):
        return AuthError(error.message, status=error.status)
    if isinstance(error, RateLimited) and _daily_quota_spent(err):
        return QuotaExhausted(error.message, status=error.status)
    if isinstance(error, Retryable) and error.retry_after is None:
        delay = retry_info_seconds(err)
        if delay is not None:
            return type(error)(error.message, status=error.status, retry_after=delay)
    return error


def _daily_quota_spent(err: JSON) -> bool:
    """True when RESOURCE_EXHAUSTED names a per-day quota in its QuotaFailure detail and
    gives no RetryInfo: waiting minutes will not help, so the job must stop (exit 3).
    Per-minute quotas come with a RetryInfo delay and stay RateLimited."""
    if not isinstance(err, dict) or retry_info_seconds(err) is not None:
        return False
    details = err.get("details")
    for detail in details if isinstance(details, list) else []:
        if not isinstance(detail, dict) or not str(detail.get("@type", "")).endswith(
                "google.rpc.QuotaFailure"):
            continue
        violations = detail.get("violations")
        for violation in violations if isinstance(violations, list) else []:
            if not isinstance(violation, dict):
                continue
            names = f"{violation.get('quotaId', '')} {violation.get('quotaMetric', '')}".lower()
            if "perday" in names or "per_day" in names:
                return True
    return False


def gemini_error(response: HttpResponse) -> ProviderError:
    """The typed error of a non-2xx Gemini answer: by status (429 RESOURCE_EXHAUSTED →
    RateLimited, 401/403 → AuthError, 400/404 → BadRequest, 5xx → ServerError), with the
    wait from ``retry-after`` or else the body's RetryInfo; an invalid key (400 with ErrorInfo
    ``API_KEY_INVALID``) → AuthError."""
    try:
        data = orjson.loads(response.body)
    except orjson.JSONDecodeError:
        data = None
    if isinstance(data, list) and data:
        data = data[0]  # errors too may come wrapped in an array
    err = data.get("error") if isinstance(data, dict) else None
    return _with_retry_info(error_for_status(response), err, response)


# --- parsing ---------------------------------------------------------------------------


def gemini_usage(meta: JSON) -> Usage:
    if not isinstance(meta, dict):
        return Usage()
    prompt = as_int(meta.get("promptTokenCount"))
    candidates = as_int(meta.get("candidatesTokenCount"))
    thoughts = as_int(meta.get("thoughtsTokenCount"))
    completion = None if candidates is None and thoughts is None \
        else (candidates or 0) + (thoughts or 0)
    total = as_int(meta.get("totalTokenCount"))
    if total is None and prompt is not None:
        total = prompt + (completion or 0)
    return Usage(prompt, completion, total, as_int(meta.get("cachedContentTokenCount")),
                 thoughts)


def parse_gemini_json(data: JSON, response: HttpResponse) -> Answer:
    """A generateContent answer → Answer from the first candidate.

    A prompt blocked before any candidate (``promptFeedback.blockReason``) is an answer, not
    an error: empty output, finish_reason ``content_filter``, raw = the block reason.
    """
    if isinstance(data, dict) and data.get("error"):
        err = data["error"]
        raise _with_retry_info(error_from_object(err, response), err, response)
    if not isinstance(data, dict):
        raise InvalidResponse(f"HTTP {response.status} body is not a JSON object: "
                              f"{snippet(response.body)}", status=response.status)
    model_json = data.get("modelVersion")
    rid_json = data.get("responseId")
    model = model_json if isinstance(model_json, str) else None
    rid = rid_json if isinstance(rid_json, str) else None
    usage = gemini_usage(data.get("usageMetadata"))
    candidates = data.get("candidates")
    if not isinstance(candidates, list) or not candidates:
        feedback = data.get("promptFeedback")
        reason = feedback.get("blockReason") if isinstance(feedback, dict) else None
        if reason:
            return Answer(output="", finish_reason="content_filter",
                          finish_reason_raw=str(reason), model=model, usage=usage,
                          response_id=rid)
        raise InvalidResponse(f"HTTP {response.status} answer has no candidates: "
                              f"{snippet(response.body)}", status=response.status)
    candidate = candidates[0]
    if not isinstance(candidate, dict):
        raise InvalidResponse(f"HTTP {response.status} candidate is not an object",
                              status=response.status)
    content = candidate.get("content")
    parts = content.get("parts") if isinstance(content, dict) else None
    parts = parts if isinstance(parts, list) else []
    texts = [str(p["text"]) for p in parts
             if isinstance(p, dict) and "text" in p and not p.get("thought")]
    calls = [p["functionCall"] for p in parts if isinstance(p, dict) and "functionCall" in p]
    finish, raw = normalise_finish_reason(candidate.get("finishReason"), FINISH_REASONS_GEMINI)
    if calls and finish == "stop":
        finish = "tool_calls"
    return Answer(
        output="".join(texts) if texts or not calls else None,
        finish_reason=finish,
        finish_reason_raw=raw,
        model=model,
        usage=usage,
        response_id=rid,
        tool_calls=json_text(calls) if calls else None,
    )


register(GeminiProvider())
