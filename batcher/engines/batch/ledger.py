"""The durable record of a batch-mode output's provider batches, in ``OUTPUT.state/batches/``.

What survives kill -9 at any instant, and why nothing is submitted twice:

- ``part-NNNNNN.ids``: the part's ``[custom_id, row_id, attempt]`` lines (read on resume to
  find where each row was sent), and ``part-NNNNNN.rows``: each row's :class:`Slot` (what its
  result row needs: id, model, the input's columns, the reservation, and the request line as
  sent, for sending it again). Both are streamed to ``.tmp`` files while the part is built,
  then fsynced and renamed *before* the part is announced in the ledger (a part never names
  rows that are not on disk). Memory holds none of it: a part is read back when it ends.
- ``ledger.jsonl``: append-only events, each one ``os.write`` on an ``O_APPEND`` descriptor
  followed by ``fsync``: ``job`` (the output's random key, the wire, base URL and key
  variable), ``part`` (about to be submitted), ``created`` (the provider's batch id, written
  the moment the create call returns), ``state`` (the last poll: state, counts) and
  ``cancel`` (``batcher cancel`` asked for it). A torn last line is ignored on read.

A part with no ``created`` event may still exist at the provider (killed between the create
returning and the write): the engine looks it up before submitting it again, by its metadata
(the job key and part number; OpenAI) or by its size and time (Anthropic, which keeps no
metadata: see :mod:`~batcher.engines.batch.anthropic`). Reading (``batcher status``,
``batcher cancel``) takes no lock and changes nothing but the ``cancel`` events.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from batcher.results import now_iso
from batcher.types import JSON

LEDGER = "ledger.jsonl"


def ledger_dir(state_dir: Path) -> Path:
    return state_dir / "batches"


@dataclass(slots=True)
class PartRecord:
    """One part as the ledger knows it: its provider batch id (None until created), the
    endpoint its lines go to, its size, and the last polled state and counts."""

    part: int
    endpoint: str
    requests: int
    batch_id: str | None = None
    state: str | None = None
    counts: dict[str, JSON] = field(default_factory=dict)
    submitted_at: str | None = None
    created_at: str | None = None
    cancel_requested: bool = False


@dataclass(frozen=True, slots=True)
class Placed:
    """Where a row was last sent: its part, its custom_id there (None: the one derived from the
    row's id, not kept twice: a resume of a million rows holds one of these per row), its
    attempt."""

    part: int
    custom_id: str | None
    attempt: int


class Ledger:
    """The ``batches/`` folder of one output (see the module docstring)."""

    def __init__(self, folder: Path, job: dict[str, JSON], parts: dict[int, PartRecord]) -> None:
        self.folder = folder
        self.job = job
        self.parts = parts
        self._fd: int | None = None

    @property
    def key(self) -> str:
        return str(self.job["key"])

    @classmethod
    def read(cls, state_dir: Path) -> Ledger | None:
        """The ledger as it is on disk, or None when the output has no batches."""
        folder = ledger_dir(state_dir)
        path = folder / LEDGER
        if not path.is_file():
            return None
        job: dict[str, JSON] = {}
        parts: dict[int, PartRecord] = {}
        for event in _events(path):
            kind, number = event.get("event"), event.get("part")
            if kind == "job":
                job = event
                continue
            if not isinstance(number, int):
                continue
            if kind == "part":
                requests = event.get("requests")
                parts[number] = PartRecord(number, str(event.get("endpoint")),
                                           requests if isinstance(requests, int) else 0,
                                           submitted_at=_text(event.get("at")))
            elif number in parts:
                record = parts[number]
                if kind == "created":
                    record.batch_id = _text(event.get("batch_id"))
                    record.created_at = _text(event.get("at"))
                elif kind == "state":
                    record.state = _text(event.get("state"))
                    counts = event.get("counts")
                    record.counts = counts if isinstance(counts, dict) else {}
                elif kind == "cancel":
                    record.cancel_requested = True
        if "key" not in job:
            return None
        return cls(folder, job, parts)

    @classmethod
    def open(cls, state_dir: Path, *, wire: str, base_url: str, api_key_env: str) -> Ledger:
        """The output's ledger, started (with a new random key) when there is none yet."""
        found = cls.read(state_dir)
        if found is not None:
            return found
        folder = ledger_dir(state_dir)
        folder.mkdir(parents=True, exist_ok=True)
        ledger = cls(folder, {}, {})
        ledger.job = {"event": "job", "key": secrets.token_hex(8), "wire": wire,
                      "base_url": base_url, "api_key_env": api_key_env, "at": now_iso()}
        ledger._append(ledger.job)
        return ledger

    def placements(self, derived: Callable[[str], str | None]) -> dict[str, Placed]:
        """Every row id ever put in a part → its latest placement (the highest part). A
        custom_id that is ``derived(row_id)`` is not kept (see :class:`Placed`)."""
        placed: dict[str, Placed] = {}
        for number in sorted(self.parts):
            path = self._ids_path(number)
            if not path.is_file():
                continue
            with path.open("rb") as handle:
                for line in handle:
                    try:
                        custom_id, row_id, attempt = orjson.loads(line)
                    except (orjson.JSONDecodeError, ValueError, TypeError):
                        continue
                    key = str(row_id)
                    placed[key] = Placed(number, None if custom_id == derived(key)
                                         else str(custom_id), int(attempt))
        return placed

    def next_part(self) -> int:
        return max(self.parts, default=0) + 1

    def part_writer(self, part: int) -> PartWriter:
        """Where a part's slots go while it is built (see :meth:`record_part`)."""
        return PartWriter(self._ids_path(part), self._rows_path(part))

    def slots(self, part: int) -> Iterator[Slot]:
        """The part's slots, in the order they were sent (read from disk, one at a time)."""
        path = self._rows_path(part)
        if not path.is_file():
            return
        with path.open("rb") as handle:
            for raw in handle:
                slot = Slot.parse(raw)
                if slot is not None:
                    yield slot

    def record_part(self, part: int, endpoint: str, writer: PartWriter) -> PartRecord:
        """Announce a part about to be submitted; its slots are durable before it is."""
        count = writer.commit()
        record = PartRecord(part, endpoint, count, submitted_at=now_iso())
        self.parts[part] = record
        self._append({"event": "part", "part": part, "endpoint": endpoint, "requests": count,
                      "at": record.submitted_at})
        return record

    def record_created(self, part: int, batch_id: str) -> None:
        record = self.parts[part]
        record.batch_id, record.created_at = batch_id, now_iso()
        self._append({"event": "created", "part": part, "batch_id": batch_id,
                      "at": record.created_at})

    def record_state(self, part: int, state: str, counts: dict[str, JSON]) -> None:
        """The last polled state (written only when it changed)."""
        record = self.parts[part]
        if record.state == state and record.counts == counts:
            return
        record.state, record.counts = state, counts
        self._append({"event": "state", "part": part, "state": state, "counts": counts,
                      "at": now_iso()})

    def record_cancel(self, part: int) -> None:
        self.parts[part].cancel_requested = True
        self._append({"event": "cancel", "part": part, "at": now_iso()})

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _ids_path(self, part: int) -> Path:
        return self.folder / f"part-{part:06d}.ids"

    def _rows_path(self, part: int) -> Path:
        return self.folder / f"part-{part:06d}.rows"

    def _append(self, event: dict[str, JSON]) -> None:
        if self._fd is None:
            self._fd = os.open(self.folder / LEDGER, os.O_WRONLY | os.O_APPEND | os.O_CREAT,
                               0o644)
        data = orjson.dumps(event) + b"\n"
        written = os.write(self._fd, data)
        if written != len(data):   # a full disk: the OSError path of the runner reports it
            raise OSError(28, "short write to the batch ledger")
        os.fsync(self._fd)


@dataclass(frozen=True, slots=True)
class Slot:
    """One row in a part, as ``part-N.rows`` keeps it: enough to build its result row
    (``model`` is the model asked for, ``row_model`` the row's own override, ``columns`` the
    input's columns) and to send it again (``line``, the request line as sent). Columns go
    through JSON: a value JSON has no type for (a timestamp, bytes, a decimal) comes back as
    its text."""

    custom_id: str
    row_id: str
    attempt: int
    reserved: float
    model: str | None
    row_model: str | None
    source: str
    line_no: int
    columns: dict[str, JSON]
    line: bytes
    cache_key: str | None = None
    """Where ``--cache`` keeps the answer (None: not cached)."""
    ordinal: int = 0
    """The input row's ordinal (0: not known, as in parts written before it was kept)."""

    def encode(self) -> bytes:
        return orjson.dumps([self.custom_id, self.row_id, self.attempt, self.reserved,
                             self.model, self.row_model, self.source, self.line_no,
                             self.columns, self.line.decode(), self.cache_key, self.ordinal],
                            default=str) + b"\n"

    @classmethod
    def parse(cls, raw: bytes) -> Slot | None:
        try:
            (custom_id, row_id, attempt, reserved, model, row_model, source, line_no,
             columns, line, *rest) = orjson.loads(raw)   # rest: the cache key and ordinal, since kept
        except (orjson.JSONDecodeError, ValueError, TypeError):
            return None
        cache_key = rest[0] if rest and isinstance(rest[0], str) else None
        ordinal = rest[1] if len(rest) > 1 and type(rest[1]) is int else 0
        return cls(str(custom_id), str(row_id), int(attempt), float(reserved), model,
                   row_model, str(source), int(line_no), dict(columns), str(line).encode(),
                   cache_key, ordinal)


class PartWriter:
    """Streams a part's ids and slots to ``.tmp`` files; :meth:`commit` makes them durable
    under their real names (fsync, rename) and returns how many rows the part has."""

    def __init__(self, ids: Path, rows: Path) -> None:
        self._paths = (ids, rows)
        self._tmp = tuple(p.with_name(p.name + ".tmp") for p in self._paths)
        self._ids = self._tmp[0].open("wb")
        self._rows = self._tmp[1].open("wb")
        self.count = 0

    def add(self, slot: Slot) -> None:
        self._ids.write(orjson.dumps([slot.custom_id, slot.row_id, slot.attempt]) + b"\n")
        self._rows.write(slot.encode())
        self.count += 1

    def commit(self) -> int:
        for handle, tmp, path in zip((self._ids, self._rows), self._tmp, self._paths,
                                     strict=True):
            handle.flush()
            os.fsync(handle.fileno())
            handle.close()
            os.replace(tmp, path)
        return self.count

    def discard(self) -> None:
        for handle, tmp in zip((self._ids, self._rows), self._tmp, strict=True):
            handle.close()
            tmp.unlink(missing_ok=True)


def _events(path: Path) -> Iterator[dict[str, JSON]]:
    with path.open("rb") as handle:
        for line in handle:
            try:
                event = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue     # a torn last line (kill -9 mid-write)
            if isinstance(event, dict):
                yield event


def _text(value: JSON) -> str | None:
    return value if isinstance(value, str) else None
