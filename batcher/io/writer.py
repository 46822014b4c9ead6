"""Result rows ↔ journal records ↔ Arrow tables, durable Parquet parts and the final atomic output.

Layers:

- :func:`result_to_record` turns a :class:`~batcher.types.ResultRow` into a flat JSON-able dict,
  one line of the append-only journal. The input's own columns are nested under the reserved key
  :data:`COLUMNS_KEY` so they can never clash with result fields in the journal.
- :func:`records_to_table` turns journal records into an Arrow table: the fixed
  :data:`RESULT_SCHEMA` columns first, then the input's columns with inferred types.
- :func:`write_part` writes records (streamed from a journal file) as one Parquet part, atomically,
  holding one batch of values (column-wise, not as records) at a time.
- :func:`write_final` merges parts into the final output atomically, one row per id, the latest
  result per id winning, in input order (or completion order); which row wins and where it goes
  are spilled to disk (:mod:`batcher.io.idindex`), so memory holds a bounded number of rows.

Memory: both return what they free to the OS as they go (:func:`release_memory`), so that a long
run's RSS is its working set, not the high-water mark of every compaction before it.

Input-column typing (per part): all-null → ``null``; bools → ``bool``; ints (int64 range) →
``int64``; ints and floats → ``double``; strings → ``string``; anything mixed (or lists/dicts) →
``string`` holding the JSON text of each value (``true``, ``1``, ``"a"`` → ``a``). Across parts
types are unified with ``pa.unify_schemas(promote_options="permissive")`` per column (null
promotes to anything, int64 to double); columns that still conflict become ``string``. An input
column whose name equals a result column (``output``, ``status``, …) is carried as
``input_<name>`` so it never overwrites the answer.
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import functools
import operator
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from batcher.io.flatten import column_fields, flattened_arrays, is_flattened
from batcher.io.idindex import InputIds, ordinal_order, output_order
from batcher.types import JSON, ResultRow

COLUMNS_KEY = "_columns"
"""Journal key under which a result's input columns are nested."""

ORDINAL_COLUMN = "_ordinal"
"""The state's own column (journal key and part column, never in the final output): the
input row's ordinal (:attr:`batcher.types.ResultRow.ordinal`; null when not known)."""

_RESULT_FIELDS: list[pa.Field[Any]] = [
    pa.field("id", pa.string()),
    pa.field("status", pa.string()),
    pa.field("output", pa.string()),
    pa.field("parsed", pa.string()),
    pa.field("finish_reason", pa.string()),
    pa.field("finish_reason_raw", pa.string()),
    pa.field("model", pa.string()),
    pa.field("prompt_tokens", pa.int64()),
    pa.field("completion_tokens", pa.int64()),
    pa.field("total_tokens", pa.int64()),
    pa.field("cached_tokens", pa.int64()),
    pa.field("reasoning_tokens", pa.int64()),
    pa.field("cost_usd", pa.float64()),
    pa.field("cost_usd_original", pa.float64()),
    pa.field("cached", pa.bool_()),
    pa.field("latency_ms", pa.float64()),
    pa.field("wait_ms", pa.float64()),
    pa.field("ttft_ms", pa.float64()),
    pa.field("attempts", pa.int32()),
    pa.field("http_status", pa.int32()),
    pa.field("error", pa.string()),
    pa.field("error_type", pa.string()),
    pa.field("response_id", pa.string()),
    pa.field("tool_calls", pa.string()),
    pa.field("embedding", pa.list_(pa.float32())),
    pa.field("raw", pa.string()),
    pa.field("completed_at", pa.timestamp("ms", tz="UTC")),
]
RESULT_SCHEMA: pa.Schema = pa.schema(_RESULT_FIELDS)
"""The fixed result columns, in output order; the input's own columns follow them."""

RESULT_COLUMNS: tuple[str, ...] = tuple(RESULT_SCHEMA.names)
_RESULT_SET = frozenset(RESULT_COLUMNS)
_fixed_values = operator.itemgetter(*RESULT_COLUMNS)

PART_BATCH_ROWS = 8192
"""Rows per Arrow batch (and Parquet row group) when streaming journals and parts."""

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


# --- records ------------------------------------------------------------------------------


def _json_default(value: Any) -> JSON:
    # Input columns are "Parquet-friendly" but may still hold Decimal, bytes, numpy scalars…
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", errors="replace")
    return str(value)


def result_to_record(r: ResultRow) -> dict[str, JSON]:
    """One journal record: the result's fields flat, the input columns under :data:`COLUMNS_KEY`."""
    return {
        "id": r.id,
        "status": r.status,
        "output": r.output,
        "parsed": r.parsed,
        "finish_reason": r.finish_reason,
        "finish_reason_raw": r.finish_reason_raw,
        "model": r.model,
        "prompt_tokens": r.prompt_tokens,
        "completion_tokens": r.completion_tokens,
        "total_tokens": r.total_tokens,
        "cached_tokens": r.cached_tokens,
        "reasoning_tokens": r.reasoning_tokens,
        "cost_usd": r.cost_usd,
        "cost_usd_original": r.cost_usd_original,
        "cached": r.cached,
        "latency_ms": r.latency_ms,
        "wait_ms": r.wait_ms,
        "ttft_ms": r.ttft_ms,
        "attempts": r.attempts,
        "http_status": r.http_status,
        "error": r.error,
        "error_type": r.error_type,
        "response_id": r.response_id,
        "tool_calls": r.tool_calls,
        "embedding": r.embedding,
        "raw": r.raw,
        "completed_at": r.completed_at,
        COLUMNS_KEY: dict(r.columns),
        ORDINAL_COLUMN: r.ordinal or None,
    }


