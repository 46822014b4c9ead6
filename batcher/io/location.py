"""Where an input lives and how its bytes are reached: a local path (read with Python's own
I/O, as always) or an object-store URL (``s3://``, ``gs://``, ``file://``) read through
pyarrow's filesystems (``gs://`` at an emulator when ``STORAGE_EMULATOR_HOST`` or
``CLOUD_STORAGE_EMULATOR_ENDPOINT`` names one); and the :class:`InputScan` seam through which
an engine may stream the files' content instead (``--engine ray``: Ray Data).

Everything that only *looks at* an input — which files a directory holds, their sizes, the
fingerprint's first and last MiB, Parquet footers — goes through :class:`InputLocation`
on this process, with ranged reads for URLs: cheap wherever the input is. Only the full
passes over the content (rows, ids, counting JSONL lines) go through the location's scan.
"""

from __future__ import annotations

import gzip
import io
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from batcher.errors import InputError
from batcher.io.rows import _short

__all__ = ["ByteStream", "InputFile", "InputLocation", "InputScan", "as_input", "is_url",
           "names_a_url"]

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_FOLDED_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:/")
_PARQUET_BUFFER_BYTES = 1 << 20
_JSONL_SUFFIXES = (".jsonl", ".ndjson")
_GZ_SUFFIXES = (".jsonl.gz", ".ndjson.gz")
_SUPPORTED = ".jsonl, .ndjson, .jsonl.gz, .ndjson.gz, .parquet or a directory of .parquet files"
# A GCS emulator (or any GCS-compatible server without Google's sign-in) is named by the
# variable Google's clients and the emulators use, STORAGE_EMULATOR_HOST. Arrow's GCS client
# (google-cloud-cpp) sends its requests to CLOUD_STORAGE_EMULATOR_ENDPOINT on its own but still
# asks for Google credentials first, which an emulator neither has nor needs (without any, it
# retries for 15 minutes): so either variable means an anonymous client, the first one winning
# as it does in Arrow's client. pyarrow takes gcs:// for gs:// too.
_GCS_SCHEMES = ("gs", "gcs")
_GCS_EMULATOR_VARIABLES = ("CLOUD_STORAGE_EMULATOR_ENDPOINT", "STORAGE_EMULATOR_HOST")
# How long the GCS client retries an emulator that does not answer (about twice this, with its
# backoff). Its default is 15 minutes (1,096 s measured at a closed port), during which Ctrl-C
# is not acted on: an emulator that is down is a wrong setting, to be told in seconds.
_GCS_EMULATOR_RETRY = timedelta(seconds=5)


def is_url(value: str | Path) -> bool:
    """Whether ``value`` is a URL (``scheme://…``) rather than a local path."""
    return isinstance(value, str) and _URL.match(value) is not None


def names_a_url(value: str | Path) -> bool:
    """Whether ``value`` is a URL, also once a :class:`Path` folded its ``//`` (``s3:/b/k``;
    a Windows drive letter is not a scheme)."""
    return _FOLDED_URL.match(str(value)) is not None


def as_input(value: str | Path) -> Path | str:
    """An input as the config keeps it: a URL stays the text given (``Path`` would fold its
    ``//``); anything else is a local :class:`Path`."""
    return value if is_url(value) else Path(value)


class ByteStream(Protocol):
    """What :meth:`InputLocation.open_binary` returns: a Python or pyarrow binary file."""

    def read(self, size: int, /) -> bytes: ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class InputFile:
    """One file of an input: ``path`` as its filesystem names it (local: the OS path),
    ``source`` as messages name it (the user's path or URL), ``size`` in bytes."""

    path: str
    source: str
    size: int


