"""The schema the structured-output tests share: a ticket-routing object that uses every kind
of property --flatten types (enum string, bounded integer, nullable, list, const)."""

from __future__ import annotations

from typing import Any

from batcher.schema import ResponseSchema
from tests.conftest import ROOT

EXAMPLE_SCHEMA = ROOT / "examples" / "classify_schema.json"

TICKET: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "ticket",
    "description": "How a ticket is routed.",
    "type": "object",
    "properties": {
        "category": {"type": "string", "enum": ["billing", "bug", "other"]},
        "urgency": {"type": "integer", "minimum": 1, "maximum": 5},
        "note": {"type": ["string", "null"]},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
        "kind": {"const": "ticket"},
    },
    "required": ["category", "urgency", "note", "tags", "kind"],
    "additionalProperties": False,
}
SCHEMA = ResponseSchema.from_dict(TICKET, source="ticket.json")