def encode_records(records: Iterable[Mapping[str, JSON]]) -> bytes:
    """Journal lines for ``records``: one orjson object per line, each ending in ``\\n``."""
    return b"".join(
        orjson.dumps(rec, default=_json_default, option=orjson.OPT_APPEND_NEWLINE)
        for rec in records
    )


@dataclass(slots=True)
class JournalScan:
    """What reading a journal found: the good records' count and the lines thrown away."""

    records: int = 0
    discarded: int = 0


def iter_journal(path: Path, scan: JournalScan | None = None) -> Iterator[dict[str, JSON]]:
    """Yield the journal's complete records in order.

    A line that does not end in a newline (torn by a crash mid-write) or does not parse as a JSON
    object with a string ``id`` is skipped and counted in ``scan.discarded``; its id simply counts
    as not done. The file is read line by line (memory stays flat).
    """
    scan = scan if scan is not None else JournalScan()
    with open(path, "rb") as fh:
        for line in fh:
            if not line.endswith(b"\n"):
                scan.discarded += 1
                continue
            try:
                rec = orjson.loads(line)
            except orjson.JSONDecodeError:
                scan.discarded += 1
                continue
            if not isinstance(rec, dict) or not isinstance(rec.get("id"), str):
                scan.discarded += 1
                continue
            scan.records += 1
            yield rec


# --- tables -------------------------------------------------------------------------------


def _kind(value: JSON) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int" if _INT64_MIN <= value <= _INT64_MAX else "other"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "str"
    return "other"


_KIND_TYPES: dict[frozenset[str], pa.DataType] = {
    frozenset(): pa.null(),
    frozenset({"bool"}): pa.bool_(),
    frozenset({"int"}): pa.int64(),
    frozenset({"float"}): pa.float64(),
    frozenset({"int", "float"}): pa.float64(),
    frozenset({"str"}): pa.string(),
}


class ColumnTypes:
    """Accumulates the value kinds seen per input column, in first-seen order, then names types."""

    def __init__(self) -> None:
        self._kinds: dict[str, set[str]] = {}

    def add(self, columns: Mapping[str, JSON]) -> None:
        for name, value in columns.items():
            kinds = self._kinds.setdefault(name, set())
            kind = _kind(value)
            if kind != "null":
                kinds.add(kind)

    def types(self) -> dict[str, pa.DataType]:
        """Input column name → Arrow type (see the module docstring for the rules)."""
        return {name: _KIND_TYPES.get(frozenset(kinds), pa.string())
                for name, kinds in self._kinds.items()}


def output_name(column: str) -> str:
    """The output column name of input column ``column`` (``input_`` prefixed on a clash)."""
    name = column
    while name in _RESULT_SET or name == ORDINAL_COLUMN:
        name = "input_" + name
    return name


def _as_text(value: JSON) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return orjson.dumps(value, default=_json_default).decode()


def _timestamp(value: JSON) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        ts = datetime.fromisoformat(value)
    except ValueError:
        return None
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts


def _int_or_none(value: JSON) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _float_or_none(value: JSON) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


_NONE = type(None)
_INTS = frozenset({int, _NONE})
_FLOATS = frozenset({float, _NONE})
_TEXTS = frozenset({str, _NONE})


def _fixed_array(name: str, typ: pa.DataType, values: Sequence[JSON]) -> pa.Array[Any]:
    if name == "completed_at":
        return pa.array([_timestamp(v) for v in values], type=typ)
    if name == "embedding":
        return pa.array([v if isinstance(v, list) else None for v in values], type=typ)
    # Values of the expected Python type go to Arrow as they are (the common case, at C
    # speed); anything else is converted one by one.
    kinds = set(map(type, values))
    if pa.types.is_boolean(typ):
        return pa.array([v if isinstance(v, bool) else None for v in values], type=typ)
    if pa.types.is_integer(typ):
        if kinds <= _INTS:
            return pa.array(values, type=typ)
        return pa.array([_int_or_none(v) for v in values], type=typ)
    if pa.types.is_floating(typ):
        if kinds <= _FLOATS:
            return pa.array(values, type=typ)
        return pa.array([_float_or_none(v) for v in values], type=typ)
    if kinds <= _TEXTS:
        return pa.array(values, type=typ)
    return pa.array([_as_text(v) for v in values], type=typ)


