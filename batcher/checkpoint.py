"""The state beside an output: the lock, the job fingerprint, durable results, and job status.

Layout of ``results.parquet.state/`` (beside ``results.parquet``):

- ``lock``: held with ``fcntl.flock(LOCK_EX | LOCK_NB)`` for the whole life of a
  :class:`StateStore`; its content is JSON ``{pid, host, started_at, run_id}`` naming the holder.
  The OS releases a flock when its process dies (even by kill -9), so a stale lock from a dead
  run is simply taken over; there is no pid guessing. (flock on NFS is only as good as the
  NFS client's lock support.)
- ``meta.json``: the job fingerprint, run bookkeeping (``total_rows``, ``status``, …, written by
  the runner through :meth:`StateStore.update_meta`) and the finalize record. Always replaced
  atomically (tmp + fsync + rename).
- ``journal-NNNNNN.jsonl``: append-only, one orjson line per result (see
  :func:`batcher.io.writer.result_to_record`). Each :meth:`StateStore.append` is one ``os.write``
  on an ``O_APPEND`` descriptor, so once it returns the rows are in the OS and survive kill -9 of
  this process. ``os.fsync`` runs at most about once a second (and at compaction/close), so
  surviving a power loss or kernel crash is best effort: the last second may be lost.
- ``part-NNNNNN.parquet``: a journal compacted (after ``compact_every`` rows, at close, at
  finalize, and on open for a journal left by a crash): written to a tmp file, fsynced, renamed,
  then the journal deleted. If part-N and journal-N both exist, part-N wins.

Results are ordered by sequence number (finalized output, then parts and journals by N, then line
order); the latest result of an id wins everywhere (done ids, counters, the final output).

Crash handling on open (the lock is held): tmp files are deleted; journal-N beside part-N is
deleted; any other journal is compacted, dropping a torn last line (a line without newline or
that does not parse; counted in ``discarded_records``: those ids are simply not done and get
re-run); a part that cannot be read is renamed ``part-N.parquet.corrupt`` and never trusted
(its ids are not done).

Finalize writes the output atomically and tags it with a random token in its Parquet metadata;
``meta.json`` records the token (``finalized_token``, ``finalized_rows``, ``finalized_through_seq``,
``finalized_totals``) and the parts it absorbed are deleted: the output itself becomes the oldest
part of the record. A later open reads the output's ``id``/``status`` columns only when its token
matches, so a rerun after a finished job sends nothing, and a ``--retry-failed`` rerun appends
results that the next finalize merges over the old output. An output replaced or deleted by
someone else is not trusted (its ids count as not done). The token is recorded in
``meta["finalizing"]`` before the rename, so a crash between the rename and the meta update
loses nothing. Output rows come in completion order, not input order.

Costs: the store keeps every done id in memory (two sets: latest ok / latest error); open reads
only the ``id``/``status`` (and token/cost) columns of parts, and when no id has two results
(the usual case) fills the sets in one go. Resuming 999,000 done of 1,000,000 rows takes about
0.4 s for open + ``done_ids`` on one core (tests/perf/bench_resume.py). Compaction and finalize
hand the memory they free back to the OS (:func:`batcher.io.writer.release_memory`).

:func:`status` takes no lock and changes nothing; to tell whether a run is alive it takes a
shared flock on ``lock`` for an instant (an opening run retries briefly, so the two don't clash).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import re
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self, cast

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from batcher.errors import Aborted, ConfigError, InputError, LockHeld, StateMismatch
from batcher.io.writer import (
    JournalScan,
    UnreadableSource,
    encode_records,
    fsync_dir,
    has_flattened_columns,
    iter_journal,
    read_metadata,
    result_to_record,
    tmp_path_for,
    write_final,
    write_part,
)
from batcher.spend import Spend
from batcher.types import JSON, ResultRow

DEFAULT_COMPACT_EVERY = 50_000
"""Journal rows after which the journal is compacted into a Parquet part."""

FSYNC_INTERVAL = 1.0
"""Seconds: the journal is fsynced at most about this often while appending."""

META_VERSION = 1
TOKEN_KEY = "batcher.finalize_token"
_MIB = 1 << 20
_PART_RE = re.compile(r"^part-(\d+)\.parquet$")
_JOURNAL_RE = re.compile(r"^journal-(\d+)\.jsonl$")
_CORRUPT_RE = re.compile(r"^part-(\d+)\.parquet\.corrupt(?:\.\d+)?$")
_TOTAL_COLUMNS = ("prompt_tokens", "completion_tokens", "cost_usd")
_LOCK_TRIES = 3
RESERVED_META_KEYS = frozenset({
    "version", "fingerprint", "created_at", "force_resumed_at", "run_id", "opened_at",
    "updated_at", "last_seq", "finalizing", "finalized_token", "finalized_rows",
    "finalized_through_seq", "finalized_totals", "finalized_at"})
"""``meta.json`` keys the store owns; :meth:`StateStore.update_meta` refuses them."""


def state_dir_for(output: Path) -> Path:
    """``results.parquet`` → ``results.parquet.state`` (same rule as ``RunConfig.state_dir``)."""
    return output.with_name(output.name + ".state")


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# --- input fingerprint --------------------------------------------------------------------


def _input_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        # The files batcher.io.readers reads: top-level *.parquet, minus '.'/'_' (tool metadata).
        return sorted((p for p in path.iterdir()
                       if p.is_file() and p.name.lower().endswith(".parquet")
                       and not p.name.startswith((".", "_"))), key=lambda p: p.name)
    raise InputError(str(path), "no such file or directory")


def input_fingerprint(path: Path) -> str:
    """A fast identity of the input, as hex: per file, its size and the sha256 of its first and
    last MiB (a directory: its ``.parquet`` files in sorted order). Independent of file names, so
    moving or renaming the input keeps the fingerprint; reads at most 2 MiB per file.
    """
    path = Path(path)
    digest = hashlib.sha256(b"batcher-input-v1")
    files = _input_files(path)
    digest.update(len(files).to_bytes(8, "little"))
    for file in files:
        try:
            with open(file, "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                head = fh.read(_MIB)
                tail = b""
                if size > _MIB:
                    fh.seek(max(_MIB, size - _MIB))
                    tail = fh.read(_MIB)
        except OSError as exc:
            raise InputError(str(file), f"cannot read: {exc.strerror or exc}") from exc
        digest.update(size.to_bytes(8, "little"))
        digest.update(hashlib.sha256(head).digest())
        digest.update(hashlib.sha256(tail).digest())
    return digest.hexdigest()


# --- counters and scanning the record -----------------------------------------------------


@dataclass(slots=True)
class Counters(Spend):
    """Running totals over the durable record.

    ``ok``/``error`` count ids by their latest result. Tokens and cost (the :class:`Spend`
    fields) sum every durable result, superseded ones included: an error later retried was
    still paid for. A total is None while some answered row's cost or usage is unknown.
    """

    ok: int = 0
    error: int = 0

    def as_dict(self) -> dict[str, JSON]:
        return {"ok": self.ok, "error": self.error, **self.totals()}


@dataclass(slots=True)
class _Record:
    """What a scan of the state found. ``ok``/``err``: ids whose latest result is ok / not ok
    (disjoint). Two sets rather than one dict: building them from Arrow columns is about twice
    as fast, and ``done_ids`` becomes a plain copy.

    Sources are added oldest first with :meth:`add_table` and resolved together by
    :meth:`finish`: when no id has more than one result (the usual case) the sets are filled in
    one go, with no per-source set arithmetic; otherwise source by source, the later winning.
    """

    ok: set[str] = field(default_factory=set)
    err: set[str] = field(default_factory=set)
    counters: Counters = field(default_factory=Counters)
    discarded: int = 0
    corrupt: list[Path] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    output_trusted: bool = False
    last_seq: int = 0
    pending: list[tuple[pa.ChunkedArray[Any], pa.ChunkedArray[Any]]] = field(
        default_factory=list)
    """(ids, is_ok) of the sources added since the last :meth:`finish`, oldest first."""

    def add_table(self, table: pa.Table, *, spend: bool) -> None:
        """Results of one source (``id``, ``status`` columns), newer than everything added
        before; counted by the next :meth:`finish`."""
        is_ok = cast("pa.ChunkedArray[Any]", pc.fill_null(
            pc.equal(table["status"], pa.scalar("ok")), pa.scalar(False)))
        self.pending.append((table["id"], is_ok))
        if spend:
            self.counters.add(_sums(table))

    def set_status(self, id_: str, ok: bool) -> None:
        """One new result, newer than everything before (sources must be finished)."""
        if ok:
            self.err.discard(id_)
            self.ok.add(id_)
        else:
            self.ok.discard(id_)
            self.err.add(id_)

    def finish(self) -> None:
        """Resolve the pending sources into ``ok``/``err`` and update the counters."""
        if self.pending:
            pending, self.pending = self.pending, []
            if not self._add_all_at_once(pending):
                for ids, is_ok in pending:
                    self._add_in_order(ids, is_ok)
        self.counters.ok = len(self.ok)
        self.counters.error = len(self.err)

    def _add_all_at_once(self, pending: list[tuple[pa.ChunkedArray[Any],
                                                   pa.ChunkedArray[Any]]]) -> bool:
        """Fill the (empty) sets from every source at once; False (nothing changed) when the
        sets hold ids already or some id has more than one result, where order matters."""
        if self.ok or self.err:
            return False
        new_ok: set[str] = set()
        new_err: set[str] = set()
        rows_ok = rows_err = 0
        for ids, is_ok in pending:
            for chunk in ids.filter(is_ok).chunks:
                new_ok.update(cast("list[str]", chunk.to_pylist()))
                rows_ok += len(chunk)
            for chunk in ids.filter(pc.invert(is_ok)).chunks:
                new_err.update(cast("list[str]", chunk.to_pylist()))
                rows_err += len(chunk)
        if len(new_ok) != rows_ok or len(new_err) != rows_err or not new_ok.isdisjoint(new_err):
            return False
        self.ok, self.err = new_ok, new_err
        return True

    def _add_in_order(self, ids: pa.ChunkedArray[Any], is_ok: pa.ChunkedArray[Any]) -> None:
        ok_list: list[Any] = ids.filter(is_ok).to_pylist()
        err_list: list[Any] = ids.filter(pc.invert(is_ok)).to_pylist()
        ok_ids: set[str] = set(ok_list)
        err_ids: set[str] = set(err_list)
        both = ok_ids & err_ids
        if both:
            # The same id twice in one source with different statuses: the later row wins.
            last: dict[str, bool] = {}
            for id_, good in zip(ids.to_pylist(), is_ok.to_pylist(), strict=True):
                if id_ in both:
                    last[id_] = bool(good)
            ok_ids -= {i for i, good in last.items() if not good}
            err_ids -= {i for i, good in last.items() if good}
        self.ok -= err_ids
        self.err -= ok_ids
        self.ok |= ok_ids
        self.err |= err_ids

    @property
    def done(self) -> int:
        return len(self.ok) + len(self.err)


def _int(value: JSON) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _float(value: JSON) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0


def _opt_int(value: JSON) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _opt_float(value: JSON) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) \
        else None


def _sums(table: pa.Table) -> Spend:
    """The spend of a table of results (``status`` and the :data:`_TOTAL_COLUMNS` present; a
    missing column counts as all null)."""
    n = table.num_rows
    null = pa.nulls(n, pa.int64())

    def column(name: str) -> pa.ChunkedArray[Any] | pa.Array[Any]:
        return table[name] if name in table.column_names else null

    def count(mask: Any) -> int:
        return int(pc.sum(pc.cast(mask, pa.int64())).as_py() or 0)

    def total(name: str) -> float:
        value = pc.sum(column(name)).as_py()
        return value if value is not None else 0

    ok = cast("pa.ChunkedArray[Any]", pc.fill_null(pc.equal(table["status"], pa.scalar("ok")),
                                                  pa.scalar(False)))
    priced = pc.is_valid(column("cost_usd"))
    usage = pc.or_(pc.is_valid(column("prompt_tokens")), pc.is_valid(column("completion_tokens")))
    return Spend(
        prompt_tokens_known=int(total("prompt_tokens")),
        completion_tokens_known=int(total("completion_tokens")),
        cost_usd_known=float(total("cost_usd")),
        rows_priced=count(priced),
        rows_cost_unknown=count(pc.and_(ok, pc.invert(priced))),
        rows_usage_reported=count(usage),
        rows_usage_unknown=count(pc.and_(ok, pc.invert(usage))),
    )


def _finalized_spend(totals: JSON, output: pa.Table | None) -> Spend:
    """The spend a finalize record holds. One written before the row counts existed has only
    ``prompt_tokens``/``completion_tokens``/``cost_usd`` sums (nulls added as 0, so: the known
    sums); its row counts are taken from the finalized ``output``'s own rows."""
    if isinstance(totals, Mapping):
        spend = Spend.from_json(totals)
        if spend is not None:
            return spend
    spend = _sums(output) if output is not None else Spend()
    if isinstance(totals, Mapping):
        spend.prompt_tokens_known = _int(totals.get("prompt_tokens"))
        spend.completion_tokens_known = _int(totals.get("completion_tokens"))
        spend.cost_usd_known = _float(totals.get("cost_usd"))
    return spend