class InputScan(Protocol):
    """How the content of an input's files reaches the reader, in input order. The default
    (no scan) reads on this process; ``--engine ray`` reads with Ray Data. Either way the
    reader builds the rows from what it yields, so rows, ids and bad-row reports are the
    same. Errors are :class:`InputError` naming the file."""

    def jsonl_blocks(self, location: InputLocation, file: InputFile,
                     gz: bool) -> Iterator[bytes]:
        """The file's bytes (decompressed when ``gz``) in blocks of whole lines (see
        :func:`read_blocks`)."""
        ...

    def parquet_batches(self, location: InputLocation, file: InputFile,
                        columns: list[str] | None, batch_size: int) -> Iterator[pa.RecordBatch]:
        """The file's rows (only ``columns`` when given) as record batches, in order."""
        ...

    def close(self) -> None:
        """Release what the scan holds (the job is over)."""
        ...


class InputLocation:
    """An input: a local path, or a URL that :func:`pyarrow.fs.FileSystem.from_uri`
    understands. ``scan`` (None: this process) streams the files' content."""

    def __init__(self, given: str | Path, scan: InputScan | None = None) -> None:
        self.given = str(given)
        self.url = is_url(given)
        self.scan = scan
        self._filesystem: pafs.FileSystem | None = None
        self._fs_path = ""
        self._resolved: tuple[str, list[InputFile]] | None = None

    def __str__(self) -> str:
        return self.given

    @property
    def filesystem(self) -> pafs.FileSystem:
        """The pyarrow filesystem the files are on (local paths: the local one)."""
        if self._filesystem is None:
            if not self.url:
                self._filesystem = pafs.LocalFileSystem()
                self._fs_path = str(Path(self.given).resolve())
            else:
                try:
                    self._filesystem, self._fs_path = _url_filesystem(self.given)
                except (pa.ArrowException, OSError, ValueError) as exc:
                    raise InputError(self.given, f"cannot open this URL: {_short(exc)} (inputs "
                                     "may be local paths or s3://, gs://, file:// URLs)") from exc
        return self._filesystem

    def fs_path(self, file: InputFile) -> str:
        """``file``'s path on :attr:`filesystem` (absolute, for a local file)."""
        return file.path if self.url else str(Path(file.path).resolve())

    def resolve(self) -> tuple[str, list[InputFile]]:
        """(kind, files): kind is ``jsonl``, ``jsonl.gz`` or ``parquet``; a directory's
        ``.parquet`` files (top level, none hidden or tool metadata) sorted by name.
        Raises :class:`InputError` naming the input. Looked up once."""
        if self._resolved is None:
            self._resolved = self._remote() if self.url else self._local()
        return self._resolved

    def _local(self) -> tuple[str, list[InputFile]]:
        path = Path(self.given)
        if not path.exists():
            raise InputError(self.given, "no such file or directory")
        if path.is_dir():
            files = sorted((p for p in path.iterdir()
                            if p.is_file() and _is_part(p.name)), key=lambda p: p.name)
            if not files:
                raise InputError(self.given, "directory holds no .parquet files")
            return "parquet", [InputFile(str(p), str(p), p.stat().st_size) for p in files]
        return _kind(path.name, self.given), [InputFile(str(path), str(path),
                                                        path.stat().st_size)]

    def _remote(self) -> tuple[str, list[InputFile]]:
        filesystem = self.filesystem
        base = self._fs_path
        try:
            info = filesystem.get_file_info(base)
            if info.type == pafs.FileType.Directory:
                listed = filesystem.get_file_info(pafs.FileSelector(base, recursive=False))
            else:
                listed = []
        except (pa.ArrowException, OSError) as exc:
            raise InputError(self.given, f"cannot read: {_short(exc)}") from exc
        if info.type == pafs.FileType.NotFound:
            raise InputError(self.given, "no such file or directory (or bucket)")
        if info.type != pafs.FileType.Directory:
            return _kind(info.base_name, self.given), [
                InputFile(base, self.given, int(info.size or 0))]
        prefix = self.given.rstrip("/")
        files = sorted((f for f in listed
                        if f.type == pafs.FileType.File and _is_part(f.base_name)),
                       key=lambda f: f.base_name)
        if not files:
            raise InputError(self.given, "directory holds no .parquet files")
        return "parquet", [InputFile(f.path, f"{prefix}/{f.base_name}", int(f.size or 0))
                           for f in files]

    # --- reading on this process ---

    def open_binary(self, file: InputFile, gz: bool) -> ByteStream:
        """A readable binary stream of ``file`` (decompressed when ``gz``); InputError if it
        cannot be opened."""
        try:
            if not self.url:
                return gzip.GzipFile(file.path, "rb") if gz else open(file.path, "rb")
            stream = self.filesystem.open_input_stream(file.path, compression=None)
            # A pyarrow stream is a file object: gzip reads it as it would a local file
            # (and its errors are the same as for a local file).
            return gzip.GzipFile(fileobj=stream, mode="rb") if gz else stream
        except (pa.ArrowException, OSError) as exc:
            raise InputError(file.source, f"cannot open: {_short(exc)}") from exc

    def open_parquet(self, file: InputFile) -> pq.ParquetFile:
        """``file`` opened for its footer and buffered column reads (memory bounded by the
        buffer, not the row group); InputError if it is not readable Parquet."""
        try:
            where: str | pa.NativeFile = (file.path if not self.url
                                          else self.filesystem.open_input_file(file.path))
            return pq.ParquetFile(where, buffer_size=_PARQUET_BUFFER_BYTES, pre_buffer=False)
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise InputError(file.source, f"cannot read Parquet: {_short(exc)}") from exc

    def head_and_tail(self, file: InputFile, size: int) -> tuple[int, bytes, bytes]:
        """(size, first ``size`` bytes, last ``size`` bytes — only when the file is larger
        than ``size``, else empty; never overlapping the head): two ranged reads."""
        try:
            # A random-access file of an object store reads each seek-and-read as one
            # ranged GET; a local file is read by Python's own I/O.
            with (self.filesystem.open_input_file(file.path) if self.url
                  else open(file.path, "rb")) as fh:
                total = fh.seek(0, io.SEEK_END)
                fh.seek(0)
                head = fh.read(size)
                tail = b""
                if total > size:
                    fh.seek(max(size, total - size))
                    tail = fh.read(size)
                return total, head, tail
        except (pa.ArrowException, OSError) as exc:
            raise InputError(file.source, f"cannot read: {_short(exc)}") from exc


