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
from types import MappingProxyType

import orjson

from batcher.errors import (
    InputError,
    InvalidResponse,
    SchemaError,
    StreamCut,
)
from batcher.providers.base import (
    as_int,
    checked,
    decode_json,
    error_from_object,
    join_url,
    json_text,
    looks_like_json,
    merge_headers,
    merged_params,
    normalise_finish_reason,
    openai_error,
    param_max_tokens,
    raise_body_error,
    register,
    require_model,
    schema_conflict,
    snippet,
    user_messages,
)
from batcher.providers.sse import parse_sse
from batcher.schema import SCHEMA_PARAMS
from batcher.types import JSON, Answer, HttpRequest, HttpResponse, RequestContext, RequestRow, Usage

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


_made_for: tuple[RequestContext | None, Mapping[str, str]] = (None, {})
"""The last context :func:`_headers` was asked about and its headers: a job asks with one
context for every row."""


def _headers(ctx: RequestContext) -> Mapping[str, str]:
    """The headers of every request of ``ctx`` (read-only: one mapping serves them all)."""
    global _made_for
    made_for, headers = _made_for
    if made_for is not ctx:
        fresh = {"Content-Type": "application/json"}
        if ctx.api_key:
            fresh["Authorization"] = f"Bearer {ctx.api_key}"
        headers = MappingProxyType(merge_headers(fresh, ctx.headers))
        _made_for = (ctx, headers)
    return headers


def refuse_schema(row: RequestRow, ctx: RequestContext, endpoint: str) -> None:
    """InputError for a row of a ``--response-format`` job sent where no schema can go."""
    if ctx.response_schema is not None:
        raise InputError(row.source, f"--response-format cannot be sent to the {endpoint} "
                         "endpoint (chat, anthropic and gemini take a schema)", row.line,
                         "url" if row.shape == "batch" else None)


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
        assert isinstance(data, dict)  # parse_embeddings accepted it, so it is an object
        body = data
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