def _read_columns(path: Path, *, spend: bool) -> pa.Table:
    wanted = ["id", "status", *(_TOTAL_COLUMNS if spend else ())]
    with pq.ParquetFile(path) as parquet_file:
        names = parquet_file.schema_arrow.names
        if "id" not in names or "status" not in names:
            raise ValueError(f"{path} has no id/status columns")
        return parquet_file.read(columns=[c for c in wanted if c in names])


@dataclass(slots=True)
class _Files:
    parts: dict[int, Path]
    journals: dict[int, Path]
    corrupt: dict[int, Path]
    tmps: list[Path]


def _list_state(state: Path) -> _Files:
    files = _Files({}, {}, {}, [])
    for entry in os.scandir(state):
        name = entry.name
        if m := _PART_RE.match(name):
            files.parts[int(m.group(1))] = Path(entry.path)
        elif m := _JOURNAL_RE.match(name):
            files.journals[int(m.group(1))] = Path(entry.path)
        elif m := _CORRUPT_RE.match(name):
            files.corrupt[int(m.group(1))] = Path(entry.path)
        elif name.startswith(".") and name.endswith(".tmp"):
            files.tmps.append(Path(entry.path))
    return files


def _output_token(output: Path) -> str | None:
    try:
        return read_metadata(output).get(TOKEN_KEY)
    except (OSError, pa.ArrowException):
        return None


