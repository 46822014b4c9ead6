"""Stream JSONL / Parquet inputs into request rows, in bounded batches, reporting bad rows.

An input is a local path, a URL or an :class:`~batcher.io.location.InputLocation`; its
files' content comes through the location's scan when it has one (``--engine ray``: Ray
Data), else it is read here. The rows are built here either way."""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Iterable, Iterator
from collections.abc import Set as AbstractSet
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from batcher.errors import InputError
from batcher.io.idindex import RowPlan, build_plan
from batcher.io.location import ByteStream, InputFile, InputLocation
from batcher.io.rows import (
    _BOM,
    _CHUNK_BYTES,
    _LINE_BITS,
    BATCH_ID_COLUMN,
    DEFAULT_ID_COLUMN,
    DEFAULT_PROMPT_COLUMN,
    OUTPUT_COLUMNS,
    InputProblem,
    ReaderOptions,
    RowBatch,
    _RowBuilder,
    _short,
    _Template,
    detect_shape,
)
from batcher.types import RequestRow, RowShape

__all__ = [
    "OUTPUT_COLUMNS", "InputProblem", "ReaderOptions", "RowBatch", "count_rows",
    "detect_shape", "iter_batches", "iter_row_ids", "read_blocks", "record_batches",
]

Source = Path | str | InputLocation
"""An input: a local path, a URL (``s3://…``), or a location that may carry a scan."""


def _location(source: Source) -> InputLocation:
    return source if isinstance(source, InputLocation) else InputLocation(source)


# --- public entry points ----------------------------------------------------------------


def iter_batches(path: Source, options: ReaderOptions,
                 skip_ids: AbstractSet[str] | None = None, *,
                 plan: RowPlan | None = None,
                 spill_folder: Path | None = None) -> Iterator[RowBatch]:
    """Stream ``path`` as batches of request rows, in input order.

    Raises :class:`InputError` at once for a missing, unsupported, empty or unreadable input
    (and for a Parquet file whose columns cannot serve ``options``), and from the iterator
    when reading fails midway. ``ConfigError`` for a bad template.

    Duplicates and done rows come from a :class:`~batcher.io.idindex.RowPlan`: ``plan`` when
    given (the runner builds it with the state's results), else one built from the input's
    ids and ``skip_ids`` by a pre-pass at the first ``next()`` (spilled to ``spill_folder``,
    default the system temp folder). Rows the plan says are done are not returned (resume)
    but still count in ``lines_read``. An id belongs to the first row that has it, even when
    that row is reported for another problem; later rows with it are duplicates, reported
    with where the first one is (or that it is done already).

    Memory: ``batch_size`` rows plus a 1 MiB read buffer (JSONL) or one buffered Parquet
    record batch, plus the plan's two bits per row; nothing per id.
    """
    location = _location(path)
    kind, files = location.resolve()
    template = _Template.parse(options.template) if options.template is not None else None
    sources = [f.source for f in files]
    if kind == "parquet":
        # Check every file before the first row (fatal problems surface at once), but open
        # each again only when its turn comes: a directory may hold thousands of files.
        plans: list[tuple[InputFile, RowShape]] = []
        total = 0
        for file in files:
            with location.open_parquet(file) as parquet_file:
                total += parquet_file.metadata.num_rows
                names = parquet_file.schema_arrow.names
            plans.append((file, _parquet_shape(file.source, names, options, template)))
        if total == 0:
            raise InputError(location.given, "empty input: no rows")
    elif not _has_data(location, files[0], kind == "jsonl.gz"):
        raise InputError(sources[0], "empty file: no non-blank lines")

    def batches() -> Iterator[RowBatch]:
        row_plan = plan
        if row_plan is None:
            row_plan = build_plan(iter_row_ids(location, options),
                                  rows_hint=count_rows(location),
                                  skip_ids=skip_ids or (), folder=spill_folder)
        builder = _RowBuilder(options, template, row_plan, sources)
        if kind == "parquet":
            yield from _iter_parquet(builder, location, plans, options.batch_size)
        else:
            yield from builder.jsonl_batches(
                _jsonl_blocks(location, files[0], kind == "jsonl.gz"), sources[0])

    return batches()