def _input_array(typ: pa.DataType, values: Sequence[JSON]) -> pa.Array[Any]:
    if typ == pa.string():
        if set(map(type, values)) <= _TEXTS:
            return pa.array(values, type=typ)
        return pa.array([_as_text(v) for v in values], type=typ)
    if typ == pa.float64():
        if set(map(type, values)) <= _FLOATS:
            return pa.array(values, type=typ)
        return pa.array([_float_or_none(v) for v in values], type=typ)
    return pa.array(values, type=typ)


def records_to_table(records: Iterable[Mapping[str, JSON]]) -> pa.Table:
    """An Arrow table of ``records`` (as made by :func:`result_to_record`).

    Columns: :data:`RESULT_SCHEMA`, then every input column seen, in first-seen order, with the
    types the module docstring describes; a column missing in a record is null there.
    """
    types = ColumnTypes()
    chunk = _ColumnChunk()
    for rec in records:
        columns = rec.get(COLUMNS_KEY)
        if isinstance(columns, dict):
            types.add(columns)
        chunk.add(rec)
    return chunk.table(types.types())


# --- durable files ------------------------------------------------------------------------


def fsync_dir(path: Path) -> None:
    """Make renames/creations/deletions in directory ``path`` durable (best effort)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories; nothing more we can do
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tmp_path_for(path: Path) -> Path:
    """The temporary sibling a file is written to before it is renamed into place."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _commit(tmp: Path, path: Path) -> None:
    """fsync ``tmp``, rename it over ``path`` and fsync the directory: all or nothing."""
    _fsync_file(tmp)
    os.replace(tmp, path)
    fsync_dir(path.parent)


class _ColumnChunk:
    """Journal records gathered column-wise for one Arrow batch.

    Keeps one tuple of the fixed fields per record and one value list per input column, not
    the records themselves: a parsed record is a dict of ~25 entries (~1.5 KB), which is what
    made compaction's memory jump; a tuple of its values is a sixth of that.
    """

    __slots__ = ("inputs", "ordinals", "rows", "size")

    def __init__(self) -> None:
        self.rows: list[tuple[JSON, ...]] = []
        self.inputs: dict[str, list[JSON]] = {}
        self.ordinals: list[JSON] = []
        self.size = 0

    def add(self, rec: Mapping[str, JSON]) -> None:
        try:
            self.rows.append(_fixed_values(rec))
        except KeyError:  # not written by result_to_record: missing fields are null
            self.rows.append(tuple(rec.get(name) for name in RESULT_COLUMNS))
        self.ordinals.append(rec.get(ORDINAL_COLUMN))
        columns = rec.get(COLUMNS_KEY)
        if isinstance(columns, dict):
            size = self.size
            for name, value in columns.items():
                values = self.inputs.get(name)
                if values is None:
                    values = self.inputs[name] = []
                if len(values) < size:
                    values.extend([None] * (size - len(values)))
                values.append(value)
        self.size += 1

    def table(self, column_types: Mapping[str, pa.DataType], *,
              ordinals: bool = False) -> pa.Table:
        """The gathered records as a table; ``ordinals``: with the state's own
        :data:`ORDINAL_COLUMN` last (a part), else the output's columns only."""
        arrays: list[pa.Array[Any]] = []
        fields: list[pa.Field[Any]] = []
        fixed: Iterable[tuple[JSON, ...]] = (
            zip(*self.rows, strict=True) if self.rows else [() for _ in RESULT_COLUMNS])
        for f, column in zip(RESULT_SCHEMA, fixed, strict=True):
            arrays.append(_fixed_array(f.name, f.type, column))
            fields.append(f)
        self.rows = []
        for name, typ in column_types.items():
            values = self.inputs.pop(name, [])
            values.extend([None] * (self.size - len(values)))
            arrays.append(_input_array(typ, values))
            fields.append(pa.field(output_name(name), typ))
        if ordinals:
            arrays.append(_fixed_array(ORDINAL_COLUMN, pa.int64(), self.ordinals))
            fields.append(pa.field(ORDINAL_COLUMN, pa.int64()))
        self.ordinals = []
        return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def _journal_tables(journal: Path, column_types: Mapping[str, pa.DataType],
                    size: int) -> Iterator[pa.Table]:
    chunk = _ColumnChunk()
    for rec in iter_journal(journal):
        chunk.add(rec)
        if chunk.size >= size:
            yield chunk.table(column_types, ordinals=True)
            chunk = _ColumnChunk()
    if chunk.size:
        yield chunk.table(column_types, ordinals=True)


def write_part(journal: Path, part: Path) -> JournalScan:
    """Write journal ``journal`` as Parquet file ``part``, atomically (tmp + fsync + rename).

    Two streaming passes over the journal (types first, then rows in batches of
    :data:`PART_BATCH_ROWS`, one row group each), so memory holds one batch's values, not the
    whole journal. When the journal has no complete record, nothing is written and the scan
    says ``records == 0``.
    """
    release_memory()
    types = ColumnTypes()
    scan = JournalScan()
    for rec in iter_journal(journal, scan):
        columns = rec.get(COLUMNS_KEY)
        if isinstance(columns, dict):
            types.add(columns)
    if scan.records == 0:
        return scan
    column_types = types.types()
    tmp = tmp_path_for(part)
    try:
        writer: pq.ParquetWriter | None = None
        try:
            for table in _journal_tables(journal, column_types, PART_BATCH_ROWS):
                if writer is None:
                    writer = pq.ParquetWriter(tmp, table.schema)
                writer.write_table(table)
                del table
                _release_arrow()
        finally:
            if writer is not None:
                writer.close()
        _commit(tmp, part)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return scan


