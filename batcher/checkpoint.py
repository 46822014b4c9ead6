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
  then the journal deleted. If part-N and journal-N both exist, part-N wins. The tmp file of
  the live journal's part is built while the journal is written
  (:class:`batcher.io.writer.PartBuilder`), so that compacting it is only its last rows' work;
  it is never read, and a crash leaves it to be deleted on open like any tmp file.

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
loses nothing. Output rows come in input order when the caller gives the input's ids (the
runner does, unless ``--order completion``), else in completion order.

Costs: the store keeps no id in memory. Its record is the list of result files (the trusted
output, parts, the live journal: :meth:`StateStore.result_sources`); which rows are done is
worked out by the runner with :func:`batcher.io.idindex.build_plan` (a spilled, hash-partitioned
pass over the input's and the state's ids), and ``counters.ok``/``error`` by
:func:`batcher.io.idindex.latest_counts` when asked after a change (and at close). Open reads
only the status and spend columns of parts. Compaction and finalize hand the memory they free
back to the OS (:func:`batcher.io.writer.release_memory`).

:func:`status` takes no lock and changes nothing; to tell whether a run is alive it takes a
shared flock on ``lock`` for an instant (an opening run retries briefly, so the two don't clash).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self, cast

import pyarrow as pa
import pyarrow.parquet as pq

from batcher.errors import Aborted, ConfigError, StateMismatch
from batcher.io.idindex import InputIds
from batcher.io.writer import (
    PartBuilder,
    UnreadableSource,
    encode_records,
    fsync_dir,
    has_flattened_columns,
    iter_id_status,
    result_to_record,
    write_final,
    write_part,
)
from batcher.results import now_iso
from batcher.spend import Spend
from batcher.state.lock import _take_lock
from batcher.state.record import (
    DEFAULT_COMPACT_EVERY,
    FSYNC_INTERVAL,
    META_VERSION,
    RESERVED_META_KEYS,
    TOKEN_KEY,
    Counters,
    _ends_with_newline,
    _int,
    _list_state,
    _normalise,
    _output_token,
    _Record,
    _scan,
    _write_all,
    _write_meta,
    fingerprint_diff,
    input_fingerprint,
    read_meta,
    set_aside,
    source_rows,
    state_dir_for,
    unmerged_sources,
)
from batcher.state.status import status
from batcher.types import JSON, ResultRow

__all__ = [
    "DEFAULT_COMPACT_EVERY", "Counters", "StateStore", "ensure_output_folder",
    "fingerprint_diff", "input_fingerprint", "read_meta", "state_dir_for", "status",
    "unmerged_sources",
]


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
        self._counters = record.counters
        self._counted = False  # ok/error of _counters are up to date
        self.discarded_records = record.discarded
        self.corrupt_parts = list(record.corrupt)
        self.warnings = list(record.warnings)
        self._meta = meta

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
        self._builder: PartBuilder | None = None
        """The live journal's part, built as it is written (see :meth:`_compact`)."""

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
                meta = read_meta(state)
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
                meta = {"version": META_VERSION, "fingerprint": new_fp, "created_at": now_iso()}
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
                meta["force_resumed_at"] = now_iso()
            record = _scan(state, output, meta, repair=True, count=False)
            if record.output_trusted and meta.get("finalizing"):
                _promote_finalizing(meta, output)
            meta.pop("finalizing", None)
            if meta.get("finalized_token") is not None and not record.output_trusted:
                for key in [k for k in meta if k.startswith("finalized_")]:
                    del meta[key]
            meta.update(run_id=run_id, opened_at=now_iso(), last_seq=record.last_seq,
                        updated_at=now_iso())
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

    @property
    def counters(self) -> Counters:
        """The running totals (live object). Spend is kept as results arrive; ``ok``/``error``
        (ids by their latest result) are counted from the result files when asked after a
        change, and at :meth:`close`: one flat pass over every id
        (:func:`batcher.io.idindex.latest_counts`)."""
        with self._mutex:
            if not self._counted and self._lock_fd is not None:
                sources = self.result_sources()
                record = _Record(sources=sources, rows=sum(map(source_rows, sources)))
                record.resolve(self.state_dir)
                self._counters.ok, self._counters.error = (record.counters.ok,
                                                           record.counters.error)
                self._counted = True
            return self._counters

    @property
    def spend(self) -> Spend:
        """The spend so far (the :class:`Spend` fields of :attr:`counters`), without counting."""
        return self._counters

    def result_rows(self) -> int:
        """About how many result rows :meth:`result_sources` hold (to size a spill)."""
        return sum(map(source_rows, self.result_sources()))

    def result_sources(self) -> list[Path]:
        """The files holding every durable result, oldest first (the trusted output, parts,
        the live journal); the latest row of an id wins. Valid until the next append."""
        with self._mutex:
            files = _list_state(self.state_dir)
            sources = [self.output] if self._output_trusted else []
            sources += [files.parts[seq] for seq in sorted(files.parts)]
            journal = self._journal_path(self._seq)
            if self._journal_fd is not None and os.fstat(self._journal_fd).st_size:
                sources.append(journal)
            return sources

    def done_ids(self, *, include_errors: bool) -> set[str]:
        """Ids with a durable result: latest result ok, or (``include_errors``) any result.

        A Python set of every such id (memory per id): for small states and tests; a run
        uses :meth:`result_sources` through :func:`batcher.io.idindex.build_plan`."""
        with self._mutex:
            self._check_open()
            latest: dict[str, bool] = {}
            for path in self.result_sources():
                for ids, is_ok in iter_id_status(path):
                    latest.update(zip(cast("list[str]", ids.to_pylist()),
                                      cast("list[bool]", is_ok.to_pylist()), strict=True))
            return {key for key, good in latest.items() if include_errors or good}

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
                self._drop_builder()  # the journal may now hold a fragment it did not see
                raise
            self._need_newline = False
            if self._builder is not None:
                try:
                    self._builder.add(data)
                except Exception:  # only a shortcut: the journal is the record
                    self._drop_builder()
            for r in rows:
                self._counters.add_result(r.status == "ok", r.prompt_tokens,
                                          r.completion_tokens, r.cost_usd)
            self._counted = False
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
            self._meta["updated_at"] = now_iso()
            _write_meta(self.state_dir, self._meta)

    def finalize(self, flatten: Sequence[tuple[str, pa.DataType]] = (), *,
                 input_ids: InputIds | None = None, input_rows: int = 0) -> Path:
        """Write the output atomically: one row per id, the latest result winning; returns it.
        Rows in input order when ``input_ids`` (the input's ids, ``input_rows`` data rows) are
        given, then the ids the input no longer has; else in completion order.

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
            ordered = input_ids is not None
            if (not parts and self._output_trusted and not flatten
                    and not has_flattened_columns(self.output)
                    and self._meta.get("finalized_order", "completion") == (
                        "input" if ordered else "completion")
                    and not (ordered and self._meta.get("force_resumed_at"))):
                return self.output  # nothing new since the last finalize
            sources = ([self.output] if self._output_trusted else []) + parts
            through = max([_int(self._meta.get("finalized_through_seq")), *files.parts])
            token = uuid.uuid4().hex
            record: dict[str, JSON] = {"finalized_token": token,
                                       "finalized_through_seq": through,
                                       "finalized_totals": Spend.to_json(self._counters)}
            self._meta["finalizing"] = record
            _write_meta(self.state_dir, self._meta)
            try:
                # Results from before a --force-resume were written for another input:
                # their ordinals say nothing of this one.
                rows = write_final(sources, self.output, metadata={TOKEN_KEY: token},
                                   flatten=flatten, input_ids=input_ids,
                                   input_rows=input_rows,
                                   by_ordinal=not self._meta.get("force_resumed_at"),
                                   spill_folder=self.state_dir)
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
            record.update(finalized_rows=rows, finalized_at=now_iso(),
                          finalized_order="input" if ordered else "completion")
            self._meta.pop("finalizing", None)
            self._meta.update(record)
            self._meta["last_seq"] = max(_int(self._meta.get("last_seq")), through)
            self._meta["updated_at"] = now_iso()
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
                    self.counters  # noqa: B018 - counted while the files are still ours
                elif self._journal_fd is not None:
                    os.fsync(self._journal_fd)
            finally:
                self._drop_builder()
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
            self._drop_builder()
            if os.fstat(self._journal_fd).st_size == 0:
                self._builder = PartBuilder(self._part_path(self._seq))
        return self._journal_fd

    def _drop_builder(self) -> None:
        if self._builder is not None:
            self._builder.give_up()
            self._builder = None

    def _part_path(self, seq: int) -> Path:
        return self.state_dir / f"part-{seq:06d}.parquet"

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
        size = os.fstat(self._journal_fd).st_size
        builder, self._builder = self._builder, None
        if size == 0:
            # Opened but never written: nothing to keep.
            if builder is not None:
                builder.give_up()
            os.close(self._journal_fd)
            self._journal_fd = None
            journal.unlink(missing_ok=True)
            return
        os.fsync(self._journal_fd)
        os.close(self._journal_fd)
        self._journal_fd = None
        part = self._part_path(self._seq)
        # The part built while the journal was written, when it is the one write_part would
        # write from it; else two passes over the journal (~25 us a row).
        scan = None
        if builder is not None:
            scan = builder.commit() if builder.size == size else None
            if scan is None:
                builder.give_up()
        if scan is None:
            scan = write_part(journal, part)
        self.discarded_records += scan.discarded
        journal.unlink()
        fsync_dir(self.state_dir)
        self._seq += 1
        self._journal_rows = 0
        self._compact_at = self.compact_every
        self._last_fsync = time.monotonic()


def ensure_output_folder(output: Path) -> None:
    """Create the output's folders (the folder an output, or a job file's template, names is
    part of the job); refuse (ConfigError, exit 2), naming it, a file standing where a folder
    should be, a folder that cannot be written, or an output path that is a folder."""
    parent = output.parent
    existing = next(p for p in [parent, *parent.parents] if p.exists() or p == p.parent)
    if not existing.is_dir():
        raise ConfigError(f"output folder {parent}: {existing} is a file, not a folder; "
                          "choose another -o")
    if existing != parent:
        if not os.access(existing, os.W_OK):
            raise ConfigError(f"output folder {parent} cannot be created: {existing} is "
                              "not writable")
        parent.mkdir(parents=True, exist_ok=True)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"output folder {parent} is not writable")
    if output.is_dir():
        raise ConfigError(f"output {output} is a folder, expected a .parquet file path")


def _prepare_dirs(output: Path) -> Path:
    ensure_output_folder(output)
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
