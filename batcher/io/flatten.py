"""``--flatten``: one typed output column per top-level property of the response schema, from ``parsed``.

Arrow types come from the schema, not from the answers, so every part and every run agree:
``string`` → string, ``integer`` → int64, ``number`` → double, ``boolean`` → bool,
``array`` → list of its ``items``' type, ``object`` with ``properties`` → struct of them;
``[T, "null"]`` is ``T`` (Arrow columns are nullable anyway). Anything else (no type, a union,
``anyOf``, an object without properties, an array without items) → string holding the value's
JSON text, so no value is ever lost. A value that does not fit its column (possible only for a
row written before the schema changed, with ``--force-resume``) becomes null there.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import orjson
import pyarrow as pa

from batcher.types import JSON

FLATTENED_KEY = b"batcher"
FLATTENED_VALUE = b"flattened"
"""Field metadata marking a flattened column: derived from ``parsed`` at every final write, so
the next write drops and rebuilds it (and drops it when ``--flatten`` is no longer given)."""

_SCALARS: Mapping[str, pa.DataType] = {
    "string": pa.string(), "integer": pa.int64(), "number": pa.float64(),
    "boolean": pa.bool_(),
}


def arrow_type(node: JSON) -> pa.DataType:
    """The Arrow type of a value fitting JSON Schema ``node`` (see the module docstring)."""
    if not isinstance(node, Mapping):
        return pa.string()
    kind = node.get("type")
    if isinstance(kind, list):
        named = [t for t in kind if t != "null"]
        kind = named[0] if len(named) == 1 else None
    enum = node.get("enum")
    if kind is None and isinstance(enum, list) and all(isinstance(v, str) for v in enum):
        kind = "string"
    if isinstance(kind, str) and kind in _SCALARS:
        return _SCALARS[kind]
    if kind == "array" and isinstance(node.get("items"), Mapping):
        return pa.list_(arrow_type(node["items"]))
    properties = node.get("properties")
    if kind == "object" and isinstance(properties, Mapping) and properties:
        return pa.struct([pa.field(name, arrow_type(sub)) for name, sub in properties.items()])
    return pa.string()


def flat_fields(schema: Mapping[str, JSON]) -> list[tuple[str, pa.DataType]]:
    """(property, Arrow type) of each top-level property, in the schema's order."""
    properties = schema.get("properties")
    if not isinstance(properties, Mapping):
        return []
    return [(name, arrow_type(sub)) for name, sub in properties.items()]


def is_flattened(f: pa.Field[Any]) -> bool:
    return (f.metadata or {}).get(FLATTENED_KEY) == FLATTENED_VALUE


def column_fields(flat: Sequence[tuple[str, pa.DataType]],
                  taken: Sequence[str]) -> list[pa.Field[Any]]:
    """The output fields of ``flat``: each property's own name, ``parsed_`` prefixed while it
    is ``taken`` (a result column such as ``id`` or ``status``, or an input column)."""
    used = set(taken)
    fields: list[pa.Field[Any]] = []
    for name, typ in flat:
        column = name
        while column in used:
            column = "parsed_" + column
        used.add(column)
        fields.append(pa.field(column, typ, metadata={FLATTENED_KEY: FLATTENED_VALUE}))
    return fields


def _fit(value: JSON, typ: pa.DataType) -> JSON:
    """``value`` as the Python value Arrow takes for ``typ``; None when it does not fit."""
    if value is None:
        return None
    if pa.types.is_string(typ):
        return value if isinstance(value, str) else orjson.dumps(value).decode()
    if pa.types.is_boolean(typ):
        return value if isinstance(value, bool) else None
    if pa.types.is_integer(typ):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        ok = isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**63
        return value if ok else None
    if pa.types.is_floating(typ):
        return float(value) if isinstance(value, int | float) \
            and not isinstance(value, bool) else None
    if pa.types.is_list(typ):
        if not isinstance(value, list):
            return None
        return [_fit(item, typ.value_type) for item in value]
    if pa.types.is_struct(typ):
        if not isinstance(value, Mapping):
            return None
        return {typ.field(i).name: _fit(value.get(typ.field(i).name), typ.field(i).type)
                for i in range(typ.num_fields)}
    return None


def flattened_arrays(parsed: pa.Array[Any] | pa.ChunkedArray[Any],
                     flat: Sequence[tuple[str, pa.DataType]]) -> list[pa.Array[Any]]:
    """One array per ``flat`` property, from a ``parsed`` column of JSON texts (null: a row
    with no parsed answer, e.g. an error row)."""
    objects: list[Mapping[str, JSON] | None] = []
    for text in parsed.to_pylist():
        value = None
        if isinstance(text, str):
            try:
                value = orjson.loads(text)
            except orjson.JSONDecodeError:
                value = None
        objects.append(value if isinstance(value, Mapping) else None)
    return [pa.array([_fit(obj.get(name), typ) if obj is not None else None for obj in objects],
                     type=typ)
            for name, typ in flat]
