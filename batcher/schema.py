"""Structured output (``--response-format``): the schema, each vendor's request form, the answers' check.

One :class:`ResponseSchema` is loaded per job (a bad file or schema is a ConfigError, exit 2)
and carried by the request context to the providers, which send it in their own form:

- OpenAI chat: ``response_format: {"type": "json_schema", "json_schema": {"name", "schema",
  "strict": true}}``;
- Anthropic: one tool whose ``input_schema`` is the schema, forced by ``tool_choice``; the
  answer is that tool call's ``input``;
- Gemini: ``generationConfig.responseMimeType = "application/json"`` and ``responseSchema``,
  the schema converted to Gemini's OpenAPI subset (:func:`gemini_schema`); a feature the subset
  lacks is refused up front (ConfigError) rather than silently dropped.

Every answer is then parsed and validated with ``jsonschema`` (:meth:`ResponseSchema.check`):
an answer that is not JSON or does not fit raises :class:`~batcher.errors.SchemaError`
(retried as a fresh request); one the token limit cut raises
:class:`~batcher.errors.SchemaCut` (not retried: the same limit would cut it again).
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import orjson

# jsonschema is imported where a schema is used: most runs have none, and `batcher --help`
# should not pay for it.
if TYPE_CHECKING:
    from jsonschema.protocols import Validator

from batcher.errors import ConfigError, SchemaCut, SchemaError
from batcher.types import JSON

MESSAGE_LIMIT = 300
"""Characters of a validator message kept in an error row (messages quote the value)."""

ANTHROPIC_TOOL_DESCRIPTION = "Give the answer as this tool's input, in exactly this structure."

ANTHROPIC_TOOL_PROMPT_TOKENS = 313
"""The system prompt Anthropic adds to a request whose ``tool_choice`` forces a tool (Claude
3.5 Sonnet and later, per Anthropic's tool-use pricing table): billed as input tokens."""

SCHEMA_PARAMS: Mapping[str, tuple[str, ...]] = {
    "chat": ("response_format",),
    "anthropic": ("tools", "tool_choice"),
    "gemini": ("responseMimeType", "responseSchema", "responseJsonSchema",
               "response_mime_type", "response_schema", "response_json_schema"),
}
"""Per endpoint that takes a schema, the request parameters (Gemini: ``generationConfig``
fields) its form sets; a job or row giving one too is refused rather than overwritten."""

_NAME_CHARS = re.compile(r"[^a-zA-Z0-9_-]+")

_GEMINI_TYPES: Mapping[str, str] = {
    "string": "STRING", "number": "NUMBER", "integer": "INTEGER", "boolean": "BOOLEAN",
    "array": "ARRAY", "object": "OBJECT",
}
_GEMINI_KEPT = frozenset({
    "format", "title", "description", "nullable", "required", "propertyOrdering",
    "minimum", "maximum", "minLength", "maxLength", "pattern", "minItems", "maxItems",
    "minProperties", "maxProperties", "example", "default",
})
"""JSON Schema keywords Gemini's ``responseSchema`` (an OpenAPI 3.0 subset) has as they are."""
_ANNOTATIONS = frozenset({"$schema", "$id", "$comment", "examples"})
"""Keywords that do not shape the answer: left out of Gemini's form."""


@dataclass(frozen=True, eq=False)
class ResponseSchema:
    """A job's JSON Schema for every answer. ``name`` is what OpenAI's ``json_schema.name`` and
    the Anthropic tool are called (the schema's ``title`` or the file's name, as
    ``[a-zA-Z0-9_-]{1,64}``); ``digest`` a SHA-256 of the canonical schema, for fingerprints."""

    name: str
    schema: Mapping[str, JSON]
    source: str
    digest: str
    validator: Validator = field(repr=False)

    @classmethod
    def from_dict(cls, schema: Mapping[str, JSON], *, source: str = "schema",
                  name: str | None = None) -> ResponseSchema:
        """Check ``schema`` (a ConfigError names ``source`` and what is wrong) and build it."""
        if not isinstance(schema, Mapping):
            raise ConfigError(f"response_format (--response-format): {source} must hold a JSON "
                              f"object (a JSON Schema), got {type(schema).__name__}")
        if schema.get("type") != "object":
            raise ConfigError(
                f"response_format (--response-format): {source}: the schema's root must be "
                '"type": "object" (vendors accept only an object at the top; put a list or '
                "a value in a property)")
        from jsonschema import Draft202012Validator
        from jsonschema.exceptions import SchemaError as InvalidSchema
        from jsonschema.validators import validator_for

        cls_ = validator_for(schema, default=Draft202012Validator)
        try:
            cls_.check_schema(dict(schema))
        except InvalidSchema as exc:
            raise ConfigError(f"response_format (--response-format): {source} is not a valid "
                              f"JSON Schema: {exc.message} (at {exc.json_path})") from None
        title = schema.get("title")
        raw_name = name or (title if isinstance(title, str) and title.strip() else "response")
        clean = _NAME_CHARS.sub("_", raw_name).strip("_")[:64] or "response"
        canonical = orjson.dumps(dict(schema), option=orjson.OPT_SORT_KEYS)
        return cls(name=clean, schema=dict(schema), source=source,
                   digest=hashlib.sha256(canonical).hexdigest(), validator=cls_(schema))

    @classmethod
    def load(cls, path: Path) -> ResponseSchema:
        """The schema in JSON file ``path``; ConfigError (exit 2) when it cannot be used."""
        try:
            data = orjson.loads(path.read_bytes())
        except OSError as exc:
            raise ConfigError(f"response_format (--response-format): cannot read {path}: "
                              f"{exc.strerror or exc}") from None
        except orjson.JSONDecodeError as exc:
            raise ConfigError(f"response_format (--response-format): {path} is not valid "
                              f"JSON: {exc}") from None
        title = data.get("title") if isinstance(data, dict) else None
        return cls.from_dict(data, source=str(path),
                             name=title if isinstance(title, str) and title.strip()
                             else path.stem)

    # --- each vendor's form -------------------------------------------------------------

    def openai_response_format(self) -> dict[str, JSON]:
        """The chat ``response_format`` parameter (strict structured outputs)."""
        return {"type": "json_schema",
                "json_schema": {"name": self.name, "schema": dict(self.schema), "strict": True}}

    def anthropic_tool(self) -> dict[str, JSON]:
        """The one tool of an Anthropic request; :meth:`anthropic_tool_choice` forces it."""
        description = self.schema.get("description")
        return {"name": self.name,
                "description": description if isinstance(description, str) and description
                else ANTHROPIC_TOOL_DESCRIPTION,
                "input_schema": dict(self.schema)}

    def anthropic_tool_choice(self) -> dict[str, JSON]:
        return {"type": "tool", "name": self.name}

    @functools.cached_property
    def _gemini(self) -> dict[str, JSON]:
        return gemini_schema(self.schema, self.source)

    def gemini_schema(self) -> dict[str, JSON]:
        """``responseSchema``: the schema in Gemini's subset (converted once); ConfigError
        naming the first keyword Gemini lacks (see :func:`gemini_schema`)."""
        return self._gemini

    # --- the check of an answer ---------------------------------------------------------

    def check(self, text: str | None, finish_reason: str | None,
              status: int | None = None) -> str:
        """The answer ``text`` parsed and validated; returns it as compact JSON text.

        Raises :class:`SchemaError` (retryable) when it is not JSON or does not fit, with
        the validator's message; :class:`SchemaCut` instead when ``finish_reason`` is
        ``length``: the token limit cut the JSON, and sending again would cut it again.
        """
        problem = self.problem(text)
        if problem is None:
            assert text is not None
            return orjson.dumps(orjson.loads(text)).decode()
        if finish_reason == "length":
            raise SchemaCut(
                f"the token limit cut the answer before its JSON was complete "
                f"(finish_reason length): {problem}; raise max_tokens (-p max_tokens=N)",
                status, output=text)
        raise SchemaError(problem, status, output=text, finish_reason=finish_reason)

    def problem(self, text: str | None) -> str | None:
        """What is wrong with ``text`` as an answer (None: it parses and fits)."""
        if text is None or not text.strip():
            return "the answer holds no JSON (empty)"
        try:
            value = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            return f"the answer is not valid JSON: {exc}"
        from jsonschema.exceptions import best_match

        error = best_match(self.validator.iter_errors(value))
        if error is None:
            return None
        message = " ".join(error.message.split())
        if len(message) > MESSAGE_LIMIT:
            message = message[:MESSAGE_LIMIT] + "…"
        return f"the answer does not fit the schema: {message} (at {error.json_path})"


def gemini_schema(schema: Mapping[str, JSON], source: str = "schema") -> dict[str, JSON]:
    """``schema`` converted to Gemini's ``responseSchema`` (a subset of OpenAPI 3.0's Schema).

    Types become Gemini's names (``"object"`` → ``"OBJECT"``), ``"type": [T, "null"]`` becomes
    ``T`` with ``nullable: true``, a string ``const`` a one-value ``enum``, and every object
    gets ``propertyOrdering`` in the schema's own order (Gemini otherwise writes properties
    alphabetically). ``additionalProperties: false`` is left out: Gemini writes only declared
    properties, and the answer is still validated against the full schema. Everything else
    Gemini lacks (``$ref``/``$defs``, ``oneOf``, ``allOf``, ``not``, non-string ``enum``, type
    unions, tuple ``items``, open ``additionalProperties``, …) is refused with a ConfigError
    naming the keyword and where it is, since dropping it would change what the answer may be.
    """
    return _gemini_node(schema, source, "$")


def _refuse(source: str, where: str, what: str) -> ConfigError:
    return ConfigError(
        f"response_format (--response-format): {source}: {what} at {where} is not in Gemini's "
        "schema subset (responseSchema: type, properties, required, items, enum of strings, "
        "anyOf, nullable, format, description, minimum/maximum, min/maxItems, "
        "min/maxLength, pattern); rewrite the schema without it, or use another endpoint")


def _gemini_node(node: object, source: str, where: str) -> dict[str, JSON]:
    if not isinstance(node, Mapping):
        raise _refuse(source, where, f"a schema that is {node!r:.40}")
    out: dict[str, JSON] = {}
    for key, value in node.items():
        at = f"{where}.{key}"
        if key == "type":
            types = value if isinstance(value, list) else [value]
            named = [t for t in types if t != "null"]
            if len(named) != 1 or named[0] not in _GEMINI_TYPES:
                raise _refuse(source, at, f"type {value!r}")
            out["type"] = _GEMINI_TYPES[named[0]]
            if "null" in types:
                out["nullable"] = True
        elif key == "properties" and isinstance(value, Mapping):
            out["properties"] = {name: _gemini_node(sub, source, f"{at}.{name}")
                                 for name, sub in value.items()}
            if "propertyOrdering" not in node:
                out["propertyOrdering"] = list(value)
        elif key == "items" and isinstance(value, Mapping):
            out["items"] = _gemini_node(value, source, at)
        elif key == "anyOf" and isinstance(value, list):
            out["anyOf"] = [_gemini_node(sub, source, f"{at}[{i}]")
                            for i, sub in enumerate(value)]
        elif key == "enum" and isinstance(value, list) and all(isinstance(v, str) for v in value):
            out["enum"] = list(value)
        elif key == "const" and isinstance(value, str):
            out["enum"] = [value]
        elif key == "additionalProperties" and value is False:
            continue
        elif key in _GEMINI_KEPT:
            out[key] = value
        elif key in _ANNOTATIONS:
            continue
        else:
            shown = orjson.dumps(value).decode()
            raise _refuse(source, at, f"{key!r} = {shown[:40]}{'…' if len(shown) > 40 else ''}")
    return out
