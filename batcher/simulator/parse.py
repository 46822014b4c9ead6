"""Request parsing, one function per endpoint: a JSON body in, a fully rendered answer out."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import orjson
from aiohttp import web

from batcher.simulator import structured, wire
from batcher.types import JSON

DEFAULT_MODEL = "sim-model"


class Context(Protocol):
    """What parsing needs from the running simulator."""

    @property
    def answer_tokens(self) -> int: ...

    @property
    def omit_stream_usage(self) -> bool: ...

    def new_id(self, prefix: str) -> str: ...

    def break_schema(self) -> int | None:
        """Whether to break this schema answer (``--rate-bad-schema``): None for no, else
        the count of answers broken so far (which way it breaks alternates)."""
        ...


class Invalid(Exception):
    """A request the endpoint refuses: answered ``status`` in the endpoint's error shape."""

    def __init__(self, message: str, param: str | None = None, *, status: int = 400,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status
        self.code = code


@dataclass(slots=True)
class Plan:
    """A parsed request and its fully rendered answer (JSON body or SSE frames)."""

    model: str
    prompt_tokens: int
    completion_tokens: int
    limit_tokens: int
    body: bytes = b""
    frames: list[bytes] | None = None


Parser = Callable[[JSON, web.Request, Context], Plan]


def _model(payload: dict[str, JSON]) -> str:
    model = payload.get("model")
    return model if isinstance(model, str) and model else DEFAULT_MODEL


def _positive_int(payload: dict[str, JSON], name: str) -> int | None:
    value = payload.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise Invalid(f"Invalid '{name}': expected an integer >= 1, got {value!r}.", name,
                      code="integer_below_min_value")
    return value


def _object(payload: JSON) -> dict[str, JSON]:
    if not isinstance(payload, dict):
        raise Invalid("The request body must be a JSON object.")
    return payload


def _answer_for(ctx: Context, prompt: str, max_tokens: int | None) -> tuple[str, bool]:
    """(answer text, truncated?) for ``prompt`` under ``max_tokens``."""
    text = wire.answer_text(prompt, ctx.answer_tokens)
    if max_tokens is not None and wire.count_tokens(text) > max_tokens:
        return wire.truncate(text, max_tokens), True
    return text, False


def _structured_answer(ctx: Context, schema: Mapping[str, JSON], prompt: str, max_tokens: int | None,
                       *, json_only: bool = False) -> tuple[str, bool]:
    """(JSON text fitting ``schema``, or broken when the simulator breaks this one; truncated?)
    under ``max_tokens``. ``json_only``: a broken answer is still JSON (a tool's input)."""
    nth = ctx.break_schema()
    if nth is None:
        text = orjson.dumps(structured.instance(schema, prompt)).decode()
    else:
        text = structured.broken(schema, prompt, 2 * nth if json_only else nth)[1]
    if max_tokens is not None and wire.count_tokens(text) > max_tokens:
        return wire.truncate(text, max_tokens), True
    return text, False


def _messages(payload: dict[str, JSON], dialect_hint: str) -> list[dict[str, JSON]]:
    messages = payload.get("messages")
    if messages is None:
        message = ("messages: Field required" if dialect_hint == "anthropic"
                   else "Missing required parameter: 'messages'.")
        raise Invalid(message, "messages", code="missing_required_parameter")
    if (not isinstance(messages, list) or not messages
            or not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages)):
        raise Invalid("Invalid 'messages': expected a non-empty array of message objects "
                      "with a 'role'.", "messages", code="invalid_type")
    return messages


def _last_user(messages: list[dict[str, JSON]], texts: list[str]) -> str:
    for message, text in zip(reversed(messages), reversed(texts), strict=True):
        if message["role"] == "user":
            return text
    return texts[-1]


def _wants_usage(payload: dict[str, JSON], ctx: Context) -> bool:
    """Whether a stream ends with a usage chunk: asked for, and not omitted by the config."""
    options = payload.get("stream_options")
    return (isinstance(options, dict) and options.get("include_usage") is True
            and not ctx.omit_stream_usage)