BUILD_CHUNK_ROWS = 1024
"""Journal lines a :class:`PartBuilder` gathers before turning them into Arrow arrays (a few
milliseconds of work each time, on the caller's thread)."""


class PartBuilder:
    """The Parquet part of a journal, built while the journal is written, so that compacting
    it is only the last few rows' work instead of two passes over the whole journal.

    :meth:`add` is given exactly the bytes appended to the journal, parses them as
    :func:`iter_journal` would, and converts them to Arrow every :data:`BUILD_CHUNK_ROWS`
    lines, written to a temporary file in row groups of :data:`PART_BATCH_ROWS` rows, as
    :func:`write_part` does. :meth:`commit` puts that file in place when it holds the
    same part :func:`write_part` would write from the journal (same rows, same input-column
    types, same row groups); otherwise it returns None and the caller writes the part from
    the journal.
    A builder that cannot keep up with the journal exactly (a failed append, input-column
    types that change after the first rows were converted, a write error) gives up
    (:attr:`usable` False) and removes its file.

    The journal stays the record: the temporary file is never read before :meth:`commit`, and
    one left by a crash is deleted when the state is opened. Memory: at most
    :data:`PART_BATCH_ROWS` rows of Arrow arrays and :data:`BUILD_CHUNK_ROWS` rows of values.
    """

    def __init__(self, part: Path) -> None:
        self.part = part
        self.tmp = tmp_path_for(part)
        self.usable = True
        self.records = 0
        self.discarded = 0
        self.size = 0
        """Bytes given to :meth:`add` (the journal's size, while usable)."""
        self._types = ColumnTypes()
        self._fixed: dict[str, pa.DataType] | None = None
        """The input-column types the converted rows were given."""
        self._chunk = _ColumnChunk()
        self._tables: list[pa.Table] = []
        self._table_rows = 0
        self._writer: pq.ParquetWriter | None = None

    def add(self, data: bytes) -> None:
        """``data``: the bytes just appended to the journal (whole lines)."""
        if not self.usable:
            return
        if not data.endswith(b"\n"):  # never the case for the store's appends
            self.give_up()
            return
        self.size += len(data)
        loads, decode_error = orjson.loads, orjson.JSONDecodeError
        chunk, types = self._chunk, self._types
        for line in data.split(b"\n")[:-1]:
            try:
                rec = loads(line)
            except decode_error:
                self.discarded += 1
                continue
            if not isinstance(rec, dict) or not isinstance(rec.get("id"), str):
                self.discarded += 1
                continue
            self.records += 1
            columns = rec.get(COLUMNS_KEY)
            if isinstance(columns, dict):
                types.add(columns)
            chunk.add(rec)
        if chunk.size >= BUILD_CHUNK_ROWS:
            self._convert()

    def _convert(self) -> None:
        try:
            if self._chunk.size:
                column_types = self._types.types()
                if self._fixed is None:
                    self._fixed = column_types
                elif column_types != self._fixed or list(column_types) != list(self._fixed):
                    self.give_up()  # write_part would type the earlier rows differently
                    return
                table = self._chunk.table(self._fixed, ordinals=True)
                if self._writer is None:
                    self._writer = pq.ParquetWriter(self.tmp, table.schema)
                self._tables.append(table)
                self._table_rows += self._chunk.size
                self._chunk = _ColumnChunk()
            while self._table_rows >= PART_BATCH_ROWS:
                self._write(PART_BATCH_ROWS)
        except (OSError, pa.ArrowException):
            self.give_up()

    def _write(self, rows: int) -> None:
        """One row group of the first ``rows`` rows converted."""
        table = pa.concat_tables(self._tables)
        group, rest = table.slice(0, rows), table.slice(rows)
        assert self._writer is not None  # made with the first table
        self._writer.write_table(group)
        self._tables = [rest] if rest.num_rows else []
        self._table_rows = rest.num_rows
        del table, group, rest
        _release_arrow()

    def commit(self) -> JournalScan | None:
        """Complete the part and put it in place atomically (fsync, rename, as
        :func:`write_part` does); returns what the journal held, as :func:`write_part` does.
        None when this builder cannot give the part :func:`write_part` would write (nothing
        is left behind): the caller writes it from the journal."""
        if self.usable and self.records:
            self._convert()
        if not self.usable or not self.records:
            self.give_up()
            return None
        try:
            if self._table_rows:
                self._write(self._table_rows)
            assert self._writer is not None
            self._writer.close()
            self._writer = None
            _commit(self.tmp, self.part)
        except (OSError, pa.ArrowException):
            self.give_up()
            return None
        self.usable = False
        return JournalScan(self.records, self.discarded)

    def give_up(self) -> None:
        """Stop building; the temporary file is removed. Idempotent."""
        self.usable = False
        self._chunk = _ColumnChunk()
        self._tables = []
        self._table_rows = 0
        if self._writer is not None:
            with contextlib.suppress(OSError, pa.ArrowException):
                self._writer.close()
            self._writer = None
        with contextlib.suppress(OSError):
            self.tmp.unlink()


