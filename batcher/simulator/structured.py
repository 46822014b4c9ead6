"""Structured output in the simulator: read a request's JSON Schema; answer with an object fitting it, or not.

The schema is read where each vendor puts it: OpenAI ``response_format`` (``json_schema``),
an Anthropic tool forced by ``tool_choice``, Gemini ``generationConfig.responseSchema``
(whose type names are upper-case). Answers are deterministic per prompt. A broken answer
(``--rate-bad-schema``) is, by turns, text that is not JSON (the object cut in half) or an
object that misses a required property (or, with none required, has a wrong-typed one).
Honoured: types, ``enum``/``const``, ``anyOf``/``oneOf`` (one branch), ``minimum``/``maximum``,
``minItems``/``maxItems``, ``minLength``/``maxLength`` and the ``date``, ``date-time`` and
``email`` formats; not ``pattern``, ``allOf`` or ``$ref`` (a schema using them may get an
answer that does not fit, which batcher then retries, as it would a real model's).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import orjson

from batcher.types import JSON

_WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel")


def chat_schema(body: Mapping[str, JSON]) -> Mapping[str, JSON] | None:
    """The schema of an OpenAI chat request's ``response_format`` (None: no schema asked)."""
    fmt = body.get("response_format")
    if not isinstance(fmt, Mapping) or fmt.get("type") != "json_schema":
        return None
    spec = fmt.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, Mapping) else None
    return schema if isinstance(schema, Mapping) else None


def anthropic_tool(body: Mapping[str, JSON]) -> tuple[str, Mapping[str, JSON]] | None:
    """(name, input_schema) of the tool an Anthropic request forces (``tool_choice`` of type
    ``tool``, or ``any`` with a single tool); None when no tool is forced."""
    choice = body.get("tool_choice")
    tools = body.get("tools")
    if not isinstance(choice, Mapping) or not isinstance(tools, list):
        return None
    for tool in tools:
        if not isinstance(tool, Mapping) or not isinstance(tool.get("input_schema"), Mapping):
            continue
        if (choice.get("type") == "tool" and tool.get("name") == choice.get("name")) or \
                (choice.get("type") == "any" and len(tools) == 1):
            return str(tool.get("name")), tool["input_schema"]
    return None


def gemini_schema(config: Mapping[str, JSON]) -> Mapping[str, JSON] | None:
    schema = config.get("responseSchema") or config.get("response_schema")
    return schema if isinstance(schema, Mapping) else None


def instance(schema: Mapping[str, JSON], prompt: str) -> JSON:
    """A value that fits ``schema``, the same for the same prompt."""
    return _value(schema, hashlib.sha1(prompt.encode("utf-8", "surrogatepass")).digest(), "$")


def broken(schema: Mapping[str, JSON], prompt: str, nth: int) -> tuple[JSON, str]:
    """(a value, its text) that does not fit ``schema``: odd ``nth`` → text that is not JSON
    (value None), even → an object missing a required property or with a wrong type."""
    value = instance(schema, prompt)
    text = orjson.dumps(value).decode()
    if nth % 2:
        return None, text[: max(1, len(text) // 2)]
    if isinstance(value, dict):
        required = schema.get("required")
        if isinstance(required, list) and required and required[0] in value:
            value.pop(required[0])
        elif value:
            first = next(iter(value))
            value[first] = 12345 if not isinstance(value[first], int) else "not a number"
        else:
            value = []
    return value, orjson.dumps(value).decode()


def _pick(digest: bytes, path: str) -> int:
    return int.from_bytes(hashlib.sha1(digest + path.encode()).digest()[:4], "big")


def _type(node: Mapping[str, JSON]) -> str | None:
    kind = node.get("type")
    if isinstance(kind, list):
        kind = next((t for t in kind if str(t).lower() != "null"), None)
    return str(kind).lower() if kind is not None else None


def _value(node: JSON, digest: bytes, path: str) -> JSON:
    if not isinstance(node, Mapping):
        return None
    n = _pick(digest, path)
    if "const" in node:
        const: JSON = node["const"]
        return const
    enum = node.get("enum")
    if isinstance(enum, list) and enum:
        chosen: JSON = enum[n % len(enum)]
        return chosen
    for key in ("anyOf", "oneOf"):
        options = node.get(key)
        if isinstance(options, list) and options:
            return _value(options[n % len(options)], digest, f"{path}|{key}")
    kind = _type(node)
    if kind == "object" or (kind is None and isinstance(node.get("properties"), Mapping)):
        properties = node.get("properties")
        if not isinstance(properties, Mapping):
            return {}
        return {name: _value(sub, digest, f"{path}.{name}") for name, sub in properties.items()}
    if kind == "array":
        low = _int(node.get("minItems"), 1)
        high = max(low, _int(node.get("maxItems"), low + 2))
        count = low + n % (high - low + 1)
        return [_value(node.get("items"), digest, f"{path}[{i}]") for i in range(count)]
    if kind == "integer":
        low = _int(node.get("minimum"), 0)
        high = max(low, _int(node.get("maximum"), low + 100))
        return low + n % (high - low + 1)
    if kind == "number":
        bottom = _number(node.get("minimum"), 0.0)
        top = max(bottom, _number(node.get("maximum"), bottom + 1.0))
        return round(bottom + (n % 1001) / 1000 * (top - bottom), 3)
    if kind == "boolean":
        return n % 2 == 0
    if kind == "null":
        return None
    return _string(node, n)


def _string(node: Mapping[str, JSON], n: int) -> str:
    fmt = node.get("format")
    if fmt == "date":
        return f"2026-{1 + n % 12:02d}-{1 + n % 28:02d}"
    if fmt == "date-time":
        return f"2026-{1 + n % 12:02d}-{1 + n % 28:02d}T12:00:00Z"
    if fmt == "email":
        return f"{_WORDS[n % len(_WORDS)]}@example.com"
    text = f"simulated {_WORDS[n % len(_WORDS)]} {n % 1000}"
    low = _int(node.get("minLength"), 0)
    high = _int(node.get("maxLength"), max(low, len(text)))
    return text.ljust(low, "x")[:high]


def _int(value: JSON, default: int) -> int:
    if isinstance(value, str) and value.isdigit():  # Gemini's int64 fields are strings
        return int(value)
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _number(value: JSON, default: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return default
    return float(value)