def parse_chat(payload: JSON, request: web.Request, ctx: Context) -> Plan:
    body = _object(payload)
    messages = _messages(body, "openai")
    texts = [wire.content_text(m.get("content")) for m in messages]
    max_tokens = _positive_int(body, "max_completion_tokens")
    if max_tokens is None:
        max_tokens = _positive_int(body, "max_tokens")
    model = _model(body)
    prompt_tokens = wire.count_tokens("".join(texts))
    schema = structured.chat_schema(body)
    if schema is not None:
        content, cut = _structured_answer(ctx, schema, _last_user(messages, texts), max_tokens)
    else:
        content, cut = _answer_for(ctx, _last_user(messages, texts), max_tokens)
    finish = "length" if cut else "stop"
    completion_tokens = wire.count_tokens(content)
    plan = Plan(model, prompt_tokens, completion_tokens,
                 prompt_tokens + (max_tokens if max_tokens is not None else completion_tokens))
    rid = ctx.new_id("chatcmpl-")
    created = int(time.time())
    if body.get("stream") is True:
        plan.frames = wire.chat_stream_frames(rid, created, model, content, finish,
                                              prompt_tokens, completion_tokens,
                                              _wants_usage(body, ctx))
    else:
        plan.body = orjson.dumps(wire.chat_completion(rid, created, model, content, finish,
                                                      prompt_tokens, completion_tokens))
    return plan


def parse_completions(payload: JSON, request: web.Request, ctx: Context) -> Plan:
    body = _object(payload)
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if (not isinstance(prompts, list) or not prompts
            or not all(isinstance(p, str) for p in prompts)):
        raise Invalid("Invalid 'prompt': expected a string or an array of strings."
                      if prompt is not None else "Missing required parameter: 'prompt'.",
                      "prompt")
    max_tokens = _positive_int(body, "max_tokens")
    model = _model(body)
    texts: list[tuple[str, str]] = []
    for text in prompts:
        answer, cut = _answer_for(ctx, text, max_tokens)
        texts.append((answer, "length" if cut else "stop"))
    prompt_tokens = wire.count_tokens("".join(prompts))
    completion_tokens = sum(wire.count_tokens(t) for t, _ in texts)
    limit = prompt_tokens + (max_tokens * len(prompts) if max_tokens is not None
                             else completion_tokens)
    plan = Plan(model, prompt_tokens, completion_tokens, limit)
    rid = ctx.new_id("cmpl-")
    created = int(time.time())
    if body.get("stream") is True:
        plan.frames = wire.completion_stream_frames(rid, created, model, texts, prompt_tokens,
                                                    completion_tokens, _wants_usage(body, ctx))
    else:
        plan.body = orjson.dumps(wire.text_completion(rid, created, model, texts,
                                                      prompt_tokens, completion_tokens))
    return plan


def parse_embeddings(payload: JSON, request: web.Request, ctx: Context) -> Plan:
    body = _object(payload)
    given = body.get("input")
    inputs = [given] if isinstance(given, str) else given
    if not isinstance(inputs, list) or not inputs or not all(isinstance(i, str) for i in inputs):
        raise Invalid("Invalid 'input': expected a string or a non-empty array of strings."
                      if given is not None else "Missing required parameter: 'input'.",
                      "input")
    dimensions = _positive_int(body, "dimensions") or 8
    if dimensions > 4096:
        raise Invalid("Invalid 'dimensions': at most 4096.", "dimensions")
    encoding = body.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise Invalid("Invalid 'encoding_format': expected 'float' or 'base64'.",
                      "encoding_format")
    vectors: list[list[float] | str] = []
    for text in inputs:
        vector = wire.embedding_vector(text, dimensions)
        vectors.append(wire.embedding_base64(vector) if encoding == "base64" else vector)
    model = _model(body)
    prompt_tokens = wire.count_tokens("".join(inputs))
    return Plan(model, prompt_tokens, 0, prompt_tokens,
                 body=orjson.dumps(wire.embeddings_response(model, vectors, prompt_tokens)))


