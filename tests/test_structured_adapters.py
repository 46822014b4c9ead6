"""Structured output, pure parts: each vendor's request form (golden bodies), the check of
every answer, Gemini's schema subset, loading a schema, and the simulator's answers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
from jsonschema import Draft202012Validator

from batcher.errors import ConfigError, SchemaCut, SchemaError
from batcher.providers import get_provider
from batcher.schema import ResponseSchema, gemini_schema
from batcher.simulator import structured
from batcher.types import HttpResponse, RequestContext, RequestRow
from tests.golden_cases import GOLDEN_ROOT, assert_request_matches, load, make_row
from tests.structured_cases import EXAMPLE_SCHEMA, SCHEMA, TICKET

GOLDEN = GOLDEN_ROOT / "structured"
GOOD = {"category": "bug", "urgency": 4, "note": None, "tags": ["ui"], "kind": "ticket"}


def _with_schema(value: Any) -> Any:
    if value == "$SCHEMA":
        return TICKET
    if isinstance(value, dict):
        return {k: _with_schema(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_with_schema(v) for v in value]
    return value


CASES = load(GOLDEN, "requests.json")


# --- each vendor's request form --------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_request_body_golden(case: dict[str, Any]) -> None:
    ctx = RequestContext(**case["ctx"], response_schema=SCHEMA)
    request = get_provider(case["endpoint"]).build_request(make_row(case["row"]), ctx)
    assert_request_matches(request, _with_schema(case["expected"]))
    assert request.response_schema is SCHEMA


def test_without_a_schema_no_vendor_gets_one() -> None:
    row = make_row({"id": "r", "shape": "prompt", "prompt": "hi"})
    for endpoint in ("chat", "anthropic", "gemini"):
        ctx = RequestContext(base_url="http://h/v1", model="m")
        body = orjson.loads(get_provider(endpoint).build_request(row, ctx).body)
        assert not {"response_format", "tools", "tool_choice"} & set(body)
        assert "responseSchema" not in body.get("generationConfig", {})


@pytest.mark.parametrize(("endpoint", "param"), [
    ("chat", {"response_format": {"type": "json_object"}}),
    ("anthropic", {"tools": []}),
    ("gemini", {"response_schema": {"type": "STRING"}}),
])
def test_a_row_param_the_schema_would_overwrite_is_a_row_error(endpoint: str,
                                                               param: dict[str, Any]) -> None:
    from batcher.errors import InputError

    row = RequestRow(id="r", shape="prompt", source="in.jsonl", line=3, prompt="hi",
                     params=param)
    ctx = RequestContext(base_url="http://h/v1", model="m", response_schema=SCHEMA)
    with pytest.raises(InputError, match="--response-format sets it too"):
        get_provider(endpoint).build_request(row, ctx)


# --- Gemini's subset -------------------------------------------------------------------


@pytest.mark.parametrize(("schema", "named"), [
    ({"type": "object", "$defs": {"a": {"type": "string"}},
      "properties": {"a": {"$ref": "#/$defs/a"}}}, "'$defs'"),
    ({"type": "object", "properties": {"a": {"oneOf": [{"type": "string"}]}}},
     "$.properties.a.oneOf"),
    ({"type": "object", "properties": {"n": {"enum": [1, 2]}}}, "$.properties.n.enum"),
    ({"type": "object", "additionalProperties": {"type": "string"}}, "additionalProperties"),
    ({"type": "object", "properties": {"u": {"type": ["string", "integer"]}}},
     "$.properties.u.type"),
    ({"type": "object", "properties": {"t": {"type": "array", "prefixItems": []}}},
     "prefixItems"),
])
def test_gemini_refuses_what_its_subset_lacks_naming_the_keyword(schema: dict[str, Any],
                                                                 named: str) -> None:
    with pytest.raises(ConfigError, match="not in Gemini's schema subset") as caught:
        gemini_schema(schema, "s.json")
    assert named in str(caught.value) and "s.json" in str(caught.value)


def test_gemini_conversion_keeps_order_nullability_and_drops_closed_objects() -> None:
    converted = SCHEMA.gemini_schema()
    assert converted["propertyOrdering"] == list(TICKET["properties"])
    assert converted["properties"]["note"] == {"type": "STRING", "nullable": True}
    assert converted["properties"]["kind"] == {"enum": ["ticket"]}
    assert "additionalProperties" not in converted and "$schema" not in converted


# --- parsing and validating answers ----------------------------------------------------


def _chat_answer(content: str, finish: str = "stop") -> HttpResponse:
    body = {"id": "c1", "model": "gpt-4o-mini",
            "choices": [{"index": 0, "finish_reason": finish,
                         "message": {"role": "assistant", "content": content}}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}}
    return HttpResponse(200, {}, orjson.dumps(body))


def _chat_request() -> Any:
    row = make_row({"id": "r", "shape": "prompt", "prompt": "hi"})
    ctx = RequestContext(base_url="http://h/v1", model="gpt-4o-mini", response_schema=SCHEMA)
    return get_provider("chat").build_request(row, ctx)


def test_a_fitting_chat_answer_keeps_its_text_and_gets_parsed() -> None:
    text = '{ "category": "bug", "urgency": 4, "note": null, "tags": ["ui"], "kind": "ticket" }'
    answer = get_provider("chat").parse_response(_chat_request(), _chat_answer(text))
    assert answer.output == text
    assert answer.parsed is not None and orjson.loads(answer.parsed) == GOOD


@pytest.mark.parametrize(("text", "message"), [
    ("Sure! Here it is: {", "not valid JSON"),
    ("", "holds no JSON"),
    ('{"category": "spam", "urgency": 4, "note": null, "tags": [], "kind": "ticket"}',
     "'spam' is not one of ['billing', 'bug', 'other'] (at $.category)"),
    ('{"category": "bug", "note": null, "tags": [], "kind": "ticket"}',
     "'urgency' is a required property (at $)"),
    ('{"category": "bug", "urgency": 9, "note": null, "tags": [], "kind": "ticket"}',
     "9 is greater than the maximum of 5 (at $.urgency)"),
])
def test_an_answer_that_does_not_fit_is_a_retryable_schema_error(text: str,
                                                                 message: str) -> None:
    with pytest.raises(SchemaError) as caught:
        get_provider("chat").parse_response(_chat_request(), _chat_answer(text))
    error = caught.value
    assert message in error.message
    assert error.kind == "schema" and error.output == text and error.status == 200


def test_an_openai_refusal_is_quoted_in_the_schema_error() -> None:
    body = {"id": "c1", "model": "gpt-4o-mini",
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": None,
                                     "refusal": "I can't help with that."}}]}
    with pytest.raises(SchemaError, match="refused to answer in the schema: I can't help"):
        get_provider("chat").parse_response(_chat_request(),
                                            HttpResponse(200, {}, orjson.dumps(body)))


def test_a_length_cut_json_is_reported_as_cut_and_not_retried() -> None:
    with pytest.raises(SchemaCut, match="token limit cut the answer") as caught:
        get_provider("chat").parse_response(_chat_request(),
                                            _chat_answer('{"category": "bu', "length"))
    assert caught.value.kind == "schema" and caught.value.finish_reason == "length"
    assert not isinstance(caught.value, SchemaError)  # SchemaError is the retried one


def _anthropic_request(stream: bool = False) -> Any:
    row = make_row({"id": "r", "shape": "prompt", "prompt": "hi"})
    ctx = RequestContext(base_url="http://h/v1", model="claude-sonnet-4-5",
                         params={"stream": stream}, response_schema=SCHEMA)
    return get_provider("anthropic").build_request(row, ctx)


def test_anthropic_answer_is_the_forced_tool_calls_input() -> None:
    body = {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
            "content": [{"type": "tool_use", "id": "toolu_1", "name": "ticket", "input": GOOD}],
            "stop_reason": "tool_use",
            "usage": {"input_tokens": 400, "output_tokens": 30}}
    answer = get_provider("anthropic").parse_response(
        _anthropic_request(), HttpResponse(200, {}, orjson.dumps(body)))
    assert answer.parsed is not None and orjson.loads(answer.parsed) == GOOD
    assert answer.output is not None and orjson.loads(answer.output) == GOOD
    assert answer.tool_calls is None
    assert (answer.finish_reason, answer.finish_reason_raw) == ("stop", "tool_use")


def test_anthropic_answer_without_the_tool_call_is_a_schema_error() -> None:
    body = {"id": "msg_1", "type": "message", "model": "m", "stop_reason": "end_turn",
            "content": [{"type": "text", "text": "I'd rather chat."}], "usage": {}}
    with pytest.raises(SchemaError, match="not valid JSON"):
        get_provider("anthropic").parse_response(_anthropic_request(),
                                                 HttpResponse(200, {}, orjson.dumps(body)))


def test_gemini_answer_text_is_checked() -> None:
    row = make_row({"id": "r", "shape": "prompt", "prompt": "hi"})
    ctx = RequestContext(base_url="http://h/v1beta", model="gemini-2.5-flash",
                         response_schema=SCHEMA)
    request = get_provider("gemini").build_request(row, ctx)
    body = {"candidates": [{"content": {"role": "model", "parts": [{"text": '{"urgency": 2}'}]},
                            "finishReason": "STOP"}], "modelVersion": "gemini-2.5-flash"}
    with pytest.raises(SchemaError, match="'category' is a required property"):
        get_provider("gemini").parse_response(request, HttpResponse(200, {}, orjson.dumps(body)))


# --- loading the schema ----------------------------------------------------------------


@pytest.mark.parametrize(("content", "message"), [
    (b"{not json", "is not valid JSON"),
    (b'{"type": "array", "items": {"type": "string"}}', 'root must be "type": "object"'),
    (b'{"type": "object", "properties": {"a": {"type": "strnig"}}}', "not a valid JSON Schema"),
    (b'{"type": "object", "required": "a"}', "not a valid JSON Schema"),
])
def test_a_bad_schema_file_is_a_usage_error(tmp_path: Path, content: bytes,
                                            message: str) -> None:
    path = tmp_path / "s.json"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=message):
        ResponseSchema.load(path)


def test_the_name_comes_from_the_title_or_the_file_and_is_safe(tmp_path: Path) -> None:
    path = tmp_path / "my labels.v2.json"
    path.write_bytes(b'{"type": "object"}')
    assert ResponseSchema.load(path).name == "my_labels_v2"
    assert ResponseSchema.from_dict({"type": "object", "title": "Ticket (v2)"}).name == "Ticket_v2"


# --- the simulator -----------------------------------------------------------------------


@pytest.mark.parametrize("path", [EXAMPLE_SCHEMA, None])
def test_simulated_answers_fit_and_broken_ones_do_not(path: Path | None) -> None:
    schema = orjson.loads(path.read_bytes()) if path else TICKET
    validator = Draft202012Validator(schema)
    for i in range(40):
        assert validator.is_valid(structured.instance(schema, f"prompt {i}"))
        value, text = structured.broken(schema, f"prompt {i}", i)
        if i % 2:
            with pytest.raises(orjson.JSONDecodeError):
                orjson.loads(text)
        else:
            assert not validator.is_valid(value)


