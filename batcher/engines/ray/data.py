"""Reading the input with Ray Data (``--engine ray``): the content of the input's files
streamed to the driver in order, for the driver's reader to build rows from.

The driver keeps the job (see :mod:`.engine`), so the rows are built there, by the same
reader as the local engine: Ray Data only brings the content. Each file is one dataset of
one read task (:class:`_FileSource`, via :func:`ray.data.read_datasource`) that runs on the
cluster: for JSONL it yields the file's bytes in blocks of whole lines (gzip decompressed
there), for Parquet its record batches (only the columns the pass needs), read by the same
pyarrow code as the local engine. So rows, ids, line numbers and bad-row reports are exactly
the local engine's.

The driver's memory does not grow with the input (tests/perf/bench_ray_input.py):

- Blocks come back in order, about :data:`BLOCK_BYTES` each: each dataset asks Ray Data for
  blocks of that size (its default, 128 MiB, merged a file's tables into one block: a 71 MB
  JSONL reached the driver whole).
- Ray Data reads at most :data:`READ_AHEAD_BYTES` ahead of the driver (by default it keeps
  reading into the object store up to a share of the store's size: a whole file).
- The driver reads a block zero-copy from the object store's shared memory, and every page it
  touches stays counted in its RSS while mapped, also once the block is freed; blocks read
  ahead sit at fresh addresses, so that count grew with the bytes read (up to the store's
  size). Once the driver has a block's content, :func:`_unmap` drops those pages from its
  page table (the data stays in the store).

Why not :func:`ray.data.read_parquet` / ``read_json``: ``read_json`` parses lines into an
Arrow table (other types, no per-line reports); ``read_parquet`` in Ray 2.60 plans a
file-listing step that asks for a CPU, and with the sending actors holding every CPU of the
cluster it never ran (the job hung); it also adds columns from ``key=value`` folders and
unifies the files' schemas.

Read tasks ask for no CPU (the actors may hold them all; a read is I/O-bound). A local path
is read on the driver's node (the only one that surely has it); a URL on any node, with
that node's credentials.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import mmap
import sys
from collections.abc import Callable, Iterator
from typing import Any, cast

import pyarrow as pa
import ray
from ray.data import DataContext, ExecutionResources
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask
from ray.exceptions import RayError

from batcher.errors import InputError
from batcher.io.location import InputFile, InputLocation
from batcher.io.readers import read_blocks, record_batches
from batcher.log import get_logger

BLOCK_BYTES = 4 << 20
"""About how many bytes go in one Ray block (JSONL: whole lines; Parquet: whole record
batches). Large enough that Ray's cost per block vanishes, small enough that the blocks
read ahead stay a few MiB."""
READ_AHEAD_BYTES = 4 * BLOCK_BYTES
"""How much of a file Ray Data holds in the object store ahead of the driver, at most (its
``object_store_memory`` limit for the dataset; the driver's own prefetch adds two blocks)."""
NODE_LABEL = "ray.io/node-id"
"""The label Ray gives every node: its id (reads of a local path stay on this node)."""


class RayScan:
    """The :class:`~batcher.io.location.InputScan` of ``--engine ray``. Joins the cluster at its
    first read (``address`` as for :func:`~.engine.connect`); :meth:`close` shuts Ray down
    if this scan started it."""

    def __init__(self, address: str | None) -> None:
        self.address = address
        self._connected = False
        self._owned = False
        self._announced = False

    def connect(self) -> None:
        """Join (or start) Ray once; the engine's actors use the same connection."""
        if not self._connected:
            from .engine import connect  # engine imports this module

            self._owned = connect(self.address)
            self._connected = True
            context = DataContext.get_current()
            context.execution_options.preserve_order = True   # rows in input order
            context.enable_progress_bars = False   # the job's own progress bar is the one
            context.print_on_execution_start = False
            # Ray Data's own notes (progress bars off, each dataset's timing) are not the
            # job's; its errors reach the job as InputError.
            logging.getLogger("ray.data").setLevel(logging.ERROR)

    def close(self) -> None:
        if self._owned:
            ray.shutdown()
        self._owned = self._connected = False

    def jsonl_blocks(self, location: InputLocation, file: InputFile,
                     gz: bool) -> Iterator[bytes]:
        for table in self._read(location, file, functools.partial(_read_jsonl, gz=gz)):
            blocks = cast(list[bytes], table.column(_DATA).to_pylist())
            _unmap(table)
            del table
            yield from blocks

    def parquet_batches(self, location: InputLocation, file: InputFile,
                        columns: list[str] | None, batch_size: int) -> Iterator[pa.RecordBatch]:
        read = functools.partial(_read_parquet, columns=columns, batch_size=batch_size)
        for table in self._read(location, file, read):
            yield from table.to_batches(max_chunksize=batch_size)
            _unmap(table)   # the reader has asked for the batch after these

    def _read(self, location: InputLocation, file: InputFile, read: _Read) -> Iterator[pa.Table]:
        """The tables ``read`` yields in a read task, in order; a read error (the table
        :func:`_failed` makes, or Ray's) becomes InputError naming the file."""
        self.connect()
        if not self._announced:
            self._announced = True
            get_logger().info("ray_data_read", input=location.given, files=len(
                location.resolve()[1]), note="the input is read by Ray Data read tasks")
        args: dict[str, Any] = {"num_cpus": 0}
        if not location.url:
            args["label_selector"] = {NODE_LABEL: ray.get_runtime_context().get_node_id()}
        dataset = ray.data.read_datasource(_FileSource(location.given, file, read),
                                           override_num_blocks=1, **args)
        dataset.context.target_max_block_size = BLOCK_BYTES
        dataset.context.execution_options.resource_limits = ExecutionResources(
            object_store_memory=READ_AHEAD_BYTES)
        batches = iter(dataset.iter_batches(batch_size=None, batch_format="pyarrow",
                                            prefetch_batches=2))
        while True:
            try:
                table = next(batches)
            except StopIteration:
                return
            except (RayError, pa.ArrowException, OSError) as exc:
                raise InputError(file.source, f"cannot read: {_cause(exc)}") from exc
            assert isinstance(table, pa.Table)
            if table.column_names == [_ERROR]:
                raise InputError(file.source, str(table.column(_ERROR)[0]))
            yield table


_Read = Callable[[InputLocation, InputFile], Iterator[pa.Table]]
_DATA = "data"
_ERROR = "batcher.read_error"


def _cause(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None) or exc.__cause__ or exc
    lines = str(cause).strip().splitlines()
    return lines[-1] if lines else type(cause).__name__


class _FileSource(Datasource):
    """One file of the input as one read task running ``read`` (on the file's
    location, rebuilt in the task: a URL's filesystem with the reading node's credentials)."""

    def __init__(self, given: str, file: InputFile, read: _Read) -> None:
        super().__init__()
        self._given = given
        self._file = file
        self._read = read

    def estimate_inmemory_data_size(self) -> int | None:
        return self._file.size

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: DataContext | None = None) -> list[ReadTask]:
        given, file, read = self._given, self._file, self._read
        metadata = BlockMetadata(num_rows=None, size_bytes=file.size, exec_stats=None,
                                 input_files=(file.source,))
        return [ReadTask(lambda: _guarded(read(InputLocation(given), file)), metadata)]


