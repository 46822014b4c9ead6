"""Ids of millions of rows with no Python object per row: hash-partitioned spill files on disk,
each partition resolved exactly by sorting its id strings.

The one primitive is :class:`Spill`: keyed entries ``(key, tag, seq, aux)`` are routed by a hash
of the key to one of a few partition files (Arrow IPC streams in a temporary folder); then each
partition is loaded alone and sorted by ``(key, tag, seq)``, so every occurrence of an id sits
together. A hash only decides *which file* an id goes to; whether two ids are equal is always
decided by comparing the strings, so a hash collision costs nothing but a bigger partition (a
test routes every id to one partition with a constant hash). Memory is one partition (about
``rows / partitions`` entries) plus one batch being routed, whatever the number of rows.

Three users: the reader's plan (which input rows are done already, which are duplicates, and
where each duplicate's id was first seen), the state's counters (the latest result per id),
and the final output (the latest result per id, in input order).

A resume needs no pass over the ids: what the first pass found about the input itself is kept
(:func:`save_input_plan`), and every result carries its input row's ordinal, so the rows done
(:func:`plan_from_ordinals`) and the output's order (:func:`ordinal_order`) are told by those
numbers. That holds while every result was written for this very input (no ``--force-resume``
since); otherwise the ids decide, as above.
"""

from __future__ import annotations

import array
import contextlib
import hashlib
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, cast

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc

HashFn = Callable[[str], int]

ROWS_PER_PARTITION = 500_000
"""Entries per partition aimed at (~25 MB of a partition's sort for 12-character ids)."""

MAX_PARTITIONS = 256
BATCH_ROWS = 65_536
"""Rows read (and routed) at a time from a result source."""

_FIELDS: list[pa.Field[Any]] = [pa.field("key", pa.string()), pa.field("tag", pa.int8()),
                                 pa.field("seq", pa.int64()), pa.field("aux", pa.int64())]
SCHEMA = pa.schema(_FIELDS)

IdBatch = tuple["pa.Array[Any]", "pa.Array[Any]"]
"""(ids: string, is_ok: bool) of a batch of results, oldest first."""