ID_BATCH_ROWS = 65_536
"""Rows per batch when only the ids and statuses of a source are read."""


def _combined(array: pa.ChunkedArray[Any] | pa.Array[Any]) -> pa.Array[Any]:
    return array.combine_chunks() if isinstance(array, pa.ChunkedArray) else array


def iter_id_status(path: Path) -> Iterator[tuple[pa.Array[Any], pa.Array[Any]]]:
    """(ids, is_ok) batches of one result source, in its row order: a Parquet part/output
    (``id``, ``status`` columns) or a journal (``.jsonl``; torn or bad lines skipped as
    :func:`iter_journal` does)."""
    def missing() -> Exception:
        return ValueError(f"{path} has no id/status columns")
    return _key_status(path, "id", pa.string(), lambda record: cast("str", record["id"]),
                       missing, nulls=True)


class NoOrdinals(Exception):
    """A result source whose rows do not all carry their input ordinal (written before the
    state kept them, or by a path that does not know them)."""


def iter_ordinal_status(path: Path) -> Iterator[tuple[pa.Array[Any], pa.Array[Any]]]:
    """(input ordinals, is_ok) batches of one result source, in its row order (see
    :func:`iter_id_status`); raises :class:`NoOrdinals` at a row without one."""
    def ordinal(record: Mapping[str, JSON]) -> JSON:
        value = record.get(ORDINAL_COLUMN)
        if type(value) is not int:
            raise NoOrdinals(str(path))
        return value
    return _key_status(path, ORDINAL_COLUMN, pa.int64(), ordinal,
                       lambda: NoOrdinals(str(path)), nulls=False)


def _key_status(path: Path, column: str, typ: pa.DataType,
                key: Callable[[Mapping[str, JSON]], JSON], missing: Callable[[], Exception], *,
                nulls: bool) -> Iterator[tuple[pa.Array[Any], pa.Array[Any]]]:
    """(``column`` values as ``typ``, is_ok) batches of one result source; ``key`` reads the
    value of a journal record; ``missing()`` is raised when a part lacks the column, or
    (unless ``nulls``) has a null in it."""
    if path.name.endswith(".jsonl"):
        keys: list[JSON] = []
        oks: list[bool] = []
        for record in iter_journal(path):
            keys.append(key(record))
            oks.append(record.get("status") == "ok")
            if len(keys) >= ID_BATCH_ROWS:
                yield pa.array(keys, typ), pa.array(oks, pa.bool_())
                keys, oks = [], []
        if keys:
            yield pa.array(keys, typ), pa.array(oks, pa.bool_())
        return
    with pq.ParquetFile(path, pre_buffer=False) as parquet_file:
        names = parquet_file.schema_arrow.names
        if column not in names or "status" not in names:
            raise missing()
        for batch in parquet_file.iter_batches(batch_size=ID_BATCH_ROWS,
                                               columns=[column, "status"], use_threads=False):
            values = _combined(batch.column(column))
            if values.null_count and not nulls:
                raise missing()
            is_ok = pc.fill_null(pc.equal(batch.column("status"), pa.scalar("ok")),
                                 pa.scalar(False))
            yield values.cast(typ), _combined(cast("pa.Array[Any]", is_ok))


# --- the final output ---------------------------------------------------------------------


def unify(schemas: Sequence[pa.Schema]) -> pa.Schema:
    """One schema for all ``schemas``: result columns first (fixed types), then input columns in
    first-seen order, each unified permissively; a column whose types cannot be unified → string.
    Flattened columns of an earlier output are left out: they are rebuilt from ``parsed``.
    """
    seen: dict[str, list[pa.DataType]] = {}
    for schema in schemas:
        for f in schema:
            if f.name not in _RESULT_SET and f.name != ORDINAL_COLUMN and not is_flattened(f):
                seen.setdefault(f.name, []).append(f.type)
    fields = list(RESULT_SCHEMA)
    for name, types in seen.items():
        try:
            merged = pa.unify_schemas([pa.schema([(name, t)]) for t in types],
                                      promote_options="permissive").field(name).type
        except (pa.ArrowTypeError, pa.ArrowInvalid, pa.ArrowNotImplementedError):
            merged = pa.string()
        fields.append(pa.field(name, merged))
    return pa.schema(fields)


def _conform_column(col: pa.Array[Any] | pa.ChunkedArray[Any], typ: pa.DataType) -> pa.Array[Any]:
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if arr.type == typ:
        return arr
    if typ == pa.string() and not pa.types.is_string(arr.type):
        # Conflicting kinds across parts: keep every value, as JSON text (see module docstring).
        return pa.array([_as_text(v) for v in arr.to_pylist()], type=typ)
    return arr.cast(typ)