def _guarded(tables: Iterator[pa.Table]) -> Iterator[pa.Table]:
    """Runs in the read task: ``tables``, ended by one table that says why when reading
    fails (an InputError raised here would reach the driver as a Ray task failure, retried,
    and logged with its traceback)."""
    try:
        yield from tables
    except InputError as exc:
        yield pa.table({_ERROR: [exc.detail]})


def _read_jsonl(location: InputLocation, file: InputFile, *, gz: bool) -> Iterator[pa.Table]:
    """Runs in the read task: the file's blocks of whole lines, bundled into tables of one
    column of about :data:`BLOCK_BYTES` each."""
    bundle: list[bytes] = []
    size = 0
    for block in read_blocks(location.open_binary(file, gz), file.source):
        bundle.append(block)
        size += len(block)
        if size >= BLOCK_BYTES:
            yield pa.table({_DATA: pa.array(bundle, pa.large_binary())})
            bundle, size = [], 0
    if bundle:
        yield pa.table({_DATA: pa.array(bundle, pa.large_binary())})


def _read_parquet(location: InputLocation, file: InputFile, *, columns: list[str] | None,
                  batch_size: int) -> Iterator[pa.Table]:
    """Runs in the read task: the file's record batches (of ``columns`` only, when given),
    as the local reader reads them, bundled into tables of about :data:`BLOCK_BYTES`."""
    with location.open_parquet(file) as parquet_file:
        bundle: list[pa.RecordBatch] = []
        size = 0
        for batch in record_batches(parquet_file, file.source, batch_size, columns=columns):
            bundle.append(batch)
            size += batch.nbytes
            if size >= BLOCK_BYTES:
                yield pa.Table.from_batches(bundle)
                bundle, size = [], 0
        if bundle:
            yield pa.Table.from_batches(bundle)


_MADV_DONTNEED = 4
"""Linux's ``madvise`` advice that drops a range's pages from the process's page table. On a
shared mapping (the object store's) the data stays in the shared memory, and a later access
reads it back; on private memory it would discard the data, so :func:`_unmap` only applies it
inside shared mappings."""
_madvise: Callable[[int, int, int], int] | None = None
if sys.platform == "linux":
    _libc = ctypes.CDLL(None, use_errno=True)
    _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    _libc.madvise.restype = ctypes.c_int
    _madvise = _libc.madvise


def _shared_mappings() -> list[tuple[int, int]]:
    """This process's shared mappings, (start, end), as of now (read afresh each time: an
    address that was shared once may be private memory later)."""
    spans = []
    with open("/proc/self/maps", encoding="ascii", errors="replace") as maps:
        for line in maps:
            span, perms = line.split(maxsplit=2)[:2]
            if perms[3:4] == "s":
                start, end = span.split("-")
                spans.append((int(start, 16), int(end, 16)))
    return spans


def _unmap(table: pa.Table) -> None:
    """Drops the whole pages of ``table``'s buffers that lie in a shared mapping (the object
    store's) from this process's page table, so they stop counting in its RSS. Safe while the
    table is still referenced: a later read faults the pages back in from the store. Does
    nothing off Linux, or for a table in private memory (a block small enough for Ray to
    send inline)."""
    if _madvise is None:
        return
    page = mmap.PAGESIZE
    shared = _shared_mappings()
    for column in table.columns:
        for chunk in column.chunks:
            for buffer in chunk.buffers():
                if buffer is None:
                    continue
                start = -(-buffer.address // page) * page
                end = (buffer.address + buffer.size) // page * page
                if end > start and any(low <= start and end <= high for low, high in shared):
                    _madvise(start, end - start, _MADV_DONTNEED)