def partitions_for(rows: int) -> int:
    """How many partitions for about ``rows`` entries: a power of two (1 for small jobs)."""
    wanted = max(1, min(MAX_PARTITIONS, -(-rows // ROWS_PER_PARTITION)))
    return 1 << (wanted - 1).bit_length()


class Spill:
    """Hash-partitioned entries on disk; see the module docstring. Use as a context manager
    (the folder is deleted on exit). ``hash_fn`` is the partitioning hash (Python's ``hash``,
    which is consistent within one process: nothing spilled outlives the process)."""

    def __init__(self, partitions: int, *, folder: Path | None = None,
                 hash_fn: HashFn = hash) -> None:
        self.count = 1 << (max(1, partitions) - 1).bit_length()  # a power of two
        self.hash_fn = hash_fn
        self._dir = Path(tempfile.mkdtemp(prefix="batcher-ids-", dir=folder))
        self._writers: list[ipc.RecordBatchStreamWriter | None] = [None] * self.count
        self.rows = 0

    def __enter__(self) -> Spill:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for writer in self._writers:
            if writer is not None:
                with contextlib.suppress(OSError, pa.ArrowException):
                    writer.close()
        self._writers = [None] * self.count
        shutil.rmtree(self._dir, ignore_errors=True)

    def _path(self, index: int) -> Path:
        return self._dir / f"p{index:03d}.arrow"

    def _write(self, index: int, batch: pa.RecordBatch) -> None:
        writer = self._writers[index]
        if writer is None:
            writer = self._writers[index] = ipc.new_stream(str(self._path(index)), SCHEMA)
        writer.write_batch(batch)

    def add(self, keys: pa.Array[Any] | list[str], tag: int,
            seqs: pa.Array[Any] | list[int], aux: pa.Array[Any] | list[int] | None = None
            ) -> None:
        """Spill one batch of entries (``keys`` are strings, no nulls)."""
        n = len(keys)
        if n == 0:
            return
        key_array = keys if isinstance(keys, pa.Array) else pa.array(keys, pa.string())
        batch = pa.RecordBatch.from_arrays(
            [key_array.cast(pa.string()), pa.array([tag] * n, pa.int8()) if n else
             pa.array([], pa.int8()),
             pa.array(seqs, pa.int64()) if not isinstance(seqs, pa.Array)
             else seqs.cast(pa.int64()),
             pa.nulls(n, pa.int64()) if aux is None else
             (pa.array(aux, pa.int64()) if not isinstance(aux, pa.Array)
              else aux.cast(pa.int64()))],
            schema=SCHEMA)
        self.rows += n
        if self.count == 1:
            self._write(0, batch)
            return
        plain = cast("list[str]", keys.to_pylist()) if isinstance(keys, pa.Array) else keys
        mask, hash_fn = self.count - 1, self.hash_fn  # count is a power of two
        where = pa.array([hash_fn(k) & mask for k in plain], pa.int32())
        del plain
        order = pc.sort_indices(where)
        routed = batch.take(order)
        offset = 0
        counts = pc.value_counts(where.take(order))
        for item in counts:
            index = item["values"].as_py()
            size = item["counts"].as_py()
            self._write(index, routed.slice(offset, size))
            offset += size

    def partitions(self) -> Iterator[pa.Table]:
        """Each partition's entries sorted by (key, tag, seq), one partition at a time; each
        file is deleted once read. Ends the spill's writing."""
        for writer in self._writers:
            if writer is not None:
                writer.close()
        self._writers = [None] * self.count
        for index in range(self.count):
            path = self._path(index)
            if not path.exists():
                continue
            with pa.memory_map(str(path)) as source:
                table = ipc.open_stream(source).read_all()
            order = pc.sort_indices(table, sort_keys=[("key", "ascending"),
                                                      ("tag", "ascending"),
                                                      ("seq", "ascending")])
            sorted_table = table.take(order)
            del table, order
            path.unlink()
            yield sorted_table
            del sorted_table
            pa.default_memory_pool().release_unused()


# --- vector helpers ---------------------------------------------------------------------


def _flat(array: pa.ChunkedArray[Any] | pa.Array[Any]) -> pa.Array[Any]:
    return array.combine_chunks() if isinstance(array, pa.ChunkedArray) else array


def _shift(array: pa.Array[Any], fill: Any) -> pa.Array[Any]:
    """``array`` moved down one place: element i is ``array[i-1]``; element 0 is ``fill``."""
    head = pa.array([fill], array.type)
    return pa.concat_arrays([head, array.slice(0, len(array) - 1)])


def _same_as_previous(keys: pa.Array[Any]) -> pa.Array[Any]:
    n = len(keys)
    if n == 0:
        return pa.array([], pa.bool_())
    same = pc.equal(keys.slice(1), keys.slice(0, n - 1))
    return pa.concat_arrays([pa.array([False]), _flat(same)])


def _same_as_next(keys: pa.Array[Any]) -> pa.Array[Any]:
    n = len(keys)
    if n == 0:
        return pa.array([], pa.bool_())
    same = pc.equal(keys.slice(0, n - 1), keys.slice(1))
    return pa.concat_arrays([_flat(same), pa.array([False])])


# --- result sources ---------------------------------------------------------------------


ResultSource = Iterable[IdBatch]
"""One source of results (a part, a journal, the previous output), read in batches."""


def spill_results(spill: Spill, sources: Iterable[ResultSource], tag: int) -> list[int]:
    """Spill every result row of ``sources`` (oldest first) as ``(id, tag, seq, is_ok)``,
    ``seq`` counting rows across all sources from 0; returns each source's row count."""
    seq = 0
    counts: list[int] = []
    for source in sources:
        start = seq
        for ids, is_ok in source:
            n = len(ids)
            valid = pc.is_valid(ids)
            seqs = pa.array(range(seq, seq + n), pa.int64())
            if valid.false_count:
                ids, is_ok, seqs = ids.filter(valid), is_ok.filter(valid), seqs.filter(valid)
            spill.add(ids, tag, seqs, pc.cast(is_ok, pa.int64()))
            seq += n
        counts.append(seq - start)
    return counts


def latest_counts(sources: Iterable[ResultSource], rows_hint: int = 0,
                  folder: Path | None = None, hash_fn: HashFn = hash) -> tuple[int, int]:
    """(ids whose latest result is ok, ids whose latest result is not ok) over ``sources``
    (oldest first; within a source the later row wins)."""
    ok = error = 0
    with Spill(partitions_for(rows_hint), folder=folder, hash_fn=hash_fn) as spill:
        spill_results(spill, sources, 0)
        for table in spill.partitions():
            last = _same_as_next(_flat(table["key"]))
            latest = _flat(table["aux"]).filter(pc.invert(last))
            good = int(pc.sum(latest).as_py() or 0)
            ok += good
            error += len(latest) - good
    return ok, error


# --- the reader's plan ------------------------------------------------------------------

NEW, DONE, DUPLICATE = 0, 1, 2
_INPUT_TAG, _RESULT_TAG = 1, 0


class RowPlan:
    """What to do with each input row, by its 1-based data-row ordinal: send it (``NEW``),
    skip it (``DONE``: its id has a result that counts as done), or report it (``DUPLICATE``:
    an earlier row has its id; :meth:`first` says where and whether that row is done).

    Two bitmaps (one bit per row each: 2.5 MB for 10M rows, built with Arrow kernels) plus a
    small entry per duplicate; no Python object per row.
    """

    __slots__ = ("_done_array", "_dup_array", "_dups", "done", "done_bits", "dup_bits",
                 "duplicates", "rows")

    def __init__(self, rows: int) -> None:
        self.rows = rows
        # Made at the first mark (see _marks): a plan built without Arrow stays without it.
        self._done_array: pa.Array[Any] | None = None
        self._dup_array: pa.Array[Any] | None = None
        self._dups: dict[int, tuple[int, int]] = {}
        self.done = 0
        self.duplicates = 0
        self.done_bits = b""
        """Bit ``o`` (``done_bits[o >> 3] >> (o & 7) & 1``) is set when row ``o`` is done."""
        self.dup_bits = b""

    def state(self, ordinal: int) -> int:
        index, bit = ordinal >> 3, 1 << (ordinal & 7)
        if index >= len(self.done_bits):
            return NEW
        if self.done_bits[index] & bit:
            return DONE
        if self.dup_bits[index] & bit:
            return DUPLICATE
        return NEW

    def all_done(self, start: int, count: int) -> bool:
        """Whether rows ``start`` … ``start + count - 1`` are all done (C-speed on whole bytes)."""
        bits, end, ordinal = self.done_bits, start + count, start
        if end > (len(bits) << 3):
            return False
        while ordinal < end and ordinal & 7:
            if not bits[ordinal >> 3] >> (ordinal & 7) & 1:
                return False
            ordinal += 1
        whole_end = end & ~7
        if ordinal < whole_end:
            segment = bits[ordinal >> 3:whole_end >> 3]
            if segment.count(255) != len(segment):
                return False
            ordinal = whole_end
        while ordinal < end:
            if not bits[ordinal >> 3] >> (ordinal & 7) & 1:
                return False
            ordinal += 1
        return True

    def first(self, ordinal: int) -> tuple[int, bool]:
        """(packed position of the first row with this duplicate's id, whether it is done)."""
        position, first = self._dups[ordinal]
        return position, self.state(first) == DONE

    def _marks(self, array: pa.Array[Any] | None) -> pa.Array[Any]:
        """``array``, or no row marked yet: ``rows + 1`` falses (by ordinal)."""
        if array is not None:
            return array
        return cast("pa.Array[Any]", pc.fill_null(pa.nulls(self.rows + 1, pa.bool_()),
                                                  pa.scalar(False)))

    def _scatter(self, into: pa.Array[Any] | None, ordinals: pa.Array[Any]) -> pa.Array[Any]:
        marks = pc.scatter(pc.is_valid(ordinals), ordinals,  # type: ignore[attr-defined]
                           max_index=self.rows)
        return _flat(pc.or_(self._marks(into), pc.fill_null(marks, pa.scalar(False))))

    def mark_done(self, ordinals: pa.Array[Any]) -> None:
        if len(ordinals):
            self._done_array = self._scatter(self._done_array, ordinals)
            self.done += len(ordinals)

    def mark_duplicates(self, ordinals: pa.Array[Any], positions: list[int],
                        first_ordinals: list[int]) -> None:
        """Rows ``ordinals`` are duplicates; the first row with each one's id is at packed
        position ``positions[i]``, ordinal ``first_ordinals[i]``."""
        if len(ordinals):
            self._dup_array = self._scatter(self._dup_array, ordinals)
            self._dups.update(zip(cast("list[int]", ordinals.to_pylist()),
                                  zip(positions, first_ordinals, strict=True), strict=True))
            self.duplicates += len(ordinals)

    def set_done(self, done: pa.Array[Any]) -> None:
        """The done rows as a whole: a boolean array of ``rows + 1`` entries (by ordinal)."""
        self._done_array = done
        self.done = int(pc.sum(done).as_py() or 0)

    def seal(self) -> None:
        """Freeze the bitmaps into bytes for the reader's per-row lookups."""
        self.done_bits = _bits(self._marks(self._done_array))
        self.dup_bits = _bits(self._marks(self._dup_array))

    @classmethod
    def of_duplicates(cls, rows: int, duplicates: dict[int, tuple[int, int]]) -> RowPlan:
        """The sealed plan of an input with nothing done: ``duplicates`` maps each duplicate
        row's ordinal to (packed position, ordinal) of the first row with its id. Built in
        Python, without Arrow."""
        plan = cls(rows)
        size = (rows >> 3) + 1  # one bit per ordinal 0 … rows, as seal() gives
        dup_bits = bytearray(size)
        for ordinal in duplicates:
            dup_bits[ordinal >> 3] |= 1 << (ordinal & 7)
        plan._dups = duplicates
        plan.duplicates = len(duplicates)
        plan.done_bits = bytes(size)
        plan.dup_bits = bytes(dup_bits)
        return plan


def _bits(array: pa.Array[Any]) -> bytes:
    """The packed values of a boolean array (bit i of the result is element i)."""
    if array.offset:
        array = pa.concat_arrays([array])  # a copy starting at offset 0
    buffer = array.buffers()[1]
    assert buffer is not None
    return buffer.to_pybytes()[: (len(array) + 7) >> 3]


InputIds = Iterable[tuple[list[str], list[int], list[int]]]
"""Batches of (id, ordinal, packed position) of the input's rows that have a usable id."""


def build_plan(input_ids: InputIds, results: Iterable[ResultSource] = (), *,
               rows_hint: int = 0,
               ok_only: bool = False, skip_ids: Iterable[str] = (),
               folder: Path | None = None, hash_fn: HashFn = hash) -> RowPlan:
    """The :class:`RowPlan` of the input whose ids ``input_ids`` gives.

    ``rows_hint`` (input rows plus result rows, roughly) sizes the spill. ``results``: result
    sources, oldest first; an input id is done when its latest result is ok, or any result
    unless ``ok_only``. ``skip_ids``: more ids that count as done. The first row with an id
    owns it; every later row with it is a duplicate.
    """
    with Spill(partitions_for(rows_hint), folder=folder, hash_fn=hash_fn) as spill:
        spill_results(spill, results, _RESULT_TAG)
        extra = sorted(set(skip_ids))
        if extra:
            spill.add(extra, _RESULT_TAG, [-1] * len(extra), [1] * len(extra))
        rows = 0
        for ids, ordinals, positions in input_ids:
            spill.add(ids, _INPUT_TAG, ordinals, positions)
            if ordinals:
                rows = max(rows, ordinals[-1])
        plan = RowPlan(rows)
        for table in spill.partitions():
            _resolve_plan(table, plan, ok_only)
    plan.seal()
    return plan


SMALL_PLAN_ROWS = 50_000
"""Inputs up to this many rows with no result yet get :func:`plan_without_results`."""


def plan_without_results(input_ids: InputIds) -> RowPlan:
    """The :class:`RowPlan` of an input with no result yet (a first run): only its duplicates,
    as :func:`build_plan` finds them (the first row with an id owns it).

    For small inputs (:data:`SMALL_PLAN_ROWS`): one pass with a dict of the ids (~150 bytes
    an id, freed on return), and no Arrow at all. That matters before the first request is
    sent: pyarrow's first conversion of Python values imports pandas when it is installed
    (~0.3 s of CPU), which :func:`build_plan` would pay on the way to the first request
    (:func:`save_input_plan` does not convert either)."""
    first: dict[str, tuple[int, int]] = {}
    duplicates: dict[int, tuple[int, int]] = {}
    rows = 0
    for ids, ordinals, positions in input_ids:
        for key, ordinal, position in zip(ids, ordinals, positions, strict=True):
            owner = first.setdefault(key, (position, ordinal))
            if owner[1] != ordinal:
                duplicates[ordinal] = owner
        if ordinals:
            rows = max(rows, ordinals[-1])
    return RowPlan.of_duplicates(rows, duplicates)


def _resolve_plan(table: pa.Table, plan: RowPlan, ok_only: bool) -> None:
    keys = _flat(table["key"])
    is_input = pc.equal(_flat(table["tag"]), pa.scalar(_INPUT_TAG, pa.int8()))
    prev_same = _same_as_previous(keys)
    prev_input = _shift(is_input, False)
    after_input = pc.and_(prev_same, prev_input)
    dup = pc.and_(is_input, after_input)
    first = pc.and_(is_input, pc.invert(after_input))
    aux = _flat(table["aux"])
    # Results sort before the inputs of their id, oldest first: the row just before an id's
    # first input row is that id's latest result, if it has any.
    prev_aux = _shift(aux, 0)
    had_result = pc.and_(first, prev_same)
    done = had_result if not ok_only else cast("pa.Array[pa.BooleanScalar]", pc.and_(
        had_result, pc.equal(pc.fill_null(prev_aux, pa.scalar(0, pa.int64())),
                             pa.scalar(1, pa.int64()))))
    seqs = _flat(table["seq"])
    plan.mark_done(seqs.filter(done))
    if dup.true_count:
        nothing = pa.scalar(None, pa.int64())
        first_where = pc.fill_null_forward(pc.if_else(first, aux, nothing))
        first_ordinal = pc.fill_null_forward(pc.if_else(first, seqs, nothing))
        plan.mark_duplicates(seqs.filter(dup),
                             cast("list[int]", _flat(first_where).filter(dup).to_pylist()),
                             cast("list[int]", _flat(first_ordinal).filter(dup).to_pylist()))


# --- a resume by ordinals ----------------------------------------------------------------

OrdinalSource = Iterable[tuple["pa.Array[Any]", "pa.Array[Any]"]]
"""One result source as (input ordinals: int64 without nulls, is_ok: bool) batches, oldest
first (:func:`batcher.io.writer.iter_ordinal_status`)."""

_PLAN_SCHEMA = pa.schema([("ordinal", pa.int64()), ("position", pa.int64()),
                          ("first", pa.int64())])


def input_plan_key(fingerprint: Mapping[str, object]) -> str:
    """The key :func:`save_input_plan` keeps a plan under: a digest of the run's fingerprint
    (the input's, and the options that decide its ids)."""
    return hashlib.sha256(orjson.dumps(fingerprint, option=orjson.OPT_SORT_KEYS)).hexdigest()


def save_input_plan(path: Path, key: str, plan: RowPlan) -> None:
    """Keep what ``plan`` learnt of the input itself (its rows, and each duplicate with where
    its id was first seen) in ``path`` for :func:`load_input_plan`; ``key`` names the input
    and the id rules it was read with. Atomic (a temporary file renamed); best effort."""
    items = sorted(plan._dups.items())
    table = pa.Table.from_arrays(
        [_int64s([o for o, _ in items]), _int64s([p for _, (p, _) in items]),
         _int64s([f for _, (_, f) in items])],
        schema=_PLAN_SCHEMA.with_metadata({"key": key, "rows": str(plan.rows)}))
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with ipc.new_file(str(tmp), table.schema) as writer:
            writer.write_table(table)
        tmp.replace(path)
    except (OSError, pa.ArrowException):
        with contextlib.suppress(OSError):
            tmp.unlink()


def _int64s(values: list[int]) -> pa.Array[Any]:
    """``values`` as an Arrow int64 array, made from their bytes: unlike ``pa.array``, this
    does not import pandas (pyarrow does at its first conversion of Python values, ~0.3 s),
    so that a small first run saves its plan before its first request at no such cost."""
    return pa.Array.from_buffers(pa.int64(), len(values),
                                 [None, pa.py_buffer(array.array("q", values))])


def load_input_plan(path: Path, key: str) -> RowPlan | None:
    """The unsealed :class:`RowPlan` of the input :func:`save_input_plan` kept under ``key``
    (its duplicates, nothing done yet), or None when there is none for this key."""
    try:
        with pa.memory_map(str(path)) as source:
            table = ipc.open_file(source).read_all()
    except (OSError, pa.ArrowException):
        return None
    meta = table.schema.metadata or {}
    if meta.get(b"key") != key.encode() or table.schema.remove_metadata() != _PLAN_SCHEMA:
        return None
    try:
        plan = RowPlan(int(meta[b"rows"]))
    except (KeyError, ValueError):
        return None
    plan.mark_duplicates(_flat(table["ordinal"]),
                         cast("list[int]", table["position"].to_pylist()),
                         cast("list[int]", table["first"].to_pylist()))
    return plan


def plan_from_ordinals(plan: RowPlan, results: Iterable[OrdinalSource], *,
                       ok_only: bool = False) -> RowPlan | None:
    """``plan`` (from :func:`load_input_plan`) with the rows ``results`` answered marked
    done, and sealed: the rows done are told by their ordinals, with no pass over the input
    and nothing spilled (a 10M-row resume in about a second). Valid when every result was
    written for this very input. A row is done when it has a result (``ok_only``: when its
    latest result, the last in ``results`` order, is ok). None when an ordinal lies outside
    the input (it was not written for it): build the plan from the ids instead."""
    marks: pa.Array[Any] | None = None
    ordinals: list[pa.Array[Any]] = []
    values: list[pa.Array[Any]] = []
    held = 0

    def scatter() -> bool:
        # Each ordinal takes the value of its last occurrence: scatter writes in order, and
        # a later group's marks cover an earlier group's.
        nonlocal marks, ordinals, values, held
        group = pa.chunked_array(ordinals, pa.int64()).combine_chunks()
        low, high = pc.min_max(group).values()
        if low.as_py() < 1 or high.as_py() > plan.rows:
            return False
        new = pc.scatter(pa.chunked_array(values, pa.bool_()).combine_chunks(),  # type: ignore[attr-defined]
                         group, max_index=plan.rows)
        marks = new if marks is None else _flat(pc.coalesce(new, marks))
        ordinals, values, held = [], [], 0
        return True

    for source in results:
        for batch_ordinals, is_ok in source:
            ordinals.append(batch_ordinals.cast(pa.int64()))
            values.append(is_ok if ok_only else pc.is_valid(batch_ordinals))
            held += len(batch_ordinals)
            if held >= ROWS_PER_PARTITION and not scatter():
                return None
    if held and not scatter():
        return None
    if marks is not None:
        plan.set_done(_flat(cast("pa.Array[Any]", pc.fill_null(marks, pa.scalar(False)))))
    plan.seal()
    return plan


# --- the final output's order -----------------------------------------------------------


def output_order(results: Iterable[ResultSource], input_ids: InputIds | None, input_rows: int, *,
                 rows_hint: int = 0, folder: Path | None = None, hash_fn: HashFn = hash
                 ) -> tuple[list[int], Iterator[pa.Array[Any]]]:
    """The rows of the final output: the latest result row of each id across ``results``
    (oldest first), in input order when ``input_ids`` is given (the ids the input no longer
    has after them, oldest result first), else in ``results`` order.

    Returns each source's row count and an iterator of ``seq`` arrays: global row numbers
    (the sources concatenated) in output order, about :data:`ROWS_PER_PARTITION` at a time.
    Spilled twice: by id hash (to find each id's latest row and its input position), then by
    output position (to sort). ``input_rows``: the input's data rows (a bound on ordinals).
    """
    by_id = Spill(partitions_for(input_rows + rows_hint), folder=folder, hash_fn=hash_fn)
    by_position: _RangeSpill | None = None
    try:
        counts = spill_results(by_id, results, 1)
        total = sum(counts)
        if input_ids is not None:
            for ids, ordinals, _ in input_ids:
                by_id.add(ids, 0, ordinals)
        span = input_rows + 1 if input_ids is not None else total
        ranges = max(1, -(-span // ROWS_PER_PARTITION))
        width = max(1, -(-span // ranges))
        extra_width = max(1, ROWS_PER_PARTITION)
        by_position = _RangeSpill(folder)
        for table in by_id.partitions():
            keys = _flat(table["key"])
            is_result = pc.equal(_flat(table["tag"]), pa.scalar(1, pa.int8()))
            latest = pc.and_(is_result, pc.invert(_same_as_next(keys)))
            seqs = _flat(table["seq"])
            kept_seq = seqs.filter(latest)
            if input_ids is None:
                by_position.add(pc.divide(kept_seq, pa.scalar(width, pa.int64())),
                                kept_seq, kept_seq)
                continue
            # An id's group starts with its first input row when the input has the id.
            group_start = pc.invert(_same_as_previous(keys))
            start_value = pc.if_else(is_result, pa.scalar(-1, pa.int64()), seqs)
            ordinal = _flat(pc.fill_null_forward(
                pc.if_else(group_start, start_value, pa.scalar(None, pa.int64()))))
            kept_ordinal = ordinal.filter(latest)
            missing = pc.less(kept_ordinal, pa.scalar(0, pa.int64()))
            # Rows the input lacks go after every input row, oldest result first.
            bucket = pc.if_else(
                missing,
                pc.add(pc.divide(kept_seq, pa.scalar(extra_width, pa.int64())),
                       pa.scalar(ranges, pa.int64())),
                pc.divide(kept_ordinal, pa.scalar(width, pa.int64())))
            position = pc.if_else(missing, kept_seq, kept_ordinal)
            by_position.add(_flat(bucket), _flat(position), kept_seq)
        by_id.close()
        spilled, by_position = by_position, None
        return counts, spilled.sorted_seqs()
    finally:
        by_id.close()
        if by_position is not None:
            by_position.close()


def ordinal_order(results: Iterable[OrdinalSource], input_rows: int, *,
                  folder: Path | None = None) -> Iterator[pa.Array[Any]]:
    """The rows of the final output told by the input ordinals the results carry (all written
    for this very input): the latest result row of each ordinal, in input order, as
    :func:`output_order` gives them (``seq`` arrays), with no pass over the input. Spilled
    once, by ordinal range. Whatever a source raises (:class:`batcher.io.writer.NoOrdinals`)
    propagates, with nothing left behind."""
    ranges = max(1, -(-(input_rows + 1) // ROWS_PER_PARTITION))
    width = pa.scalar(max(1, -(-(input_rows + 1) // ranges)), pa.int64())
    spill = _RangeSpill(folder)
    try:
        seq = 0
        for source in results:
            for ordinals, _ in source:
                n = len(ordinals)
                spill.add(_flat(pc.divide(ordinals, width)), ordinals,
                          pa.array(range(seq, seq + n), pa.int64()))
                seq += n
    except BaseException:
        spill.close()
        raise
    return spill.sorted_seqs(latest=True)


class _RangeSpill:
    """(position, seq) pairs routed to numbered files (by position range), read back file by
    file in number order, each sorted by position."""

    def __init__(self, folder: Path | None) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix="batcher-order-", dir=folder))
        self._schema = pa.schema([("pos", pa.int64()), ("seq", pa.int64())])
        self._writers: dict[int, ipc.RecordBatchStreamWriter] = {}

    def add(self, buckets: pa.Array[Any], positions: pa.Array[Any],
            seqs: pa.Array[Any]) -> None:
        if len(positions) == 0:
            return
        order = pc.sort_indices(buckets)
        batch = pa.RecordBatch.from_arrays([positions.take(order), seqs.take(order)],
                                           schema=self._schema)
        offset = 0
        for item in pc.value_counts(buckets.take(order)):
            index, size = item["values"].as_py(), item["counts"].as_py()
            writer = self._writers.get(index)
            if writer is None:
                writer = self._writers[index] = ipc.new_stream(
                    str(self._dir / f"r{index:06d}.arrow"), self._schema)
            writer.write_batch(batch.slice(offset, size))
            offset += size

    def close(self) -> None:
        for writer in self._writers.values():
            with contextlib.suppress(OSError, pa.ArrowException):
                writer.close()
        self._writers = {}
        shutil.rmtree(self._dir, ignore_errors=True)

    def sorted_seqs(self, *, latest: bool = False) -> Iterator[pa.Array[Any]]:
        """Each file's seqs sorted by position (then seq); ``latest``: only the last (the
        highest seq) of each position."""
        for writer in self._writers.values():
            writer.close()
        indexes = sorted(self._writers)
        self._writers = {}
        try:
            for index in indexes:
                path = self._dir / f"r{index:06d}.arrow"
                with pa.memory_map(str(path)) as source:
                    table = ipc.open_stream(source).read_all()
                path.unlink()
                order = pc.sort_indices(table, sort_keys=[("pos", "ascending"),
                                                          ("seq", "ascending")])
                seqs = _flat(table["seq"]).take(order)
                if latest:
                    seqs = seqs.filter(pc.invert(_same_as_next(_flat(table["pos"]).take(order))))
                # Only the seqs live on while the caller gathers this range's rows.
                del table, order
                yield seqs
                del seqs
        finally:
            self.close()
