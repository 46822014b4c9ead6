"""The record of a state folder: the input fingerprint, the counters, scanning (and
repairing) journals and parts, and ``meta.json``. See :mod:`batcher.checkpoint`."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from batcher.io.idindex import latest_counts
from batcher.io.location import InputLocation
from batcher.io.writer import (
    JournalScan,
    fsync_dir,
    iter_id_status,
    iter_journal,
    read_metadata,
    tmp_path_for,
    write_part,
)
from batcher.spend import Spend
from batcher.types import JSON

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
RESERVED_META_KEYS = frozenset({
    "version", "fingerprint", "created_at", "force_resumed_at", "run_id", "opened_at",
    "updated_at", "last_seq", "finalizing", "finalized_token", "finalized_rows",
    "finalized_through_seq", "finalized_totals", "finalized_at",
    "finalized_order"})
"""``meta.json`` keys the store owns; :meth:`StateStore.update_meta` refuses them."""


def state_dir_for(output: Path) -> Path:
    """``results.parquet`` → ``results.parquet.state`` (same rule as ``RunConfig.state_dir``)."""
    return output.with_name(output.name + ".state")


# --- input fingerprint --------------------------------------------------------------------


def input_fingerprint(path: Path | str | InputLocation) -> str:
    """A fast identity of the input, as hex: per file, its size and the sha256 of its first and
    last MiB (a directory: its ``.parquet`` files in sorted order). Independent of file names
    and of where the input lives, so moving, renaming or uploading it (``s3://…``) keeps the
    fingerprint; reads at most 2 MiB per file, by ranged reads for a URL.
    """
    location = path if isinstance(path, InputLocation) else InputLocation(path)
    digest = hashlib.sha256(b"batcher-input-v1")
    _, files = location.resolve()
    digest.update(len(files).to_bytes(8, "little"))
    for file in files:
        size, head, tail = location.head_and_tail(file, _MIB)
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
    """What a scan of the state found.

    A state's results stay on disk: ``sources`` lists its result files (the trusted output,
    parts, a live journal), oldest first, and :meth:`resolve` counts the ids whose latest
    result is ok / not ok with :func:`batcher.io.idindex.latest_counts` (flat memory, one
    pass). Nothing per id is held.

    Small in-memory tables may also be added with :meth:`add_table` (oldest first, resolved
    by :meth:`finish`) into the sets ``ok``/``err`` (ids whose latest result is ok / not ok,
    disjoint); :func:`_scan` does not use them.
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
    sources: list[Path] = field(default_factory=list)
    rows: int = 0
    """Result rows in ``sources`` (superseded ones included): sizes the spill."""

    def add_source(self, path: Path, rows: int) -> None:
        """A result file on disk, newer than every source before; counted by :meth:`resolve`."""
        self.sources.append(path)
        self.rows += rows

    def resolve(self, folder: Path | None = None) -> None:
        """Count ``ok``/``error`` of the counters from ``sources`` (ids by latest result)."""
        ok, error = latest_counts((iter_id_status(p) for p in self.sources), self.rows,
                                  folder=folder)
        self.counters.ok = ok + len(self.ok)
        self.counters.error = error + len(self.err)

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
        return self.counters.ok + self.counters.error


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


def source_rows(path: Path) -> int:
    """Result rows in a result file, cheaply (a Parquet footer; a journal: a guess from its
    size), to size a spill; 0 when it cannot be read."""
    try:
        if path.name.endswith(".jsonl"):
            return path.stat().st_size // 256
        return int(pq.read_metadata(path).num_rows)
    except (OSError, ValueError, pa.ArrowException):
        return 0


def _read_spend(path: Path) -> tuple[Spend, int]:
    """(the spend of a result file's rows, its row count); reads the status and spend columns
    only. Raises ValueError (no id/status columns), OSError or ArrowException."""
    with pq.ParquetFile(path) as parquet_file:
        names = parquet_file.schema_arrow.names
        if "id" not in names or "status" not in names:
            raise ValueError(f"{path} has no id/status columns")
        table = parquet_file.read(columns=["status", *(c for c in _TOTAL_COLUMNS
                                                       if c in names)], use_threads=False)
    return _sums(table), table.num_rows


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