def iter_row_ids(path: Source, options: ReaderOptions) -> Iterator[tuple[list[str], list[int],
                                                                      list[int]]]:
    """Batches of (id, data-row ordinal, packed position) of the input's rows that own an id,
    by the reader's own rules (:class:`batcher.io.rows._RowBuilder`): a string id (not
    empty), an integer id as text, or ``row-{ordinal}`` when the input gives no ids. The
    pre-pass of :func:`iter_batches`: parses JSONL lines (only their id is kept); reads only
    the id column of Parquet files."""
    location = _location(path)
    kind, files = location.resolve()
    template = _Template.parse(options.template) if options.template is not None else None
    rule = _IdPass(options)
    ordinal = 0
    if kind == "parquet":
        for file_index, file in enumerate(files):
            with location.open_parquet(file) as parquet_file:
                names = parquet_file.schema_arrow.names
                shape = _parquet_shape(file.source, names, options, template)
                column = rule.column(shape)
                base = file_index << _LINE_BITS
                if column not in names:
                    line = 0
                    for meta_rows in _row_group_sizes(parquet_file):
                        rule.start()
                        for _ in range(meta_rows):
                            line += 1
                            ordinal += 1
                            rule.add(None, ordinal, base | line)
                        yield rule.take()
                    continue
                line = 0
                for batch in _parquet_batches(location, file, parquet_file, 65_536,
                                              columns=[column], use_threads=False):
                    rule.start()
                    for value in batch.column(0).to_pylist():
                        line += 1
                        ordinal += 1
                        rule.add(value, ordinal, base | line)
                    yield rule.take()
        return
    fixed_shape: RowShape | None = None
    if template is not None or options.prompt_column is not None:
        fixed_shape = "template" if template is not None else "prompt"
    id_column = rule.column(fixed_shape) if fixed_shape is not None else None
    loads = orjson.loads
    decode_error = orjson.JSONDecodeError
    line = 0
    first = True
    for block in _jsonl_blocks(location, files[0], kind == "jsonl.gz"):
        if first and block.startswith(_BOM):
            block = block[len(_BOM):]
        first = False
        pieces = block.split(b"\n")
        if block.endswith(b"\n"):
            pieces.pop()
        rule.start()
        ids, ordinals, positions = rule.take()
        for raw in pieces:
            line += 1
            try:
                obj = loads(raw)
            except decode_error:
                if raw.strip():
                    ordinal += 1
                continue
            ordinal += 1
            if type(obj) is not dict:
                continue
            if id_column is None:
                detected = detect_shape(obj, options)
                if detected is None:
                    continue
                id_column = rule.column(detected)
            raw_id = obj.get(id_column)
            if type(raw_id) is str and raw_id and rule.given:  # the common case, inlined
                ids.append(raw_id)
                ordinals.append(ordinal)
                positions.append(line)
            else:
                rule.add(raw_id, ordinal, line)
        yield rule.take()


class _IdPass:
    """The id rules of :class:`batcher.io.rows._RowBuilder`, for ids only (see
    :func:`iter_row_ids`)."""

    def __init__(self, options: ReaderOptions) -> None:
        self.options = options
        self.given: bool | None = None
        self.ids: list[str] = []
        self.ordinals: list[int] = []
        self.positions: list[int] = []

    def column(self, shape: RowShape) -> str:
        if self.options.id_column is not None:
            return self.options.id_column
        return BATCH_ID_COLUMN if shape == "batch" else DEFAULT_ID_COLUMN

    def start(self) -> None:
        self.ids, self.ordinals, self.positions = [], [], []

    def take(self) -> tuple[list[str], list[int], list[int]]:
        return self.ids, self.ordinals, self.positions

    def add(self, raw_id: object, ordinal: int, position: int) -> None:
        """Data row ``ordinal`` (at packed ``position``) with id value ``raw_id``."""
        if type(raw_id) is str:
            if not raw_id:
                return
            row_id = raw_id
        elif raw_id is None:
            if self.given:
                return
            self.given = False
            row_id = f"row-{ordinal}"
        elif type(raw_id) is int:
            row_id = str(raw_id)
        else:
            return
        if raw_id is not None:
            if self.given is False:
                return
            self.given = True
        self.ids.append(row_id)
        self.ordinals.append(ordinal)
        self.positions.append(position)


