"""The run report's figures, aggregated from an output's record batches: pure, typed, flat in memory.

:func:`aggregate` (pure) folds Arrow record batches (only the :func:`needed_columns`) into one
:class:`OutputStats`; :func:`aggregate_output` streams them from a Parquet output and, for a
run that has not finished, from the answers still in its state folder. Nothing is
kept per row except the latency and time-to-first-token values (float32, 4 bytes a row, so a
10M-row output holds 40 MB of each), which exact percentiles need; they are summarised and
dropped before :func:`aggregate` returns.

Definitions (the report prints them, the tests compute them by hand):

- throughput: rows per 10 s bucket of ``completed_at``, buckets aligned to the epoch
  (``floor(ms / 10000) * 10``); a bucket's rate is its rows / 10 s. Retries are the attempts past
  the first of the rows finished in it; rate-limited are its rows that ended on a 429 (a 429
  answered in between is not an attempt and leaves no trace in the output).
- percentiles: linear interpolation between order statistics (numpy's default), over the
  non-null values; error rows have a latency too when a send was answered.
- exact match: the output with surrounding whitespace trimmed equals the expected value (as
  text, trimmed); counted over rows whose expected value is not null, error rows counting as
  misses.
- ``length`` share: rows with ``finish_reason == "length"`` over ``ok`` rows.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias, cast

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from batcher.checkpoint import unmerged_sources
from batcher.errors import ConfigError, InputError
from batcher.io.writer import iter_journal, records_to_table, release_memory, superseded_masks
from batcher.spend import Spend

BUCKET_S = 10
"""Width of a throughput bucket, seconds."""

EXAMPLES_PER_TYPE = 3
"""Example errors kept per ``error_type``."""

DEFAULT_EXPECTED_COLUMN = "expected"
UNKNOWN_MODEL = "(unknown)"

_BASE_COLUMNS = ("status", "model", "finish_reason", "error_type", "error", "id", "http_status",
                 "latency_ms", "ttft_ms", "attempts", "prompt_tokens", "completion_tokens",
                 "cost_usd", "completed_at")
_READ_BATCH_ROWS = 16_384
"""Rows per batch read: small enough that a batch of every needed column stays a few MB."""


if TYPE_CHECKING:
    Arr: TypeAlias = pa.Array[Any]
    """An Arrow array of any type (the stubs' generics say nothing useful here)."""
else:
    Arr = pa.Array


@dataclass(frozen=True, slots=True)
class Percentiles:
    """p50/p90/p99 (same unit as the values) over ``count`` non-null values; None when none."""

    count: int
    p50: float | None
    p90: float | None
    p99: float | None
    mean: float | None


_KEPT = pa.system_memory_pool()

Histogram = list[tuple[float, float, int]]
"""(start, end, count) per bin."""

HISTOGRAM_BINS = 40


@dataclass(slots=True)
class Distribution:
    """Values collected batch by batch (float32), summarised once at the end: :meth:`freeze`
    keeps the percentiles and the histogram and lets the values go."""

    chunks: list[Arr] = field(default_factory=list)
    frozen: tuple[Percentiles, Histogram] | None = None

    def add(self, values: Arr) -> None:
        values = _a(pc.drop_null(values))
        if len(values):
            # Kept values come from malloc, the batch's temporaries from Arrow's pool: kept
            # chunks scattered among freed pages would otherwise pin them (~60 MB at 10M rows).
            self.chunks.append(_a(pc.cast(values, pa.float32(), memory_pool=_KEPT)))

    def values(self) -> pa.ChunkedArray[Any]:
        return pa.chunked_array(self.chunks, type=pa.float32())

    def freeze(self) -> None:
        """Compute the summaries and drop the values (idempotent)."""
        if self.frozen is None:
            values = self.values()
            self.frozen = (percentiles(values), _histogram(values, HISTOGRAM_BINS))
            self.chunks = []

    def percentiles(self) -> Percentiles:
        return self.frozen[0] if self.frozen else percentiles(self.values())

    def histogram(self) -> Histogram:
        """:data:`HISTOGRAM_BINS` equal bins from 0 to the 99.5th percentile; values past it
        are counted in the last bin (so one outlier does not squash the picture)."""
        return self.frozen[1] if self.frozen else _histogram(self.values(), HISTOGRAM_BINS)


def _histogram(values: pa.ChunkedArray[Any], bins: int) -> Histogram:
    """Counted chunk by chunk: temporaries stay the size of one batch, not of the output."""
    if not len(values):
        return []
    top = _quantiles(values, [0.995])[0]
    if top <= 0:
        top = max(float(cast(Any, pc.max(values)).as_py() or 0.0), 1.0)
    width = top / bins
    counts: Counter[str] = Counter()
    for chunk in values.chunks:
        index = pc.min_element_wise(
            pc.cast(pc.floor(pc.divide(chunk, pa.scalar(width, pa.float32()))), pa.int64()),
            pa.scalar(bins - 1, pa.int64()))
        counts.update(_counts(_a(index)))
    return [(i * width, (i + 1) * width, counts[str(i)]) for i in range(bins)]


@dataclass(slots=True)
class Bucket:
    """One 10 s bucket of ``completed_at``."""

    rows: int = 0
    errors: int = 0
    retries: int = 0
    rate_limited: int = 0


@dataclass(slots=True)
class ModelStats:
    """One model's rows in one output."""

    model: str
    rows: int = 0
    ok: int = 0
    error: int = 0
    length_finishes: int = 0
    spend: Spend = field(default_factory=Spend)
    latency: Distribution = field(default_factory=Distribution)
    expected_rows: int = 0
    exact_matches: int = 0

    @property
    def error_rate(self) -> float | None:
        return self.error / self.rows if self.rows else None

    @property
    def length_share(self) -> float | None:
        return self.length_finishes / self.ok if self.ok else None

    @property
    def accuracy(self) -> float | None:
        return self.exact_matches / self.expected_rows if self.expected_rows else None


@dataclass(frozen=True, slots=True)
class ErrorExample:
    id: str
    error_type: str
    http_status: int | None
    message: str


@dataclass(slots=True)
class OutputStats:
    """Everything the report shows about one output, bar its summary JSON."""

    rows: int = 0
    ok: int = 0
    error: int = 0
    retries: int = 0
    models: dict[str, ModelStats] = field(default_factory=dict)
    buckets: dict[int, Bucket] = field(default_factory=dict)
    """bucket start (epoch seconds, a multiple of :data:`BUCKET_S`) → its counts."""
    finish_reasons: Counter[str] = field(default_factory=Counter)
    error_types: Counter[str] = field(default_factory=Counter)
    examples: list[ErrorExample] = field(default_factory=list)
    ttft: Distribution = field(default_factory=Distribution)
    spend: Spend = field(default_factory=Spend)
    expected_column: str | None = None
    _latency: Distribution | None = None

    @property
    def latency(self) -> Distribution:
        """Every model's latencies together (the values are not held twice)."""
        if self._latency is not None:
            return self._latency
        return Distribution([c for m in self.models.values() for c in m.latency.chunks])

    def freeze(self) -> None:
        """Summarise every distribution and drop their values (what :func:`aggregate` hands
        back: figures only, a few kB whatever the output's size)."""
        if self._latency is None:
            self._latency = self.latency
            self._latency.freeze()
        for m in self.models.values():
            m.latency.freeze()
        self.ttft.freeze()


def percentiles(values: Arr | pa.ChunkedArray[Any]) -> Percentiles:
    """p50/p90/p99 and the mean of the non-null ``values`` (linear interpolation)."""
    if values.null_count:
        values = pc.drop_null(values)
    if not len(values):
        return Percentiles(0, None, None, None, None)
    p50, p90, p99 = _quantiles(values, [0.5, 0.9, 0.99])
    mean = cast(Any, pc.mean(values)).as_py()
    return Percentiles(len(values), p50, p90, p99, float(mean))


def needed_columns(schema: pa.Schema, expected_column: str | None) -> list[str]:
    """The columns the report reads: those of :data:`_BASE_COLUMNS` the output has, plus
    ``output`` and the expected column for accuracy."""
    wanted = [c for c in _BASE_COLUMNS if c in schema.names]
    if expected_column is not None:
        wanted += ["output", expected_column]
    return [c for c in dict.fromkeys(wanted) if c in schema.names]


def resolve_expected_column(schema: pa.Schema, requested: str | None) -> str | None:
    """The expected-answer column: ``requested`` (it must exist), else ``expected`` when the
    output has it, else None (no accuracy)."""
    if requested is not None:
        if requested not in schema.names:
            raise ConfigError(f"--expected-column {requested!r}: the output has no such column "
                              f"(columns: {', '.join(schema.names)})")
        return requested
    return DEFAULT_EXPECTED_COLUMN if DEFAULT_EXPECTED_COLUMN in schema.names else None


def has_results(output: Path) -> bool:
    """True when there is something to report on: the output, or answers in its state."""
    return output.is_file() or bool(unmerged_sources(output))


def aggregate_output(path: Path, expected_column: str | None = None) -> OutputStats:
    """Aggregate the results of the job writing ``path``, reading only the needed columns in
    batches: the Parquet output, plus, mid-run or after an interrupt, the answers still in its
    state folder (the latest row per id winning, as the final output will have it)."""
    if not has_results(path):
        raise InputError(str(path), "no such output, and no answers in its state folder")
    for attempt in range(5):
        try:
            stats = _aggregate_sources(path, unmerged_sources(path), expected_column)
            break
        except FileNotFoundError:
            # A live run compacted or merged a file under us: list the sources again.
            if attempt == 4:
                raise
            time.sleep(0.05)
    # The read buffers are freed but kept mapped by the allocators: hand them back, so that
    # rendering (a V8 runtime of its own) does not stack on the reading's high-water mark.
    release_memory()
    return stats


class _Source:
    """One file of results: the output or a part (Parquet, read in batches) or a journal
    (JSONL, small: it holds at most one compaction's rows)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file: pq.ParquetFile | None = None
        self.table: pa.Table | None = None
        try:
            if path.suffix == ".jsonl":
                self.table = records_to_table(iter_journal(path))
                self.schema = self.table.schema
            else:
                # Column chunks read as decoded, not whole row groups ahead (~50 MB less).
                self.file = pq.ParquetFile(path, pre_buffer=False, buffer_size=1 << 20)
                self.schema = self.file.schema_arrow
        except FileNotFoundError:
            raise
        except (OSError, pa.ArrowException) as exc:
            raise InputError(str(path), f"not a readable Parquet output ({exc})") from exc
        if "status" not in self.schema.names or "id" not in self.schema.names:
            raise InputError(str(path), "not a batcher output (no 'id'/'status' column)")

    def ids(self) -> pa.ChunkedArray[Any]:
        if self.table is not None:
            return self.table.column("id")
        assert self.file is not None
        return self.file.read(columns=["id"]).column("id")

    def batches(self, columns: list[str]) -> Iterator[pa.RecordBatch]:
        wanted = [c for c in columns if c in self.schema.names]
        if self.table is not None:
            yield from self.table.select(wanted).to_batches(max_chunksize=_READ_BATCH_ROWS)
            return
        assert self.file is not None
        yield from self.file.iter_batches(batch_size=_READ_BATCH_ROWS, use_threads=False,
                                          columns=wanted)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def _aggregate_sources(output: Path, unmerged: list[Path], expected_column: str | None
                       ) -> OutputStats:
    paths = ([output] if output.is_file() or not unmerged else []) + unmerged
    sources: list[_Source] = []
    try:
        for path in paths:
            sources.append(_Source(path))
        names = list(dict.fromkeys(n for s in sources for n in s.schema.names))
        expected = resolve_expected_column(pa.schema([(n, pa.string()) for n in names]),
                                           expected_column)
        columns = needed_columns(pa.schema([(n, pa.string()) for n in names]), expected)
        # One source (the finished case): every id once, nothing to mask.
        masks = superseded_masks([s.ids() for s in sources]) if len(sources) > 1 else [None]

        def batches() -> Iterator[pa.RecordBatch]:
            for source, mask in zip(sources, masks, strict=True):
                offset = 0
                for batch in source.batches(columns):
                    rows = batch.num_rows
                    if mask is not None:  # drop the rows a later result of the same id replaced
                        batch = batch.filter(mask.slice(offset, rows))
                    offset += rows
                    yield batch

        return aggregate(batches(), expected_column=expected)
    finally:
        for source in sources:
            source.close()


def aggregate(batches: Iterable[pa.RecordBatch], *, expected_column: str | None = None
              ) -> OutputStats:
    """Fold ``batches`` (any subset of the output's columns; a missing one counts as null) into
    one :class:`OutputStats`."""
    stats = OutputStats(expected_column=expected_column)
    for batch in batches:
        if batch.num_rows:
            _add_batch(stats, _Columns(batch, expected_column))
    stats.freeze()
    return stats


class _Columns:
    """A batch's columns by name, a missing one read as all null of its type."""

    def __init__(self, batch: pa.RecordBatch, expected_column: str | None) -> None:
        self.batch = batch
        self.n = batch.num_rows
        self.expected_column = expected_column

    def get(self, name: str, type: pa.DataType | None = None) -> Arr:
        type = type or pa.string()
        if name in self.batch.schema.names:
            column = self.batch.column(name)
            return column if column.type == type else _a(column.cast(type))
        return _a(cast(Any, pa.nulls)(self.n, type))


def _add_batch(stats: OutputStats, cols: _Columns) -> None:
    ok = _fill(_eq(cols.get("status"), "ok"), False)
    is_error = _a(pc.invert(ok))
    attempts = _fill(cols.get("attempts", pa.int64()), 0)
    retries = _a(pc.max_element_wise(pc.subtract(attempts, pa.scalar(1)), pa.scalar(0)))
    error_type = cols.get("error_type")
    rate_limited = _and(is_error, _fill(_a(pc.or_(
        _eq(cols.get("http_status", pa.int64()), 429), _eq(error_type, "rate_limited"))), False))
    prompt = cols.get("prompt_tokens", pa.int64())
    completion = cols.get("completion_tokens", pa.int64())
    cost = cols.get("cost_usd", pa.float64())
    usage = _a(pc.or_(pc.is_valid(prompt), pc.is_valid(completion)))
    priced = _a(pc.is_valid(cost))
    length = _fill(_eq(cols.get("finish_reason"), "length"), False)
    latency = cols.get("latency_ms", pa.float64())
    model = _fill(cols.get("model"), UNKNOWN_MODEL)
    expected, matched = _exact_match(cols)

    stats.rows += cols.n
    n_ok = _count_true(ok)
    stats.ok += n_ok
    stats.error += cols.n - n_ok
    stats.retries += _sum(retries)
    stats.ttft.add(cols.get("ttft_ms", pa.float64()))
    stats.finish_reasons.update(_counts(_a(cols.get("finish_reason").filter(ok))))
    stats.error_types.update(_counts(_a(_fill(error_type, "unknown").filter(is_error))))

    def i64(mask: Arr) -> Arr:
        return _a(mask.cast(pa.int64()))

    table = pa.table({
        "model": model, "ok": i64(ok), "error": i64(is_error), "length": i64(length),
        "prompt": prompt, "completion": completion, "cost": cost, "usage": i64(usage),
        "usage_unknown": i64(_and(ok, _a(pc.invert(usage)))), "priced": i64(priced),
        "cost_unknown": i64(_and(ok, _a(pc.invert(priced)))),
        "expected": i64(expected), "matched": i64(matched),
    })
    sums = ["ok", "error", "length", "prompt", "completion", "cost", "usage", "usage_unknown",
            "priced", "cost_unknown", "expected", "matched"]
    grouped = table.group_by("model").aggregate([(c, "sum") for c in sums] + [("model", "count")])
    one_model = grouped.num_rows == 1
    for g in grouped.to_pylist():
        name = str(g["model"])
        m = stats.models.setdefault(name, ModelStats(model=name))
        m.rows += int(g["model_count"])
        m.ok += g["ok_sum"] or 0
        m.error += g["error_sum"] or 0
        m.length_finishes += g["length_sum"] or 0
        m.expected_rows += g["expected_sum"] or 0
        m.exact_matches += g["matched_sum"] or 0
        m.latency.add(latency if one_model else _a(latency.filter(_eq(model, name))))
        part = Spend(prompt_tokens_known=g["prompt_sum"] or 0,
                     completion_tokens_known=g["completion_sum"] or 0,
                     cost_usd_known=g["cost_sum"] or 0.0, rows_priced=g["priced_sum"] or 0,
                     rows_cost_unknown=g["cost_unknown_sum"] or 0,
                     rows_usage_reported=g["usage_sum"] or 0,
                     rows_usage_unknown=g["usage_unknown_sum"] or 0)
        m.spend.add(part)
        stats.spend.add(part)

    _add_buckets(stats, cols, is_error, retries, rate_limited)
    _add_examples(stats, cols, is_error)


def _exact_match(cols: _Columns) -> tuple[Arr, Arr]:
    """(has an expected value, output matches it) per row; all False without the column."""
    if cols.expected_column is None:
        none = _a(pa.array([False] * cols.n, type=pa.bool_()))
        return none, none
    expected = cols.get(cols.expected_column)
    has = _a(pc.is_valid(expected))
    output = _a(pc.utf8_trim_whitespace(cols.get("output")))
    matched = _fill(_a(pc.equal(output, pc.utf8_trim_whitespace(expected))), False)
    return has, _and(has, matched)


def _add_buckets(stats: OutputStats, cols: _Columns, is_error: Arr, retries: Arr,
                 rate_limited: Arr) -> None:
    ms = cols.get("completed_at", pa.timestamp("ms", tz="UTC")).cast(pa.int64())
    width = BUCKET_S * 1000
    # Integer floor division: negative remainders cannot occur for real timestamps (>= 1970).
    start = _a(pc.multiply(pc.divide(ms, pa.scalar(width)), pa.scalar(BUCKET_S)))
    table = pa.table({"start": start, "error": is_error.cast(pa.int64()), "retries": retries,
                      "limited": rate_limited.cast(pa.int64())}).filter(pc.is_valid(start))
    grouped = table.group_by("start").aggregate(
        [("start", "count"), ("error", "sum"), ("retries", "sum"), ("limited", "sum")])
    for g in grouped.to_pylist():
        b = stats.buckets.setdefault(int(g["start"]), Bucket())
        b.rows += int(g["start_count"])
        b.errors += int(g["error_sum"])
        b.retries += int(g["retries_sum"])
        b.rate_limited += int(g["limited_sum"])


def _add_examples(stats: OutputStats, cols: _Columns, is_error: Arr) -> None:
    if not _count_true(is_error):
        return
    have = Counter(e.error_type for e in stats.examples)
    rows = pa.table({"id": cols.get("id"), "type": _fill(cols.get("error_type"), "unknown"),
                     "http": cols.get("http_status", pa.int64()),
                     "error": cols.get("error")}).filter(is_error)
    for kind in (str(k) for k in pc.unique(rows.column("type")).to_pylist()):
        need = EXAMPLES_PER_TYPE - have[kind]
        if need <= 0:
            continue
        picked = rows.filter(pc.equal(rows.column("type"), pa.scalar(kind))).slice(0, need)
        for r in picked.to_pylist():
            stats.examples.append(ErrorExample(id=str(r["id"]), error_type=kind,
                                               http_status=r["http"], message=r["error"] or ""))


def model_order(stats: Sequence[OutputStats]) -> list[str]:
    """Every model across ``stats``, most rows first."""
    rows: Counter[str] = Counter()
    for s in stats:
        for m in s.models.values():
            rows[m.model] += m.rows
    return [m for m, _ in rows.most_common()]


# --- typed shims over pyarrow.compute ------------------------------------------------------


def _a(value: object) -> Arr:
    """A compute result known to be an array (the stubs return unions)."""
    return cast(Arr, value)


def _eq(values: Arr, value: str | int) -> Arr:
    return _a(pc.equal(values, pa.scalar(value, values.type)))


def _and(left: Arr, right: Arr) -> Arr:
    return _a(pc.and_(left, right))


def _fill(values: Arr, value: str | int | bool) -> Arr:
    return _a(pc.fill_null(values, pa.scalar(value, values.type)))


def _quantiles(values: Arr | pa.ChunkedArray[Any], qs: list[float]) -> list[float]:
    found = cast(Any, pc.quantile)(values, q=qs).to_pylist()
    return [float(v) for v in found]


def _counts(values: Arr) -> dict[str, int]:
    counted = cast(Any, pc.value_counts(_a(pc.drop_null(values))))
    keys, counts = counted.field("values").to_pylist(), counted.field("counts").to_pylist()
    return {str(k): int(c) for k, c in zip(keys, counts, strict=True)}


def _count_true(mask: Arr) -> int:
    return _sum(_a(mask.cast(pa.int64())))


def _sum(values: Arr) -> int:
    return int(cast(Any, pc.sum(values)).as_py() or 0)
