"""The opt-in response cache: answers stored by a hash of the exact request, in one SQLite file.

Contract:
- The key is a SHA-256 of the request as sent: method, URL (query keys dropped), the JSON
  body with its keys sorted (model, every parameter, messages), and the non-secret headers.
  Any change to any of those misses. API keys never enter the key or the store.
- Only answers worth serving again are stored: 2xx, parsed ok, finish reason ``stop`` /
  ``tool_calls`` (or none, for embeddings). Errors and ``length``-cut answers never are.
- Crash safety comes from SQLite: each entry is one committed transaction in WAL mode, so a
  kill -9 mid-write leaves either the whole entry or none of it. Several processes may share
  one folder: SQLite's file locks serialise writers, and a busy database makes a store
  skip (the answer is still written to the output; only the cache misses it).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import re
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import orjson

from batcher.errors import ConfigError, InputError
from batcher.providers import provider_for_row
from batcher.secrets import is_secret_header
from batcher.types import JSON, HttpRequest, HttpResponse, RequestContext, RequestRow

DB_NAME = "cache.sqlite3"
BUSY_TIMEOUT_MS = 5000
"""How long one statement waits for another process's write lock before giving up."""

CACHEABLE_FINISH = frozenset({None, "stop", "tool_calls"})
"""Normalised finish reasons whose answers are stored (``length`` cut answers are not)."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    key TEXT PRIMARY KEY,
    status INTEGER NOT NULL,
    body BLOB NOT NULL,
    model TEXT,
    cost_usd REAL,
    created_at REAL NOT NULL,
    hits INTEGER NOT NULL DEFAULT 0,
    last_hit_at REAL
);
CREATE INDEX IF NOT EXISTS entries_created ON entries (created_at);
"""