def _trusted_finalize(output: Path, meta: Mapping[str, JSON]) -> Mapping[str, JSON] | None:
    """The finalize record the output matches (``meta`` itself or ``meta["finalizing"]``)."""
    if not output.is_file():
        return None
    token = _output_token(output)
    if token is None:
        return None
    if meta.get("finalized_token") == token:
        return meta
    pending = meta.get("finalizing")
    if isinstance(pending, Mapping) and pending.get("finalized_token") == token:
        return pending
    return None


def _scan(state: Path, output: Path, meta: Mapping[str, JSON], *, repair: bool) -> _Record:
    """Read the durable record. With ``repair`` (lock held) also clean up after a crash:
    delete tmp files and superseded journals/parts, compact leftover journals, set corrupt parts
    aside. Without it, nothing is changed (``status`` mid-run)."""
    rec = _Record()
    files = _list_state(state)
    fin = _trusted_finalize(output, meta)
    through = _int(meta.get("finalized_through_seq"))
    if fin is not None:
        through = max(through, _int(fin.get("finalized_through_seq")))
    rec.last_seq = max([through, _int(meta.get("last_seq")), *files.parts, *files.journals,
                        *files.corrupt])
    if repair:
        for tmp in files.tmps:
            tmp.unlink(missing_ok=True)
        for out_tmp in output.parent.glob(f".{glob_escape(output.name)}.*.tmp"):
            out_tmp.unlink(missing_ok=True)
    if meta.get("finalized_token") is not None and fin is None:
        rec.warnings.append(
            f"{output} is missing or is not the file this state finalized; its rows are not "
            "counted as done and will be re-run")
    if fin is not None:
        try:
            totals = fin.get("finalized_totals")
            legacy = not isinstance(totals, Mapping) or Spend.from_json(totals) is None
            table = _read_columns(output, spend=legacy)
            rec.add_table(table, spend=False)
            rec.counters.add(_finalized_spend(totals, table if legacy else None))
            rec.output_trusted = True
        except (OSError, ValueError, pa.ArrowException) as exc:
            rec.warnings.append(f"{output} could not be read ({exc}); its rows will be re-run")
    for seq in sorted(set(files.parts) | set(files.journals)):
        part = files.parts.get(seq)
        journal = files.journals.get(seq)
        if rec.output_trusted and seq <= through:
            # Already merged into the output (a crash between finalize and the cleanup).
            if repair:
                for stale in (part, journal):
                    if stale is not None:
                        stale.unlink(missing_ok=True)
            continue
        if part is not None and journal is not None and repair:
            journal.unlink()
        if part is None and journal is not None:
            if not repair:
                scan_journal(journal, rec)
                continue
            part = state / f"part-{seq:06d}.parquet"
            rec.discarded += write_part(journal, part).discarded
            journal.unlink()
            if not part.exists():
                continue  # the journal held no complete record
        assert part is not None
        try:
            rec.add_table(_read_columns(part, spend=True), spend=True)
        except (OSError, ValueError, pa.ArrowException) as exc:
            if isinstance(exc, FileNotFoundError):
                raise
            rec.corrupt.append(set_aside(part) if repair else part)
            rec.warnings.append(f"{part} could not be read ({exc}); "
                                f"{'set aside, ' if repair else ''}its rows will be re-run")
    if repair:
        fsync_dir(state)
    rec.finish()
    return rec