def _url_filesystem(url: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem of ``url`` and the path on it: pyarrow's own reading of the URL, except a
    ``gs://`` URL while a GCS emulator variable is set (see ``_GCS_EMULATOR_VARIABLES``)."""
    parts = urlsplit(url)
    emulator = next(((name, os.environ[name]) for name in _GCS_EMULATOR_VARIABLES
                     if os.environ.get(name)), None)
    if parts.scheme.lower() not in _GCS_SCHEMES or emulator is None:
        return pafs.FileSystem.from_uri(url)
    name, value = emulator
    endpoint = urlsplit(value if "://" in value else f"http://{value}")
    if endpoint.scheme not in ("http", "https") or not endpoint.netloc \
            or endpoint.path.strip("/") or endpoint.query:
        raise InputError(url, f"{name}={value!r} is not a GCS endpoint such as "
                         "http://127.0.0.1:9023")
    if parts.query:
        raise InputError(url, f"a gs:// URL takes no query options while {name} is set")
    bucket = parts.netloc.rpartition("@")[2]   # gs://anonymous@bucket/… is anonymous anyway
    if not bucket:
        raise InputError(url, "the URL names no bucket")
    filesystem = pafs.GcsFileSystem(anonymous=True, scheme=endpoint.scheme,
                                    endpoint_override=endpoint.netloc,
                                    retry_time_limit=_GCS_EMULATOR_RETRY)
    return filesystem, f"{bucket}{parts.path}".rstrip("/")


def _is_part(name: str) -> bool:
    # dot/underscore files are hidden or tool metadata (Spark, Hive)
    return name.lower().endswith(".parquet") and not name.startswith((".", "_"))


def _kind(name: str, source: str) -> str:
    name = name.lower()
    if name.endswith(_JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(_GZ_SUFFIXES):
        return "jsonl.gz"
    if name.endswith(".parquet"):
        return "parquet"
    raise InputError(source, f"unsupported input type: expected {_SUPPORTED}")