def request_key(request: HttpRequest) -> str:
    """The hex SHA-256 that identifies ``request`` in the cache (see the module docstring)."""
    parts = urlsplit(request.url)
    query = urlencode(sorted((k, v) for k, v in parse_qsl(parts.query)
                             if not is_secret_header(k)))
    url = urlunsplit((parts.scheme, parts.netloc, parts.path, query, ""))
    try:
        body: JSON = orjson.loads(request.body)
    except orjson.JSONDecodeError:
        body = request.body.decode("utf-8", "replace")
    headers = sorted((k.lower(), v) for k, v in request.headers.items()
                     if not is_secret_header(k))
    blob = orjson.dumps({"method": request.method.upper(), "url": url, "body": body,
                         "headers": headers}, option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(blob).hexdigest()


def is_deterministic(request: HttpRequest) -> bool:
    """True when the request asks for ``temperature`` 0 (top level, or Gemini's
    ``generationConfig``), or is an embeddings request. A request that sets no temperature
    gets the vendor's default, which is above 0, so it counts as nondeterministic."""
    if request.url.rstrip("/").endswith("/embeddings"):
        return True
    try:
        body = orjson.loads(request.body)
    except orjson.JSONDecodeError:
        return False
    if not isinstance(body, dict):
        return False
    temperature = body.get("temperature")
    config = body.get("generationConfig")
    if temperature is None and isinstance(config, dict):
        temperature = config.get("temperature")
    return (isinstance(temperature, int | float) and not isinstance(temperature, bool)
            and temperature == 0)


@dataclass(frozen=True, slots=True)
class CacheStats:
    """What a cache folder holds. Costs are USD, as first paid; times are epoch seconds."""

    path: str
    entries: int
    hits: int
    bytes: int
    file_bytes: int
    cost_usd: float
    oldest: float | None
    newest: float | None
    by_model: dict[str, int]

    def to_json(self) -> dict[str, JSON]:
        return {"path": self.path, "entries": self.entries, "hits": self.hits,
                "bytes": self.bytes, "file_bytes": self.file_bytes, "cost_usd": self.cost_usd,
                "oldest": _iso(self.oldest), "newest": _iso(self.newest),
                "by_model": self.by_model}

    def render(self) -> str:
        lines = [f"cache {self.path}",
                 f"  entries      {self.entries:,}",
                 f"  served hits  {self.hits:,}",
                 f"  answers      {self.bytes / 1e6:,.2f} MB (file {self.file_bytes / 1e6:,.2f} MB)",
                 f"  first cost   ${self.cost_usd:,.4f}",
                 f"  oldest       {_iso(self.oldest) or '-'}",
                 f"  newest       {_iso(self.newest) or '-'}"]
        lines.extend(f"  model {model}: {n:,}" for model, n in self.by_model.items())
        return "\n".join(lines)


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


class ResponseCache:
    """One open cache folder. Not thread-safe: use it from the event loop's thread.

    Reads never fail a job: an unreadable entry is a miss. Writes that find the database
    locked for longer than :data:`BUSY_TIMEOUT_MS` are skipped and counted in ``skipped``.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.skipped = 0
        try:
            folder.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(folder / DB_NAME, timeout=BUSY_TIMEOUT_MS / 1000,
                                       isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL: a process crash loses nothing committed; a power cut may lose
            # the last entries but never leaves a torn one.
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError(f"cache {folder}: cannot open ({exc}); give another --cache "
                              "folder or remove the broken one") from exc

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> ResponseCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def get(self, key: str) -> HttpResponse | None:
        """The stored answer for ``key`` (its hit counted), or None."""
        try:
            found = self._db.execute("SELECT status, body FROM entries WHERE key = ?",
                                     (key,)).fetchone()
            if found is None:
                return None
            self._db.execute("UPDATE entries SET hits = hits + 1, last_hit_at = ? WHERE key = ?",
                             (time.time(), key))
        except sqlite3.Error:
            return None
        status, body = found
        return HttpResponse(status=int(status), headers={}, body=bytes(body))

    def contains(self, keys: Iterable[str]) -> set[str]:
        """Which of ``keys`` are stored (no hit counted): for the dry run."""
        wanted = list(keys)
        found: set[str] = set()
        for start in range(0, len(wanted), 500):
            chunk = wanted[start:start + 500]
            marks = ",".join("?" * len(chunk))
            rows = self._db.execute(f"SELECT key FROM entries WHERE key IN ({marks})", chunk)
            found.update(r[0] for r in rows)
        return found

    def put(self, key: str, response: HttpResponse, *, model: str | None,
            cost_usd: float | None) -> None:
        """Store one answer in its own transaction (a replaced entry keeps its hit count)."""
        try:
            self._db.execute(
                "INSERT INTO entries (key, status, body, model, cost_usd, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (key) DO UPDATE SET "
                "status = excluded.status, body = excluded.body, model = excluded.model, "
                "cost_usd = excluded.cost_usd, created_at = excluded.created_at",
                (key, response.status, response.body, model, cost_usd, time.time()))
        except sqlite3.OperationalError:
            self.skipped += 1

    def forget(self, key: str) -> None:
        """Drop an entry that turned out unusable (e.g. no longer parses)."""
        with contextlib.suppress(sqlite3.Error):
            self._db.execute("DELETE FROM entries WHERE key = ?", (key,))

    def stats(self) -> CacheStats:
        entries, hits, size, cost, oldest, newest = self._db.execute(
            "SELECT COUNT(*), COALESCE(SUM(hits), 0), COALESCE(SUM(LENGTH(body)), 0), "
            "COALESCE(SUM(cost_usd), 0), MIN(created_at), MAX(created_at) FROM entries"
        ).fetchone()
        by_model = {str(m): int(n) for m, n in self._db.execute(
            "SELECT COALESCE(model, '(unknown)'), COUNT(*) FROM entries GROUP BY 1 "
            "ORDER BY 2 DESC")}
        file_bytes = sum(p.stat().st_size for p in self.folder.glob(DB_NAME + "*"))
        return CacheStats(path=str(self.folder), entries=int(entries), hits=int(hits),
                          bytes=int(size), file_bytes=file_bytes, cost_usd=round(float(cost), 6),
                          oldest=oldest, newest=newest, by_model=by_model)

    def clear(self, older_than: float | None = None) -> int:
        """Delete every entry, or those stored more than ``older_than`` seconds ago; returns
        how many went. The file is compacted afterwards."""
        if older_than is None:
            removed = self._db.execute("DELETE FROM entries").rowcount
        else:
            removed = self._db.execute("DELETE FROM entries WHERE created_at < ?",
                                       (time.time() - older_than,)).rowcount
        self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        # Another run writing meanwhile makes VACUUM fail: the space is then reused later.
        with contextlib.suppress(sqlite3.OperationalError):
            self._db.execute("VACUUM")
        return int(removed)


_AGE = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_AGE_UNITS: Mapping[str, float] = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}


def parse_age(text: str) -> float:
    """Seconds in an age such as ``30d``, ``12h``, ``1w2d`` or ``90m``; ConfigError otherwise."""
    value = text.strip().lower()
    total, pos = 0.0, 0
    for match in _AGE.finditer(value):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _AGE_UNITS[match.group(2)]
        pos = match.end()
    if pos == 0 or pos != len(value):
        raise ConfigError(f"--older-than: {text!r} is not an age like 30d, 12h or 90m")
    return total


def open_existing(folder: Path) -> ResponseCache:
    """Open a cache folder for ``stats``/``clear``; ConfigError when there is none there."""
    if not (folder / DB_NAME).is_file():
        raise ConfigError(f"{folder} is not a batcher cache (no {DB_NAME} in it)")
    return ResponseCache(folder)


def cache_misses(rows: Iterable[RequestRow], ctx: RequestContext, endpoint: str,
                 store: ResponseCache, *, nondeterministic: bool,
                 chunk_rows: int = 2048) -> Iterator[tuple[list[RequestRow], int]]:
    """For the dry run: ``rows`` in chunks, each as (the rows the cache would not answer,
    how many it would). Requests are built exactly as a run builds them (one row each);
    rows that cannot be built are passed on for the estimate to count."""
    iterator = iter(rows)
    while chunk := list(itertools.islice(iterator, chunk_rows)):
        keys: list[str | None] = []
        for row in chunk:
            try:
                request = provider_for_row(row, endpoint).build_request(row, ctx)
            except InputError:
                keys.append(None)
                continue
            usable = nondeterministic or is_deterministic(request)
            keys.append(request_key(request) if usable else None)
        found = store.contains(k for k in keys if k is not None)
        missed = [row for row, key in zip(chunk, keys, strict=True) if key not in found]
        yield missed, len(chunk) - len(missed)