def _row_group_sizes(parquet_file: pq.ParquetFile) -> Iterator[int]:
    metadata = parquet_file.metadata
    for index in range(metadata.num_row_groups):
        yield metadata.row_group(index).num_rows


def count_rows(path: Source) -> int:
    """The number of data rows in ``path``: Parquet from file metadata, JSONL by counting
    non-blank lines in large binary chunks (decompressing ``.gz``). Raises :class:`InputError`."""
    location = _location(path)
    kind, files = location.resolve()
    total = 0
    if kind == "parquet":
        for file in files:
            with location.open_parquet(file) as parquet_file:
                total += parquet_file.metadata.num_rows
        return total
    first = True
    for block in _jsonl_blocks(location, files[0], kind == "jsonl.gz"):
        if first and block.startswith(_BOM):  # a BOM is not content (as when reading)
            block = block[len(_BOM):]
        first = False
        total += _count_nonblank(block)
    return total


# --- opening inputs ---------------------------------------------------------------------


def _jsonl_blocks(location: InputLocation, file: InputFile, gz: bool) -> Iterator[bytes]:
    """A JSONL file's blocks of whole lines: through the location's scan, or read here."""
    if location.scan is not None:
        return location.scan.jsonl_blocks(location, file, gz)
    return read_blocks(location.open_binary(file, gz), file.source)


def _parquet_batches(location: InputLocation, file: InputFile, parquet_file: pq.ParquetFile,
                     batch_size: int, *, columns: list[str] | None = None,
                     use_threads: bool = True) -> Iterator[pa.RecordBatch]:
    """A Parquet file's record batches: through the location's scan, or read here from
    ``parquet_file`` (the file, open)."""
    if location.scan is not None:
        return location.scan.parquet_batches(location, file, columns, batch_size)
    return record_batches(parquet_file, file.source, batch_size, columns=columns,
                           use_threads=use_threads)


def _parquet_shape(source: str, names: list[str], options: ReaderOptions,
                   template: _Template | None) -> RowShape:
    """The shape of a Parquet file, from its columns; fatal when no row could ever be valid."""
    listing = ", ".join(names) or "(none)"
    if options.id_column is not None and options.id_column not in names:
        raise InputError(source, f"id column not found; the file's columns are: {listing}",
                         field=options.id_column)
    if template is not None:
        for name in template.fields:
            if name not in names:
                raise InputError(source, "the template uses this field, which is not a column;"
                                 f" the file's columns are: {listing}", field=name)
        return "template"
    if options.prompt_column is not None:
        if options.prompt_column not in names:
            raise InputError(source, "prompt column not found; the file's columns are: "
                             f"{listing}", field=options.prompt_column)
        return "prompt"
    if DEFAULT_PROMPT_COLUMN in names:
        return "prompt"
    if "messages" in names:
        return "messages"
    if "body" in names:
        return "batch"
    raise InputError(source, "cannot tell the row shape: no 'prompt', 'messages' or 'body' "
                     f"column (use --prompt-column or --template); the file's columns are: "
                     f"{listing}")


def read_blocks(stream: ByteStream, source: str) -> Iterator[bytes]:
    """``stream``'s bytes in large blocks, each ending just after a newline (the last may
    not); the stream is closed at the end. Read and decompression errors become
    :class:`InputError` naming ``source``."""
    with contextlib.closing(stream):
        pending: list[bytes] = []
        while True:
            try:
                chunk = stream.read(_CHUNK_BYTES)
            except (OSError, EOFError, zlib.error, pa.ArrowException) as exc:
                raise InputError(source, f"cannot read: {_short(exc)}") from exc
            if not chunk:
                break
            cut = chunk.rfind(b"\n")
            if cut < 0:  # a line longer than a chunk: gather it without quadratic copying
                pending.append(chunk)
                continue
            if pending:
                pending.append(chunk[:cut + 1])
                yield b"".join(pending)
                pending = []
            else:
                yield chunk[:cut + 1] if cut + 1 < len(chunk) else chunk
            if cut + 1 < len(chunk):
                pending.append(chunk[cut + 1:])
        if pending:
            yield b"".join(pending)


