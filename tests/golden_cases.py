"""Helpers shared by the provider golden tests: load cases, build rows and responses, compare."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from batcher.types import Answer, HttpRequest, HttpResponse, RequestRow

GOLDEN_ROOT = Path(__file__).parent / "golden"


def load(folder: Path, name: str) -> Any:
    return orjson.loads((folder / name).read_bytes())


def make_row(spec: dict[str, Any], line: int = 5) -> RequestRow:
    spec = dict(spec)
    return RequestRow(id=spec.pop("id"), shape=spec.pop("shape"), source="in.jsonl", line=line,
                      **spec)


def response_of(folder: Path, case: dict[str, Any]) -> HttpResponse:
    """The case's response: its body from ``json``, a stream ``file`` or raw ``text``."""
    if "json" in case:
        body = orjson.dumps(case["json"])
    elif "file" in case:
        body = (folder / case["file"]).read_bytes()
    else:
        body = case["text"].encode()
    return HttpResponse(case["status"], case.get("headers", {}), body)


def answer_dict(answer: Answer) -> dict[str, Any]:
    """An Answer as the golden files write it (tool calls decoded, usage as a dict)."""
    u = answer.usage
    return {
        "output": answer.output, "finish_reason": answer.finish_reason,
        "finish_reason_raw": answer.finish_reason_raw, "model": answer.model,
        "response_id": answer.response_id,
        "tool_calls": orjson.loads(answer.tool_calls) if answer.tool_calls else None,
        "usage": {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
                  "total_tokens": u.total_tokens, "cached_tokens": u.cached_tokens,
                  "reasoning_tokens": u.reasoning_tokens},
        **({"embedding": answer.embedding} if answer.embedding is not None else {}),
    }


def assert_request_matches(request: HttpRequest, expected: dict[str, Any]) -> None:
    assert request.method == expected["method"]
    assert request.url == expected["url"]
    assert dict(request.headers) == expected["headers"]
    assert orjson.loads(request.body) == expected["body"]
    assert request.model == expected["model"]
    assert request.stream is expected["stream"]
    assert request.max_tokens == expected["max_tokens"]