def parse_messages(payload: JSON, request: web.Request, ctx: Context) -> Plan:
    body = _object(payload)
    if body.get("max_tokens") is None:
        raise Invalid("max_tokens: Field required", "max_tokens")
    max_tokens = _positive_int(body, "max_tokens")
    assert max_tokens is not None
    messages = _messages(body, "anthropic")
    texts = [wire.content_text(m.get("content")) for m in messages]
    system = wire.content_text(body.get("system"))
    model = _model(body)
    prompt_tokens = wire.count_tokens(system + "".join(texts))
    tool = structured.anthropic_tool(body)
    if tool is not None:
        return _tool_answer(ctx, body, tool, _last_user(messages, texts), max_tokens, model,
                            prompt_tokens)
    text, cut = _answer_for(ctx, _last_user(messages, texts), max_tokens)
    stop = "max_tokens" if cut else "end_turn"
    output_tokens = wire.count_tokens(text)
    plan = Plan(model, prompt_tokens, output_tokens, prompt_tokens + max_tokens)
    rid = ctx.new_id("msg_")
    if body.get("stream") is True:
        plan.frames = wire.anthropic_stream_frames(rid, model, text, stop, prompt_tokens,
                                                   output_tokens)
    else:
        plan.body = orjson.dumps(wire.anthropic_message(rid, model, text, stop, prompt_tokens,
                                                        output_tokens))
    return plan


def _tool_answer(ctx: Context, body: dict[str, JSON], tool: tuple[str, Mapping[str, JSON]], prompt: str,
                 max_tokens: int, model: str, prompt_tokens: int) -> Plan:
    """The answer to a forced tool: one tool_use block whose input fits its schema (or is
    broken; or, cut by max_tokens, an empty input as the API leaves an unfinished one)."""
    name, schema = tool
    text, cut = _structured_answer(ctx, schema, prompt, max_tokens, json_only=True)
    value = {} if cut else orjson.loads(text)
    stop = "max_tokens" if cut else "tool_use"
    output_tokens = wire.count_tokens(text)
    plan = Plan(model, prompt_tokens, output_tokens, prompt_tokens + max_tokens)
    rid = ctx.new_id("msg_")
    block = {"type": "tool_use", "id": ctx.new_id("toolu_"), "name": name, "input": value}
    if body.get("stream") is True:
        plan.frames = wire.anthropic_tool_frames(rid, model, block, text, stop, prompt_tokens,
                                                 output_tokens)
    else:
        message = wire.anthropic_message(rid, model, "", stop, prompt_tokens, output_tokens)
        message["content"] = [block]
        plan.body = orjson.dumps(message)
    return plan


def parse_gemini(payload: JSON, request: web.Request, ctx: Context) -> Plan:
    model, _, action = request.match_info["call"].partition(":")
    if action not in ("generateContent", "streamGenerateContent"):
        raise Invalid(f"Method not found: {action or '(none)'} (simulated).", status=404)
    body = _object(payload)
    contents = body.get("contents")
    if (not isinstance(contents, list) or not contents
            or not all(isinstance(c, dict) for c in contents)):
        raise Invalid("* GenerateContentRequest.contents: contents is not specified",
                      "contents")
    texts = [wire.parts_text(c.get("parts")) for c in contents]
    system = body.get("systemInstruction") or body.get("system_instruction")
    system_text = wire.parts_text(system.get("parts")) if isinstance(system, dict) else ""
    config = body.get("generationConfig") or body.get("generation_config") or {}
    if not isinstance(config, dict):
        raise Invalid("Invalid generationConfig.", "generationConfig")
    max_tokens = _positive_int(config, "maxOutputTokens")
    if max_tokens is None:
        max_tokens = _positive_int(config, "max_output_tokens")
    prompt = texts[-1]
    for content, text in zip(reversed(contents), reversed(texts), strict=True):
        if content.get("role", "user") == "user":
            prompt = text
            break
    prompt_tokens = wire.count_tokens(system_text + "".join(texts))
    schema = structured.gemini_schema(config)
    if schema is not None:
        text, cut = _structured_answer(ctx, schema, prompt, max_tokens)
    else:
        text, cut = _answer_for(ctx, prompt, max_tokens)
    finish = "MAX_TOKENS" if cut else "STOP"
    output_tokens = wire.count_tokens(text)
    plan = Plan(model, prompt_tokens, output_tokens,
                 prompt_tokens + (max_tokens if max_tokens is not None else output_tokens))
    rid = ctx.new_id("")
    if action == "generateContent":
        plan.body = orjson.dumps(wire.gemini_response(rid, model, text, finish, prompt_tokens,
                                                      output_tokens))
        return plan
    chunks = wire.gemini_stream_chunks(rid, model, text, finish, prompt_tokens, output_tokens)
    if request.query.get("alt") == "sse":
        plan.frames = [wire.sse(chunk) for chunk in chunks]
    else:  # without alt=sse the REST API streams one JSON array
        plan.body = orjson.dumps(chunks)
    return plan