def conform(batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
    """``batch`` with exactly ``schema``'s columns: cast where types differ, nulls where missing."""
    names = set(batch.schema.names)
    arrays = [
        _conform_column(batch.column(f.name), f.type) if f.name in names
        else pa.nulls(batch.num_rows, f.type)
        for f in schema
    ]
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def read_metadata(path: Path) -> dict[str, str]:
    """The key-value metadata of Parquet file ``path``'s schema (footer only; cheap)."""
    raw = pq.read_schema(path).metadata or {}
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in raw.items()}


def has_flattened_columns(path: Path) -> bool:
    """Whether Parquet file ``path`` has ``--flatten`` columns (footer only; cheap)."""
    try:
        return any(is_flattened(f) for f in pq.read_schema(path))
    except (OSError, pa.ArrowException):
        return False


def keep_masks(id_columns: Sequence[pa.ChunkedArray[Any] | pa.Array[Any]]) -> list[pa.Array[Any]]:
    """For ids of several sources (oldest first), a mask per source keeping only the latest row
    of each id across all sources (see :func:`superseded_masks`, which says "keep all" as None).
    """
    masks = superseded_masks(id_columns)
    return [pa.array([True] * len(ids), type=pa.bool_()) if mask is None else mask
            for ids, mask in zip(id_columns, masks, strict=True)]


def superseded_masks(id_columns: Sequence[pa.ChunkedArray[Any] | pa.Array[Any]]
                     ) -> list[pa.Array[Any] | None]:
    """Per source (oldest first), a mask keeping only the latest row of each id across all
    sources, or None when the source has no superseded row (the common case: keep it all).

    Vectorised and lean: one stable sort of the ids puts every id's rows together, oldest first,
    so a row is superseded exactly when the next id in sorted order equals its own. Memory is
    the ids, their sorted copy and 8 bytes of sort index per row; far less than a hash
    group-by, whose tables cost ~170 bytes per id.
    """
    lengths = [len(ids) for ids in id_columns]
    total = sum(lengths)
    if total < 2:
        return [None for _ in id_columns]
    all_ids = pa.chunked_array(
        [c for ids in id_columns
         for c in (ids.chunks if isinstance(ids, pa.ChunkedArray) else [ids])],
        type=pa.string())
    order = pc.sort_indices(all_ids)  # stable: an id's rows stay oldest first
    ordered = all_ids.take(order)
    same_as_next = pc.equal(ordered.slice(0, total - 1), ordered.slice(1))
    del ordered
    superseded = order.slice(0, total - 1).filter(same_as_next)
    del order, same_as_next
    masks: list[pa.Array[Any] | None] = []
    start = 0
    for length in lengths:
        end = start + length
        inside = pc.and_(pc.greater_equal(superseded, pa.scalar(start, pa.uint64())),
                         pc.less(superseded, pa.scalar(end, pa.uint64())))
        mine = superseded.filter(cast("pa.Array[Any]", inside))
        if len(mine) == 0:
            masks.append(None)
        else:
            positions = pa.array(range(start, end), type=pa.uint64())
            masks.append(pc.invert(pc.is_in(positions, value_set=mine)))
        start = end
    return masks


def _release_arrow() -> None:
    """Hand memory Arrow no longer uses back to the OS. Arrow's default allocator (mimalloc in
    the wheels) otherwise keeps freed pages, and RSS climbs by tens of MiB per Parquet file
    read although Arrow holds a few; costs microseconds."""
    pa.default_memory_pool().release_unused()


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        trim: Callable[[int], int] = ctypes.CDLL(None).malloc_trim  # glibc, in the process
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        return None
    return trim


def release_memory() -> None:
    """Return freed memory to the OS: Arrow's unused pages and, on glibc, the free parts of the
    C heap (``malloc_trim``). A run frees much more than it keeps (response bodies, read
    buffers, the reader's tables), and glibc keeps that memory mapped, so without this every
    compaction and the final merge would stack their working memory on top of it. Takes a
    few milliseconds; call it between big steps, not per row."""
    _release_arrow()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def warm_up_arrow() -> None:
    """Do what pyarrow's first conversion of Python values does once: import pandas when it is
    installed (~0.3 s of CPU). In a thread while the process waits on the network, so that
    the first part or output written does not pay it."""
    pa.array([0], pa.int64())


class UnreadableSource(Exception):
    """A Parquet source (a part or the previous output) could not be read; ``path`` names it."""

    def __init__(self, path: Path, cause: BaseException) -> None:
        super().__init__(f"{path}: {cause}")
        self.path = path


def _read_guard(path: Path) -> contextlib.AbstractContextManager[None]:
    @contextlib.contextmanager
    def guard() -> Iterator[None]:
        try:
            yield
        except (OSError, pa.ArrowException) as exc:
            raise UnreadableSource(path, exc) from exc
    return guard()


def _batches(pf: pq.ParquetFile, path: Path) -> Iterator[pa.RecordBatch]:
    it = pf.iter_batches(batch_size=PART_BATCH_ROWS, use_threads=False)
    while True:
        with _read_guard(path):
            batch = next(it, None)
        if batch is None:
            return
        yield batch