def unmerged_sources(output: Path) -> list[Path]:
    """The state's result files not yet merged into ``output``: its parts, and journals that
    have no part of the same number, oldest first. After ``output`` itself (when it exists),
    the latest row per id across them all is the job's current answer for that id, mid-run or
    after an interrupt. Read-only; empty without a state folder. A live run may compact or
    delete these files meanwhile: on FileNotFoundError, list again."""
    state = state_dir_for(output)
    if not state.is_dir():
        return []
    files = _list_state(state)
    return [files.parts.get(seq) or files.journals[seq]
            for seq in sorted(set(files.parts) | set(files.journals))]


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


def _scan(state: Path, output: Path, meta: Mapping[str, JSON], *, repair: bool,
          count: bool = True) -> _Record:
    """Read the durable record. With ``repair`` (lock held) also clean up after a crash:
    delete tmp files and superseded journals/parts, compact leftover journals, set corrupt parts
    aside. Without it, nothing is changed (``status`` mid-run). ``count``: resolve the ok/error
    counts now (one pass over every id); else they are left for :meth:`_Record.resolve`."""
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
        # Id spills of a run killed midway (batcher.io.idindex); the lock says none is live.
        for spill in state.glob("batcher-*-*"):
            if spill.is_dir() and spill.name.startswith(("batcher-ids-", "batcher-order-")):
                shutil.rmtree(spill, ignore_errors=True)
    if meta.get("finalized_token") is not None and fin is None:
        rec.warnings.append(
            f"{output} is missing or is not the file this state finalized; its rows are not "
            "counted as done and will be re-run")
    if fin is not None:
        try:
            totals = fin.get("finalized_totals")
            legacy = not isinstance(totals, Mapping) or Spend.from_json(totals) is None
            if legacy:
                table = _read_columns(output, spend=True)
                rows = table.num_rows
                rec.counters.add(_finalized_spend(totals, table))
                del table
            else:
                rows = pq.read_metadata(output).num_rows
                rec.counters.add(_finalized_spend(totals, None))
            rec.add_source(output, rows)
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
            spent, rows = _read_spend(part)
            rec.counters.add(spent)
            rec.add_source(part, rows)
        except (OSError, ValueError, pa.ArrowException) as exc:
            if isinstance(exc, FileNotFoundError):
                raise
            rec.corrupt.append(set_aside(part) if repair else part)
            rec.warnings.append(f"{part} could not be read ({exc}); "
                                f"{'set aside, ' if repair else ''}its rows will be re-run")
    if repair:
        fsync_dir(state)
    if count:
        rec.resolve(state)
    return rec


def glob_escape(name: str) -> str:
    """``name`` with glob metacharacters escaped."""
    return re.sub(r"([*?\[])", r"[\1]", name)


def scan_journal(journal: Path, rec: _Record) -> None:
    """Add a live journal's complete records to ``rec`` (read-only), as one more source."""
    scan = JournalScan()
    for record in iter_journal(journal, scan):
        status = record.get("status")
        rec.counters.add_result(status == "ok", _opt_int(record.get("prompt_tokens")),
                                _opt_int(record.get("completion_tokens")),
                                _opt_float(record.get("cost_usd")))
    # Read again when counting: a live run appends meanwhile, so both reads may differ by
    # the rows written in between (status is a snapshot either way).
    rec.add_source(journal, scan.records)
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


def read_meta(state: Path) -> dict[str, JSON] | None:
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


def _ends_with_newline(fd: int) -> bool:
    size = os.fstat(fd).st_size
    return size == 0 or os.pread(fd, 1, size - 1) == b"\n"


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        # A regular file takes the whole buffer in one write; loop only for the odd short write.
        written = os.write(fd, view)
        view = view[written:]