def glob_escape(name: str) -> str:
    """``name`` with glob metacharacters escaped."""
    return re.sub(r"([*?\[])", r"[\1]", name)


def scan_journal(journal: Path, rec: _Record) -> None:
    """Add a live journal's complete records to ``rec`` (read-only), as one more source."""
    scan = JournalScan()
    ids: list[JSON] = []
    statuses: list[JSON] = []
    for record in iter_journal(journal, scan):
        ids.append(record["id"])
        status = record.get("status")
        statuses.append(status if isinstance(status, str) else None)
        rec.counters.add_result(status == "ok", _opt_int(record.get("prompt_tokens")),
                                _opt_int(record.get("completion_tokens")),
                                _opt_float(record.get("cost_usd")))
    rec.add_table(pa.table({"id": pa.array(ids, pa.string()),
                            "status": pa.array(statuses, pa.string())}), spend=False)
    # Mid-run the last line may be a write in progress, not a torn one: don't report it.
    rec.discarded += max(0, scan.discarded - 1)


def set_aside(part: Path) -> Path:
    """Rename an unreadable part to ``part-N.parquet.corrupt`` (never overwriting one)."""
    target = part.with_name(part.name + ".corrupt")
    n = 1
    while target.exists():
        target = part.with_name(f"{part.name}.corrupt.{n}")
        n += 1
    os.replace(part, target)
    return target


# --- meta ---------------------------------------------------------------------------------


def _read_meta(state: Path) -> dict[str, JSON] | None:
    """``meta.json`` as a dict; None when absent. Raises ``ValueError`` when unreadable."""
    try:
        data = (state / "meta.json").read_bytes()
    except FileNotFoundError:
        return None
    value = orjson.loads(data)
    if not isinstance(value, dict):
        raise ValueError("meta.json is not a JSON object")
    return value