OUTPUT_ROW_GROUP_ROWS = 65_536
"""Rows per row group of the final output (fewer when they hold more than
:data:`OUTPUT_ROW_GROUP_BYTES`): big enough for readers' scans, small enough to read one. The
group is held whole in Arrow until it is written: 100,000 rows cost the final merge ~16 MB more
at its peak (measured at 1M rows: +86 MB over the state against +70 MB), which a 10M-row run
could not spare under its 300 MB."""

OUTPUT_ROW_GROUP_BYTES = 64 << 20

GATHER_ROWS = 8_192
"""Output rows gathered (from their sources, in output order) at a time."""


def write_final(sources: Sequence[Path], output: Path,
                metadata: Mapping[str, str] | None = None,
                flatten: Sequence[tuple[str, pa.DataType]] = (), *,
                input_ids: InputIds | None = None, input_rows: int = 0,
                by_ordinal: bool = False, spill_folder: Path | None = None) -> int:
    """Merge Parquet ``sources`` (oldest first) into ``output`` atomically; returns its row count.

    One row per id: the latest source's row of an id wins (within a source, the later row).
    Row order: with ``input_ids`` (the input's ids, :func:`batcher.io.readers.iter_row_ids`;
    ``input_rows`` its data rows) the input's order, then the ids the input no longer has, in
    the order they were answered; without, the order of the sources (completion order).
    ``by_ordinal``: every result was written for this very input, so when every source row
    carries its input ordinal, the input order is told by those
    (:func:`batcher.io.idindex.ordinal_order`) without reading ``input_ids``.

    Memory is flat in the number of rows: which row wins and where it goes are worked out by
    :func:`batcher.io.idindex.output_order` (spilled to ``spill_folder``), then rows are
    gathered from their sources :data:`GATHER_ROWS` at a time (reading only the row groups
    that hold them) and written in row groups of :data:`OUTPUT_ROW_GROUP_ROWS` (or ~64 MB),
    with statistics (``id`` included). The output is written to a temporary sibling, fsynced,
    then renamed over ``output``, so a reader sees the old file or the new one.
    Raises :class:`UnreadableSource` naming a source that fails to read (``output`` is then
    untouched); errors writing the output propagate as they are. ``metadata`` is stored as the
    output schema's key-value metadata (the state uses it to recognise its own output).
    ``flatten`` (``--flatten``): (property, Arrow type) pairs, each written as one more column
    filled from ``parsed`` (see :mod:`batcher.io.flatten`), after the input's columns.
    """
    release_memory()
    layouts: list[_Layout] = []
    for src in sources:
        with _read_guard(src), pq.ParquetFile(src, pre_buffer=False) as pf:
            layouts.append(_Layout.of(pf))
    base = unify([layout.schema for layout in layouts])
    if metadata:
        base = base.with_metadata(dict(metadata))
    schema = pa.schema([*base, *column_fields(flatten, base.names)])
    if base.metadata:
        schema = schema.with_metadata(base.metadata)
    counts = [layout.group_starts[-1] for layout in layouts]
    gather = _Gatherer(list(sources), layouts, base)
    try:
        tmp = tmp_path_for(output)
        rows = 0
        try:
            with pq.ParquetWriter(tmp, schema) as writer:
                pending: list[pa.Table] = []
                pending_rows = pending_bytes = 0

                def flush(final: bool) -> None:
                    # Whole row groups of OUTPUT_ROW_GROUP_ROWS; a short one only when the
                    # bytes say so or at the end.
                    nonlocal pending, pending_rows, pending_bytes
                    if not pending:
                        return
                    table = pa.concat_tables(pending)
                    size = OUTPUT_ROW_GROUP_ROWS
                    cut = table.num_rows if final or pending_bytes >= OUTPUT_ROW_GROUP_BYTES \
                        else table.num_rows - table.num_rows % size
                    for start in range(0, cut, size):
                        piece = table.slice(start, min(size, cut - start))
                        writer.write_table(piece, row_group_size=max(1, piece.num_rows))
                    rest = table.slice(cut)
                    pending = [rest] if rest.num_rows else []
                    # A slice reports its parent's buffers: prorate the bytes instead.
                    pending_bytes = pending_bytes * rest.num_rows // max(1, table.num_rows)
                    pending_rows = rest.num_rows
                    del table, rest
                    _release_arrow()

                order: Iterator[pa.Array[Any]] | None = None
                if by_ordinal and input_ids is not None:
                    with contextlib.suppress(NoOrdinals):
                        order = ordinal_order(
                            [_guarded(src, iter_ordinal_status) for src in sources],
                            input_rows, folder=spill_folder)
                if order is None:
                    _, order = output_order([_guarded(src, iter_id_status) for src in sources],
                                            input_ids, input_rows, rows_hint=sum(counts),
                                            folder=spill_folder)
                for seqs in order:
                    for start in range(0, len(seqs), GATHER_ROWS):
                        table = gather.rows(seqs.slice(start, GATHER_ROWS))
                        if flatten:
                            parsed = table.column("parsed").combine_chunks()
                            table = pa.Table.from_arrays(
                                [*table.columns, *flattened_arrays(parsed, flatten)],
                                schema=schema)
                        pending.append(table)
                        pending_rows += table.num_rows
                        pending_bytes += table.nbytes
                        rows += table.num_rows
                        if (pending_rows >= OUTPUT_ROW_GROUP_ROWS
                                or pending_bytes >= OUTPUT_ROW_GROUP_BYTES):
                            flush(final=False)
                flush(final=True)
                if rows == 0:
                    writer.write_table(schema.empty_table())
            _commit(tmp, output)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
    finally:
        gather.close()
    return rows