def _has_data(location: InputLocation, file: InputFile, gz: bool) -> bool:
    """Whether the JSONL file has at least one non-blank line (reads here, only as far as
    needed)."""
    first = True
    for block in read_blocks(location.open_binary(file, gz), file.source):
        if first and block.startswith(_BOM):
            block = block[len(_BOM):]
        first = False
        if block.strip():
            return True
    return False


def _count_nonblank(block: bytes) -> int:
    """Lines in ``block`` holding anything but whitespace (``bytes.strip``'s whitespace)."""
    lines = block.count(b"\n") + (0 if block.endswith(b"\n") else 1)
    # Fast path: when every line starts with "{" (JSONL objects) none can be blank; one
    # more C-speed scan instead of splitting the block into a million pieces.
    starts = block.count(b"\n{") + (1 if block.startswith(b"{") else 0)
    if starts == lines:
        return lines
    return sum(1 for piece in block.split(b"\n") if piece.strip())


# --- Parquet ----------------------------------------------------------------------------


def _iter_parquet(builder: _RowBuilder, location: InputLocation,
                  plans: list[tuple[InputFile, RowShape]], batch_size: int) -> Iterator[RowBatch]:
    for file_index, (file, shape) in enumerate(plans):
        with location.open_parquet(file) as parquet_file:
            yield from _parquet_file_batches(builder, location, file, parquet_file, file_index,
                                             shape, batch_size)


def _parquet_file_batches(builder: _RowBuilder, location: InputLocation, file: InputFile,
                          parquet_file: pq.ParquetFile, file_index: int, shape: RowShape,
                          batch_size: int) -> Iterator[RowBatch]:
    decode = _json_columns(shape, builder.options) & set(parquet_file.schema_arrow.names)
    build = builder.row_function(shape, file.source, file_index)
    line = 0
    for record_batch in _parquet_batches(location, file, parquet_file, batch_size):
        records = record_batch.to_pylist()
        for name in decode:
            for record in records:
                record[name] = _from_parquet_json(record[name])
        rows: list[RequestRow] = []
        problems: list[InputProblem] = []
        ordinal = builder.ordinal
        for record in records:
            line += 1
            ordinal += 1
            result = build(record, line, ordinal)
            if type(result) is RequestRow:
                rows.append(result)
            elif isinstance(result, InputProblem):
                problems.append(result)
        builder.ordinal = ordinal
        yield RowBatch(rows, problems, record_batch.num_rows)


def _json_columns(shape: RowShape, options: ReaderOptions) -> frozenset[str]:
    """Columns whose Parquet values may be JSON text or structs (nulls filled in by Arrow)."""
    names = {"params"}
    if shape == "messages":
        names.add("messages")
    if shape == "batch":
        names.add("body")
    return frozenset(names - {options.id_column})


def _from_parquet_json(value: object) -> object:
    # Parquet has no JSON type: these columns come as JSON text, or as structs where Arrow
    # fills every absent key with null — which an API would reject ("name": null).
    if type(value) is str:
        try:
            return orjson.loads(value)
        except orjson.JSONDecodeError:
            return value  # reported by the row checks as the wrong type
    return _drop_nulls(value)


def _drop_nulls(value: object) -> object:
    if type(value) is dict:
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None or k == "content"}
    if type(value) is list:
        return [_drop_nulls(v) for v in value]
    return value


def record_batches(parquet_file: pq.ParquetFile, source: str, batch_size: int, *,
                    columns: list[str] | None = None,
                    use_threads: bool = True) -> Iterator[pa.RecordBatch]:
    """Record batches of one file (of ``columns`` only, when given); decoding errors
    (corrupt pages) become InputError."""
    batches: Iterable[pa.RecordBatch] = parquet_file.iter_batches(
        batch_size=batch_size, columns=columns, use_threads=use_threads)
    iterator = iter(batches)
    while True:
        try:
            record_batch = next(iterator)
        except StopIteration:
            return
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise InputError(source, f"cannot read Parquet: {_short(exc)}") from exc
        yield record_batch