def _write_meta(state: Path, meta: Mapping[str, JSON]) -> None:
    path = state / "meta.json"
    tmp = tmp_path_for(path)
    data = orjson.dumps(dict(meta), option=orjson.OPT_INDENT_2, default=str)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(state)


def _normalise(fingerprint: Mapping[str, JSON]) -> dict[str, JSON]:
    # What comes back from meta.json is JSON; compare like with like (tuples → lists, …).
    value = orjson.loads(orjson.dumps(dict(fingerprint), default=str))
    assert isinstance(value, dict)
    return value


def _short(value: JSON) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def fingerprint_diff(old: Mapping[str, JSON], new: Mapping[str, JSON]) -> list[str]:
    """Human lines ``key: old -> new`` for every key whose value differs."""
    lines = []
    for key in sorted(set(old) | set(new)):
        if key not in old:
            lines.append(f"{key}: (not set) -> {_short(new[key])}")
        elif key not in new:
            lines.append(f"{key}: {_short(old[key])} -> (not set)")
        elif old[key] != new[key]:
            lines.append(f"{key}: {_short(old[key])} -> {_short(new[key])}")
    return lines


# --- the lock -----------------------------------------------------------------------------


def _read_holder(fd: int) -> dict[str, JSON] | None:
    try:
        data = os.pread(fd, 4096, 0)
        value = orjson.loads(data) if data else None
    except (OSError, orjson.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


def _describe_holder(holder: Mapping[str, JSON] | None) -> str:
    if not holder:
        return "another process (holder unknown)"
    return (f"pid {holder.get('pid')} on host {holder.get('host')} since "
            f"{holder.get('started_at')} (run_id {holder.get('run_id')})")


def _take_lock(state: Path, output: Path, run_id: str) -> int:
    path = state / "lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise ConfigError(f"cannot open lock file {path}: {exc.strerror or exc}") from exc
    for attempt in range(_LOCK_TRIES):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise
            if attempt == _LOCK_TRIES - 1:
                holder = _read_holder(fd)
                os.close(fd)
                raise LockHeld(f"{output} is being written by {_describe_holder(holder)}; wait "
                               "for that run to finish or stop it first") from None
            # `status` holds a shared lock for an instant; don't mistake it for a live run.
            time.sleep(0.05)
    holder_info = {"pid": os.getpid(), "host": socket.gethostname(), "started_at": _now_iso(),
                   "run_id": run_id}
    os.ftruncate(fd, 0)
    os.pwrite(fd, orjson.dumps(holder_info), 0)
    return fd


def _probe_lock(state: Path) -> tuple[bool, dict[str, JSON] | None]:
    """(held by a live process, holder info). Takes a shared flock for an instant and drops it."""
    try:
        fd = os.open(state / "lock", os.O_RDONLY)
    except OSError:
        return False, None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return True, _read_holder(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False, None
    finally:
        os.close(fd)


def _ends_with_newline(fd: int) -> bool:
    size = os.fstat(fd).st_size
    return size == 0 or os.pread(fd, 1, size - 1) == b"\n"


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        # A regular file takes the whole buffer in one write; loop only for the odd short write.
        written = os.write(fd, view)
        view = view[written:]


# --- the store ----------------------------------------------------------------------------


class StateStore:
    """The durable record of one output's job, held under an exclusive lock.

    Build with :meth:`open`. Thread-safe (one mutex). After :meth:`close` every method but
    ``close`` raises ``RuntimeError``.

    Public attributes: ``output``, ``state_dir``, ``run_id``, ``compact_every``;
    ``counters`` (:class:`Counters`, live); ``discarded_records`` (torn/unparseable journal lines
    dropped on open or at compaction); ``corrupt_parts`` (parts set aside on open); ``warnings``
    (human messages about what was found on open or a compaction that failed, for the log);
    ``meta`` (a copy of ``meta.json``).
    """

    def __init__(self, output: Path, state_dir: Path, run_id: str, compact_every: int,
                 lock_fd: int, meta: dict[str, JSON], record: _Record) -> None:
        self.output = output
        self.state_dir = state_dir
        self.run_id = run_id
        self.compact_every = compact_every
        self.counters = record.counters
        self.discarded_records = record.discarded
        self.corrupt_parts = list(record.corrupt)
        self.warnings = list(record.warnings)
        self._meta = meta
        self._record = record
        self._output_trusted = record.output_trusted
        self._lock_fd: int | None = lock_fd
        self._mutex = threading.RLock()
        self._seq = record.last_seq + 1
        self._journal_fd: int | None = None
        self._journal_rows = 0
        self._compact_at = compact_every
        self._need_newline = False
        self._last_fsync = time.monotonic()
        self._broken: str | None = None

    # -- opening ------------------------------------------------------------------------

    @classmethod
    def open(cls, output: Path, fingerprint: Mapping[str, JSON], *, run_id: str,
             restart: bool = False, force_resume: bool = False,
             compact_every: int = DEFAULT_COMPACT_EVERY) -> Self:
        """Open (creating if needed) the state of ``output`` and take its lock.

        Raises :class:`ConfigError` when the output's directory is missing or not writable,
        :class:`LockHeld` when a live process holds the lock, :class:`StateMismatch` when the
        stored fingerprint differs (naming the keys) and neither ``restart`` (wipe the state
        and the old output, start fresh) nor ``force_resume`` (keep the results, record the
        new fingerprint) is given. See the module docstring for what is repaired on open.
        """
        output = Path(output)
        if compact_every < 1:
            raise ValueError("compact_every must be >= 1")
        state = _prepare_dirs(output)
        fd = _take_lock(state, output, run_id)
        try:
            new_fp = _normalise(fingerprint)
            if restart:
                _wipe(state, output)
            try:
                meta = _read_meta(state)
            except ValueError as exc:
                if not force_resume:
                    raise StateMismatch(
                        f"{state}/meta.json is unreadable ({exc}); pass --restart to start over "
                        "(deletes the state and the old output) or --force-resume to keep the "
                        "results") from exc
                meta = None
            if meta is None:
                files = _list_state(state)
                if (files.parts or files.journals) and not force_resume:
                    raise StateMismatch(
                        f"{state} holds results but no meta.json (an interrupted --restart?); "
                        "pass --restart to start over or --force-resume to keep the results")
                meta = {"version": META_VERSION, "fingerprint": new_fp, "created_at": _now_iso()}
            old_fp = meta.get("fingerprint")
            old_fp = old_fp if isinstance(old_fp, dict) else {}
            diff = fingerprint_diff(old_fp, new_fp)
            if diff:
                if not force_resume:
                    raise StateMismatch(
                        f"{output} was started by a different job ({'; '.join(diff)}). Pass "
                        "--restart to start over (deletes the state and the old output) or "
                        "--force-resume to keep its results and continue with the new settings")
                meta["fingerprint"] = new_fp
                meta["force_resumed_at"] = _now_iso()
            record = _scan(state, output, meta, repair=True)
            if record.output_trusted and meta.get("finalizing"):
                _promote_finalizing(meta, output)
            meta.pop("finalizing", None)
            if meta.get("finalized_token") is not None and not record.output_trusted:
                for key in [k for k in meta if k.startswith("finalized_")]:
                    del meta[key]
            meta.update(run_id=run_id, opened_at=_now_iso(), last_seq=record.last_seq,
                        updated_at=_now_iso())
            _write_meta(state, meta)
        except BaseException:
            os.close(fd)
            raise
        store = cls(output, state, run_id, compact_every, fd, meta, record)
        try:
            # Opened now, not at the first answer: a run that later runs out of file
            # descriptors can still make its answers durable.
            store._open_journal()
        except BaseException:
            store.close()
            raise
        return store

    # -- reading ------------------------------------------------------------------------

    @property
    def meta(self) -> dict[str, JSON]:
        with self._mutex:
            return dict(self._meta)

    def done_ids(self, *, include_errors: bool) -> set[str]:
        """Ids with a durable result: latest result ok, or (``include_errors``) any result."""
        with self._mutex:
            if include_errors:
                return self._record.ok | self._record.err
            return set(self._record.ok)

    # -- writing ------------------------------------------------------------------------

    def append(self, rows: Sequence[ResultRow]) -> None:
        """Make ``rows`` durable. On return they survive kill -9 (one ``os.write`` to an
        ``O_APPEND`` journal); fsync at most about once per :data:`FSYNC_INTERVAL` (power loss:
        best effort). Compacts the journal into a part after ``compact_every`` rows, which
        takes a moment (≈0.1–0.5 s per 50,000 rows) inside this call.
        """
        if not rows:
            return
        data = encode_records(result_to_record(r) for r in rows)
        with self._mutex:
            self._check_usable()
            fd = self._open_journal()
            if self._need_newline:
                # A previous write failed midway: end its fragment so it can't swallow ours.
                data = b"\n" + data
            try:
                _write_all(fd, data)
            except BaseException:
                self._need_newline = True
                raise
            self._need_newline = False
            for r in rows:
                self._record.set_status(r.id, r.status == "ok")
                self.counters.add_result(r.status == "ok", r.prompt_tokens,
                                         r.completion_tokens, r.cost_usd)
            self._record.finish()
            self._journal_rows += len(rows)
            now = time.monotonic()
            if now - self._last_fsync >= FSYNC_INTERVAL:
                os.fsync(fd)
                self._last_fsync = now
            if self._journal_rows >= self._compact_at:
                try:
                    self._compact()
                except OSError as exc:
                    # The rows are durable in the journal already; compaction is retried later.
                    self._compact_at = self._journal_rows + self.compact_every
                    self.warnings.append(f"compacting the journal failed ({exc}); will retry")

    def update_meta(self, **values: JSON) -> None:
        """Merge ``values`` into ``meta.json`` (atomic replace), e.g. ``total_rows``,
        ``bad_rows``, ``status`` ("running", "finished", "interrupted", "aborted").
        Keys in :data:`RESERVED_META_KEYS` raise ``ValueError``."""
        reserved = RESERVED_META_KEYS.intersection(values)
        if reserved:
            raise ValueError(f"meta keys {sorted(reserved)} are owned by the state store")
        with self._mutex:
            self._check_open()
            self._meta.update(values)
            self._meta["updated_at"] = _now_iso()
            _write_meta(self.state_dir, self._meta)

    def finalize(self, flatten: Sequence[tuple[str, pa.DataType]] = ()) -> Path:
        """Write the output atomically: one row per id, the latest result winning; returns it.

        Then the parts it absorbed are deleted and the output becomes the record (see the
        module docstring). Streams the parts: memory holds ids and keep-masks, not outputs.
        A part that turns out unreadable is set aside and :class:`Aborted` is raised (its ids
        get re-run by the next run); the old output is then untouched. ``flatten``: the
        ``--flatten`` columns to add (see :func:`batcher.io.writer.write_final`).
        """
        with self._mutex:
            self._check_usable()
            self._compact()
            files = _list_state(self.state_dir)
            parts = [files.parts[s] for s in sorted(files.parts)]
            if (not parts and self._output_trusted and not flatten
                    and not has_flattened_columns(self.output)):
                return self.output  # nothing new since the last finalize
            sources = ([self.output] if self._output_trusted else []) + parts
            through = max([_int(self._meta.get("finalized_through_seq")), *files.parts])
            token = uuid.uuid4().hex
            record: dict[str, JSON] = {"finalized_token": token,
                                       "finalized_through_seq": through,
                                       "finalized_totals": Spend.to_json(self.counters)}
            self._meta["finalizing"] = record
            _write_meta(self.state_dir, self._meta)
            try:
                rows = write_final(sources, self.output, metadata={TOKEN_KEY: token},
                                   flatten=flatten)
            except UnreadableSource as exc:
                # The in-memory record still counts the bad file's ids: refuse further use.
                self._broken = f"cannot use the state of {self.output} after: {exc}"
                if exc.path == self.output:
                    raise Aborted(f"cannot finalize: the previous {self.output} is unreadable "
                                  f"({exc}); move it away and run the same command again to "
                                  "redo its rows") from exc
                moved = set_aside(exc.path)
                raise Aborted(f"cannot finalize {self.output}: {exc.path} is unreadable "
                              f"(moved to {moved}); run the same command again to redo its "
                              "rows") from exc
            record.update(finalized_rows=rows, finalized_at=_now_iso())
            self._meta.pop("finalizing", None)
            self._meta.update(record)
            self._meta["last_seq"] = max(_int(self._meta.get("last_seq")), through)
            self._meta["updated_at"] = _now_iso()
            _write_meta(self.state_dir, self._meta)
            self._output_trusted = True
            for part in parts:
                part.unlink(missing_ok=True)
            fsync_dir(self.state_dir)
            return self.output

    def close(self) -> None:
        """Compact and fsync the journal, then release the lock. Idempotent."""
        with self._mutex:
            if self._lock_fd is None:
                return
            try:
                if self._broken is None:
                    self._compact()
                elif self._journal_fd is not None:
                    os.fsync(self._journal_fd)
            finally:
                if self._journal_fd is not None:
                    os.close(self._journal_fd)
                    self._journal_fd = None
                os.close(self._lock_fd)
                self._lock_fd = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------------

    def _open_journal(self) -> int:
        if self._journal_fd is None:
            path = self._journal_path(self._seq)
            self._journal_fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
            self._need_newline = not _ends_with_newline(self._journal_fd)
        return self._journal_fd

    def _journal_path(self, seq: int) -> Path:
        return self.state_dir / f"journal-{seq:06d}.jsonl"

    def _check_open(self) -> None:
        if self._lock_fd is None:
            raise RuntimeError(f"the state store of {self.output} is closed")

    def _check_usable(self) -> None:
        self._check_open()
        if self._broken is not None:
            raise RuntimeError(self._broken)

    def _compact(self) -> None:
        """Journal → ``part-N.parquet`` (durable), journal deleted, next sequence number."""
        if self._journal_fd is None:
            return
        journal = self._journal_path(self._seq)
        if os.fstat(self._journal_fd).st_size == 0:
            # Opened but never written: nothing to keep.
            os.close(self._journal_fd)
            self._journal_fd = None
            journal.unlink(missing_ok=True)
            return
        os.fsync(self._journal_fd)
        os.close(self._journal_fd)
        self._journal_fd = None
        part = self.state_dir / f"part-{self._seq:06d}.parquet"
        self.discarded_records += write_part(journal, part).discarded
        journal.unlink()
        fsync_dir(self.state_dir)
        self._seq += 1
        self._journal_rows = 0
        self._compact_at = self.compact_every
        self._last_fsync = time.monotonic()


def _prepare_dirs(output: Path) -> Path:
    parent = output.parent
    if not parent.is_dir():
        raise ConfigError(f"output directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"output directory {parent} is not writable")
    if output.is_dir():
        raise ConfigError(f"output {output} is a directory, expected a .parquet file path")
    state = state_dir_for(output)
    try:
        state.mkdir(exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create state directory {state}: {exc.strerror or exc}"
                          ) from exc
    if not state.is_dir():
        raise ConfigError(f"{state} exists and is not a directory")
    return state


def _wipe(state: Path, output: Path) -> None:
    """--restart: delete everything but the lock in the state dir, and the old output.

    meta.json goes first: a crash midway leaves results without meta, which the next open
    refuses to resume silently."""
    (state / "meta.json").unlink(missing_ok=True)
    fsync_dir(state)
    output.unlink(missing_ok=True)
    for entry in os.scandir(state):
        if entry.name == "lock":
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path)
        else:
            os.unlink(entry.path)
    fsync_dir(state)
    fsync_dir(output.parent)


def _promote_finalizing(meta: dict[str, JSON], output: Path) -> None:
    # The crash came after the output's rename but before meta recorded it: record it now.
    pending = meta.get("finalizing")
    if not isinstance(pending, dict) or _output_token(output) != pending.get("finalized_token"):
        return
    meta.update(pending)
    with contextlib.suppress(OSError, pa.ArrowException):
        meta["finalized_rows"] = pq.read_metadata(output).num_rows


# --- status -------------------------------------------------------------------------------


def _last_update(state: Path) -> str | None:
    latest = 0.0
    with contextlib.suppress(OSError):
        for entry in os.scandir(state):
            if entry.name == "lock":
                continue
            with contextlib.suppress(OSError):
                latest = max(latest, entry.stat().st_mtime)
    if not latest:
        return None
    return (datetime.fromtimestamp(latest, UTC).isoformat(timespec="seconds")
            .replace("+00:00", "Z"))


def _retrying_scan(state: Path, output: Path) -> tuple[dict[str, JSON], _Record]:
    # A live run renames and deletes files under us (compaction, finalize); rescan on a miss.
    for attempt in range(5):
        try:
            meta = _read_meta(state) or {}
            return meta, _scan(state, output, meta, repair=False)
        except (FileNotFoundError, ValueError):
            if attempt == 4:
                raise
            time.sleep(0.05)
    raise AssertionError("unreachable")


def _output_only(output: Path) -> _Record:
    rec = _Record()
    try:
        rec.add_table(_read_columns(output, spend=True), spend=True)
    except (OSError, ValueError, pa.ArrowException) as exc:
        rec.warnings.append(f"{output} could not be read: {exc}")
    rec.finish()
    return rec


def status(output: Path) -> dict[str, JSON]:
    """What a job did and has left; safe while a job runs (takes no lock, changes nothing).

    Keys: ``output``, ``state_dir``, ``state_exists``, ``output_exists``, ``running`` (a live
    process holds the lock), ``holder`` (its ``{pid, host, started_at, run_id}`` or None),
    ``state`` (the job status from meta: running/finished/interrupted/aborted or None),
    ``run_id``, ``total_rows`` (None until the runner records it), ``bad_rows``, ``done``
    (ids with a result), ``ok``, ``error``, ``pending`` (``total_rows - done``, None when the
    total is unknown), ``prompt_tokens``, ``completion_tokens``, ``cost_usd`` (None while some
    answered row's usage or cost is unknown) and the partial sums and row counts beside them
    (see :meth:`batcher.spend.Spend.totals`),
    ``last_update`` (ISO-8601 UTC of the latest state write), ``finalized_rows``,
    ``corrupt_parts``, ``warnings``. With no state dir but an output, counts come from the
    output file itself.
    """
    output = Path(output)
    state = state_dir_for(output)
    state_exists = state.is_dir()
    running, holder = _probe_lock(state) if state_exists else (False, None)
    meta: dict[str, JSON] = {}
    if state_exists:
        meta, rec = _retrying_scan(state, output)
    elif output.is_file():
        rec = _output_only(output)
    else:
        rec = _Record()
    total = meta.get("total_rows")
    done = rec.done
    pending = max(0, total - done) if isinstance(total, int) else None
    counters = rec.counters.as_dict()
    return {
        "output": str(output),
        "state_dir": str(state),
        "state_exists": state_exists,
        "output_exists": output.is_file(),
        "running": running,
        "holder": holder,
        "state": meta.get("status"),
        "run_id": meta.get("run_id"),
        "total_rows": total,
        "bad_rows": meta.get("bad_rows"),
        "done": done,
        **counters,
        "pending": pending,
        "last_update": _last_update(state) if state_exists else None,
        "finalized_rows": meta.get("finalized_rows"),
        "corrupt_parts": len(rec.corrupt) + len(_list_state(state).corrupt if state_exists
                                                 else {}),
        "warnings": rec.warnings,
    }