def _guarded(path: Path, read: Callable[[Path], Iterator[tuple[pa.Array[Any], pa.Array[Any]]]]
             ) -> Iterator[tuple[pa.Array[Any], pa.Array[Any]]]:
    iterator = read(path)
    while True:
        with _read_guard(path):
            item = next(iterator, None)
        if item is None:
            return
        yield item


@dataclass(frozen=True)
class _Layout:
    """What the final merge needs of one source before reading it: its schema and where each
    row group starts (the last entry is its row count)."""

    schema: pa.Schema
    group_starts: list[int]

    @staticmethod
    def of(pf: pq.ParquetFile) -> _Layout:
        metadata = pf.metadata
        starts = [0]
        for index in range(metadata.num_row_groups):
            starts.append(starts[-1] + metadata.row_group(index).num_rows)
        return _Layout(pf.schema_arrow, starts)


class _Gatherer:
    """Rows of several Parquet sources by global row number (sources concatenated), conformed
    to one schema. Reads whole row groups; keeps those the last call used (output order
    mostly walks each source forward, so the next call usually needs them again).

    A source is open only while the last call used it: a 10M-row state has hundreds of parts,
    and each open Parquet file holds its metadata and read buffers (RSS that grew with the
    number of rows)."""

    def __init__(self, paths: list[Path], layouts: list[_Layout], schema: pa.Schema) -> None:
        self.paths = paths
        self.schema = schema
        self.starts: list[int] = []
        self.group_starts = [layout.group_starts for layout in layouts]
        total = 0
        for layout in layouts:
            self.starts.append(total)
            total += layout.group_starts[-1]
        self.starts.append(total)
        self._cache: dict[tuple[int, int], pa.Table] = {}
        self._open: dict[int, pq.ParquetFile] = {}

    def close(self) -> None:
        for pf in self._open.values():
            pf.close()
        self._open = {}
        self._cache = {}

    def _file(self, source: int) -> pq.ParquetFile:
        pf = self._open.get(source)
        if pf is None:
            with _read_guard(self.paths[source]):
                pf = self._open[source] = pq.ParquetFile(self.paths[source], pre_buffer=False)
        return pf

    def _group(self, source: int, group: int) -> pa.Table:
        key = (source, group)
        table = self._cache.get(key)
        if table is None:
            batches = self._file(source).iter_batches(
                batch_size=PART_BATCH_ROWS, row_groups=[group], use_threads=False)
            conformed = []
            while True:
                with _read_guard(self.paths[source]):
                    batch = next(batches, None)
                if batch is None:
                    break
                conformed.append(conform(batch, self.schema))
            table = pa.Table.from_batches(conformed, schema=self.schema)
            self._cache[key] = table
        return table

    def rows(self, seqs: pa.Array[Any]) -> pa.Table:
        """The rows numbered ``seqs`` (int64), in that order."""
        pieces: list[pa.Table] = []
        places: list[pa.Array[Any]] = []
        used: set[tuple[int, int]] = set()
        # Sorted, each source's rows are one run: found by bisection, not a scan per source.
        order = pc.sort_indices(seqs)
        ordered = seqs.take(order)
        values = cast("list[int]", ordered.to_pylist())
        for source in range(len(self.paths)):
            low, high = self.starts[source], self.starts[source + 1]
            begin, end = bisect.bisect_left(values, low), bisect.bisect_left(values, high)
            if begin == end:
                continue
            local = pc.subtract(ordered.slice(begin, end - begin), pa.scalar(low, pa.int64()))
            offsets = self.group_starts[source]
            first = bisect.bisect_right(offsets, values[begin] - low) - 1
            last = bisect.bisect_right(offsets, values[end - 1] - low) - 1
            groups = [self._group(source, g) for g in range(first, last + 1)]
            used.update((source, g) for g in range(first, last + 1))
            span = pa.concat_tables(groups) if len(groups) > 1 else groups[0]
            pieces.append(span.take(pc.subtract(local, pa.scalar(offsets[first], pa.int64()))))
            places.append(order.slice(begin, end - begin))
        for key in [k for k in self._cache if k not in used]:
            del self._cache[key]
        for source in [s for s in self._open if not any(k[0] == s for k in used)]:
            self._open.pop(source).close()
        if not pieces:
            return self.schema.empty_table()
        table = pa.concat_tables(pieces) if len(pieces) > 1 else pieces[0]
        # Row k of `table` belongs at position places[k]: put each where it belongs.
        return table.take(pc.sort_indices(pa.concat_arrays(places)))
