"""The dry run: rows, tokens, cost and duration of a job, computed before any request is sent."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from batcher.io.idindex import RowPlan
from batcher.io.rows import InputProblem, ReaderOptions
from batcher.io.scan import JsonlScan, ScanChunk
from batcher.pricing import (
    Price,
    batch_price,
    context_window,
    input_cost_usd,
    max_cost_usd,
    price_for,
)
from batcher.tokens import (
    APPROX_FACTOR,
    DEFAULT_MAX_OUTPUT_TOKENS,
    batch_input_tokens,
    prompt_counter,
    request_max_output_tokens,
    row_model,
    tokenizer_name,
)
from batcher.types import JSON, RequestContext, RequestRow

DEFAULT_LATENCY_S = 2.0
"""Seconds one request is assumed to take (a short chat answer) when no figure is given."""

CHUNK_ROWS = 8192
"""Rows counted per tokenizer call: big enough to amortise the call, small enough to keep
memory flat on any input size."""

NO_MODEL = "(no model)"


@dataclass
class ModelEstimate:
    """Totals for the rows of one model. Costs are USD (None: price unknown);
    ``tokenizer`` is ``"o200k_base"``, ``"cl100k_base"`` or ``"approx"``."""

    model: str | None
    rows: int
    input_tokens: int
    output_tokens_max: int
    cost_usd_input: float | None
    cost_usd_max: float | None
    price: Price | None
    tokenizer: str

    def to_json(self) -> dict[str, JSON]:
        price: dict[str, JSON] | None = None
        if self.price is not None:
            price = {
                "input_per_m": self.price.input_per_m,
                "output_per_m": self.price.output_per_m,
                "cached_input_per_m": self.price.cached_input_per_m,
                "source": self.price.source,
                "matched": self.price.matched,
            }
        return {
            "model": self.model,
            "rows": self.rows,
            "input_tokens": self.input_tokens,
            "output_tokens_max": self.output_tokens_max,
            "cost_usd_input": self.cost_usd_input,
            "cost_usd_max": self.cost_usd_max,
            "price": price,
            "price_known": self.price is not None,
            "tokenizer": self.tokenizer,
        }


@dataclass
class EstimateReport:
    """What a job will take. Token counts are per request as sent (system prompt and chat
    overhead included). ``cost_usd_input`` prices the prompts (no caching assumed);
    ``cost_usd_max`` adds every request's maximum output. Totals are None when any row's
    model has no known price (the per-model breakdown still has the known part).
    ``seconds_estimate`` is the expected wall time; ``bound_by`` names the limit that sets it.

    The ``sample_*``, ``measured_*`` and ``*_expected*`` fields are None unless the report was
    measured with ``--sample`` (:mod:`batcher.sample`): ``sample_size`` requests were sent,
    ``sample_ok`` answered; ``measured_*`` are per answer (tokens as the server reported them,
    latency in seconds); ``output_tokens_expected`` / ``cost_usd_expected`` extrapolate the
    answers to every row, with a ``sample_confidence`` (e.g. 0.9) interval ``_low``..``_high``;
    ``sample_cost_usd`` is what the sample itself cost; ``seconds_expected`` the wall time at
    the measured latency.
    """

    rows: int
    bad_rows: int
    input_tokens: int
    output_tokens_max: int
    cost_usd_input: float | None
    cost_usd_max: float | None
    seconds_estimate: float | None
    by_model: list[ModelEstimate]
    unknown_price_models: list[str]
    notes: list[str]
    bound_by: str | None = None
    default_max_output_tokens: int = DEFAULT_MAX_OUTPUT_TOKENS
    rows_with_default_max_tokens: int = 0
    sample_size: int | None = None
    sample_ok: int | None = None
    sample_confidence: float | None = None
    measured_output_tokens_mean: float | None = None
    measured_output_tokens_stdev: float | None = None
    measured_prompt_tokens_mean: float | None = None
    measured_latency_s_mean: float | None = None
    output_tokens_expected: int | None = None
    output_tokens_expected_low: int | None = None
    output_tokens_expected_high: int | None = None
    cost_usd_expected: float | None = None
    cost_usd_expected_low: float | None = None
    cost_usd_expected_high: float | None = None
    sample_cost_usd: float | None = None
    seconds_expected: float | None = None
    cache_hits: int | None = None
    """With ``--cache``: rows whose exact request the cache already answers. They are not
    in ``rows``, tokens or cost (a hit is not sent and costs nothing). None: no cache."""

    def to_json(self) -> dict[str, JSON]:
        """One JSON object: the totals, ``by_model``, ``unknown_price_models`` and ``notes``."""
        return {
            "rows": self.rows,
            "bad_rows": self.bad_rows,
            "input_tokens": self.input_tokens,
            "output_tokens_max": self.output_tokens_max,
            "cost_usd_input": self.cost_usd_input,
            "cost_usd_max": self.cost_usd_max,
            "seconds_estimate": self.seconds_estimate,
            "bound_by": self.bound_by,
            "default_max_output_tokens": self.default_max_output_tokens,
            "rows_with_default_max_tokens": self.rows_with_default_max_tokens,
            "cache_hits": self.cache_hits,
            **{name: getattr(self, name) for name in SAMPLE_FIELDS},
            "by_model": [m.to_json() for m in self.by_model],
            "unknown_price_models": list(self.unknown_price_models),
            "notes": list(self.notes),
        }

    def render(self) -> str:
        """A short plain-text table for a terminal."""
        lines = [f"rows: {self.rows:,}" + (f"  ({self.bad_rows:,} bad rows skipped)"
                                           if self.bad_rows else "")]
        if self.cache_hits is not None:
            lines.append(f"served from the cache: {self.cache_hits:,} more row(s), not sent "
                         "and not priced")
        header = ("model", "rows", "input tok", "max output tok", "$ input", "$ max",
                  "tokenizer")
        table = [header]
        for m in self.by_model:
            table.append((
                m.model or NO_MODEL, f"{m.rows:,}", f"{m.input_tokens:,}",
                f"{m.output_tokens_max:,}", _money(m.cost_usd_input), _money(m.cost_usd_max),
                m.tokenizer,
            ))
        if len(self.by_model) != 1:
            table.append(("total", f"{self.rows:,}", f"{self.input_tokens:,}",
                          f"{self.output_tokens_max:,}", _money(self.cost_usd_input),
                          _money(self.cost_usd_max), ""))
        widths = [max(len(r[i]) for r in table) for i in range(len(header))]
        for r in table:
            cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:-1], widths[1:-1],
                                                                          strict=True)]
            lines.append("  ".join([*cells, r[-1]]).rstrip())
        if self.seconds_estimate is not None:
            bound = f"  (set by {self.bound_by})" if self.bound_by else ""
            lines.append(f"time: ~{_duration(self.seconds_estimate)}{bound}")
        lines.extend(self._render_sample())
        if self.unknown_price_models:
            lines.append("price unknown: " + ", ".join(self.unknown_price_models)
                         + " (give --price-input/--price-output or a [prices] table)")
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


    def _render_sample(self) -> list[str]:
        """The measured lines of a ``--sample`` report (none without a sample)."""
        if self.sample_size is None:
            return []
        paid = f"; the sample cost {_money(self.sample_cost_usd)}" \
            if self.sample_cost_usd is not None else ""
        lines = [f"measured on {self.sample_size:,} sampled row"
                 f"{'' if self.sample_size == 1 else 's'} "
                 f"({self.sample_ok or 0:,} answered{paid}):"]
        level = f"{(self.sample_confidence or 0) * 100:.0f}% range"
        if self.measured_output_tokens_mean is not None and self.output_tokens_expected is not None:
            lines.append(
                f"  output tokens: {self.measured_output_tokens_mean:,.1f} per answer -> "
                f"expected {self.output_tokens_expected:,} ({level} "
                f"{self.output_tokens_expected_low or 0:,}-{self.output_tokens_expected_high or 0:,};"
                f" at most {self.output_tokens_max:,})")
        if self.cost_usd_expected is not None:
            lines.append(f"  cost: expected {_money4(self.cost_usd_expected)} ({level} "
                         f"{_money4(self.cost_usd_expected_low)}-"
                         f"{_money4(self.cost_usd_expected_high)})")
        elif self.sample_ok:
            lines.append("  cost: expected cost unknown (a price is unknown)")
        if self.seconds_expected is not None and self.measured_latency_s_mean is not None:
            lines.append(f"  time: ~{_duration(self.seconds_expected)} at the measured "
                         f"{self.measured_latency_s_mean:.2f}s per request")
        return lines


SAMPLE_FIELDS = (
    "sample_size", "sample_ok", "sample_confidence", "measured_output_tokens_mean",
    "measured_output_tokens_stdev", "measured_prompt_tokens_mean", "measured_latency_s_mean",
    "output_tokens_expected", "output_tokens_expected_low", "output_tokens_expected_high",
    "cost_usd_expected", "cost_usd_expected_low", "cost_usd_expected_high", "sample_cost_usd",
    "seconds_expected",
)
"""The EstimateReport fields a ``--sample`` measures; in ``to_json`` always (None without one)."""


def _money(value: float | None) -> str:
    if value is None:
        return "price unknown"
    if value == 0:
        return "$0"
    if value < 0.01:
        return f"${value:.6f}"
    return f"${value:,.2f}"


def _money4(value: float | None) -> str:
    # Four significant digits below $100: a measured range such as $0.0123-$0.0141 must not
    # print as "$0.01-$0.01".
    if value is None or value <= 0 or value >= 100:
        return _money(value)
    decimals = max(2, 3 - math.floor(math.log10(value)))
    return f"${value:.{decimals}f}"


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f}s"
    minutes = seconds / 60
    if minutes < 60:
        return f"{minutes:.1f} min"
    hours, rest = divmod(round(seconds), 3600)
    return f"{hours}h {rest // 60:02d}m"


@dataclass
class _Acc:
    rows: int = 0
    input_tokens: int = 0
    output_max: int = 0
    cost_input: float = 0.0
    cost_max: float = 0.0


_Known = tuple[int, bool, "int | None"]
"""What a request asks for besides its prompt: (output bound, whether that bound is the
assumed default, its model's context window)."""


class _Tally:
    """The running totals of an estimate, row by row in input order (the first row over a
    context window is reported, and tiered prices are summed in that order)."""

    def __init__(self, ctx: RequestContext, endpoint: str, *, price_input: float | None,
                 price_output: float | None,
                 prices_table: Mapping[str, Mapping[str, float]] | None, batch: bool) -> None:
        self.ctx, self.endpoint, self.batch = ctx, endpoint, batch
        self.price_input, self.price_output, self.prices_table = (
            price_input, price_output, prices_table)
        self.accs: dict[str | None, _Acc] = {}
        self.prices: dict[str | None, Price | None] = {}
        self.over: dict[str | None, tuple[int, str, int]] = {}  # model: (rows, first, window)
        self.default_max = 0
        # A row with no params or body of its own asks for what the job does: its output
        # bound, whether that is the assumed default, and its model's window are worked out
        # once.
        self.plain: dict[tuple[str | None, str | None], _Known] = {}
        self.plain_row = RequestRow(id="", shape="prompt", source="", line=0, prompt="")
        """Stands for every row that is only a prompt (see :meth:`add_prompts`)."""

    def _model(self, model: str | None) -> tuple[_Acc, Price | None]:
        acc = self.accs.get(model)
        if acc is None:
            acc = self.accs[model] = _Acc()
            price = price_for(model, price_input=self.price_input,
                              price_output=self.price_output, table=self.prices_table)
            self.prices[model] = batch_price(price) if self.batch else price
        return acc, self.prices[model]

    def _known(self, row: RequestRow, model: str | None) -> _Known:
        plain = not row.params and row.body is None
        known = self.plain.get((row.model, row.url)) if plain else None
        if known is None:
            n_out = request_max_output_tokens(row, self.ctx, self.endpoint)
            known = (n_out, n_out == DEFAULT_MAX_OUTPUT_TOKENS and not _has_limit(row, self.ctx),
                     context_window(model))
            if plain:
                self.plain[(row.model, row.url)] = known
        return known

    def add_row(self, row: RequestRow, n_in: int, line: int | None = None) -> None:
        """One row's request of ``n_in`` input tokens (``line``: where it is, when ``row``
        stands for it)."""
        model = row_model(row, self.ctx)
        acc, price = self._model(model)
        n_out, assumed, window = self._known(row, model)
        if window is not None and n_in > window:
            n, where, _ = self.over.get(
                model, (0, f"{row.source}:{row.line if line is None else line}", window))
            self.over[model] = (n + 1, where, window)
        if assumed:
            self.default_max += 1
        acc.rows += 1
        acc.input_tokens += n_in
        acc.output_max += n_out
        if price is not None and price.tiers:
            # Long-context rates depend on each request's prompt; flat rates are priced
            # once from the totals in report().
            acc.cost_input += input_cost_usd(price, n_in) or 0.0
            acc.cost_max += max_cost_usd(price, n_in, n_out) or 0.0

    def add_rows(self, rows: Sequence[RequestRow], counts: Sequence[int]) -> None:
        for row, n_in in zip(rows, counts, strict=True):
            self.add_row(row, n_in)

    def add_prompts(self, source: str, lines: Sequence[int], counts: Sequence[int]) -> None:
        """Rows that are only a prompt (nothing of their own but an id), at ``lines`` of
        ``source``, with their input tokens: the same as :meth:`add_row` on each, in order,
        with the per-row work done for them all at once."""
        if not counts:
            return
        row = self.plain_row
        model = row_model(row, self.ctx)
        acc, price = self._model(model)
        n_out, assumed, window = self._known(row, model)
        n = len(counts)
        if (window is not None and max(counts) > window) or (price is not None and price.tiers):
            row = replace(row, source=source)
            for n_in, line in zip(counts, lines, strict=True):
                self.add_row(row, n_in, line)
            return
        if assumed:
            self.default_max += n
        acc.rows += n
        acc.input_tokens += sum(counts)
        acc.output_max += n_out * n

    def add_chunk(self, chunk: ScanChunk, prompt_counts: Sequence[int],
                  row_counts: Sequence[int]) -> None:
        """A chunk of a scan (:mod:`batcher.io.scan`), its rows in input order."""
        if not chunk.rows:
            self.add_prompts(chunk.source, chunk.lines, prompt_counts)
            return
        row = replace(self.plain_row, source=chunk.source)
        p = 0
        for r, (at, other) in enumerate(zip(chunk.row_at, chunk.rows, strict=True)):
            while p + r < at:
                self.add_row(row, prompt_counts[p], chunk.lines[p])
                p += 1
            self.add_row(other, row_counts[r])
        for n_in, line in zip(prompt_counts[p:], chunk.lines[p:], strict=True):
            self.add_row(row, n_in, line)

    def report(self, *, rpm: float | None, tpm: float | None, concurrency: int,
               latency_s: float, bad_rows: int) -> EstimateReport:
        """The report of the rows added so far (see :func:`estimate` for the fields)."""
        by_model: list[ModelEstimate] = []
        unknown: list[str] = []
        for model, acc in sorted(self.accs.items(), key=lambda kv: (-kv[1].rows, kv[0] or "")):
            price = self.prices[model]
            cost_in: float | None = None
            cost_max: float | None = None
            if price is not None:
                if price.tiers:
                    cost_in, cost_max = acc.cost_input, acc.cost_max
                else:
                    cost_in = acc.input_tokens * price.input_per_m / 1_000_000
                    cost_max = cost_in + acc.output_max * price.output_per_m / 1_000_000
            else:
                unknown.append(model or NO_MODEL)
            by_model.append(ModelEstimate(
                model=model, rows=acc.rows, input_tokens=acc.input_tokens,
                output_tokens_max=acc.output_max, cost_usd_input=cost_in,
                cost_usd_max=cost_max, price=price, tokenizer=tokenizer_name(model)))

        n_rows = sum(m.rows for m in by_model)
        n_in = sum(m.input_tokens for m in by_model)
        n_out = sum(m.output_tokens_max for m in by_model)
        total_in = None if unknown else math.fsum(m.cost_usd_input or 0.0 for m in by_model)
        total_max = None if unknown else math.fsum(m.cost_usd_max or 0.0 for m in by_model)
        seconds, bound_by = _seconds(n_rows, n_in + n_out, rpm=rpm, tpm=tpm,
                                     concurrency=concurrency, latency_s=latency_s)
        notes = _notes(by_model, unknown, self.default_max, self.endpoint, rpm=rpm, tpm=tpm,
                       concurrency=concurrency, latency_s=latency_s)
        if self.batch:
            notes.insert(0, "batch mode: priced at the Batch API rate (50% of live); the time "
                            "is the provider's, up to 24 h per batch, not the time estimated "
                            "here")
        notes[:0] = [f"{n:,} row(s) exceed {model}'s context window of {window:,} tokens "
                     f"(first at {where}): the server will most likely refuse or cut them"
                     for model, (n, where, window) in self.over.items()]
        return EstimateReport(
            rows=n_rows, bad_rows=bad_rows, input_tokens=n_in, output_tokens_max=n_out,
            cost_usd_input=total_in, cost_usd_max=total_max, seconds_estimate=seconds,
            by_model=by_model, unknown_price_models=unknown, notes=notes, bound_by=bound_by,
            rows_with_default_max_tokens=self.default_max)


def estimate(
    rows: Iterable[RequestRow],
    ctx: RequestContext,
    endpoint: str,
    *,
    bad_rows: int = 0,
    rpm: float | None,
    tpm: float | None,
    concurrency: int,
    latency_s: float = DEFAULT_LATENCY_S,
    price_input: float | None = None,
    price_output: float | None = None,
    prices_table: Mapping[str, Mapping[str, float]] | None = None,
    batch: bool = False,
) -> EstimateReport:
    """Count and price every row's request without sending any. Streams ``rows`` in chunks
    (memory stays flat). ``rpm``/``tpm`` are the job's limits (None: unlimited),
    ``concurrency`` its number of requests in flight, ``latency_s`` one request's duration.

    ``seconds_estimate`` is the largest of: rows / rpm; (input + maximum output tokens) / tpm
    (providers such as OpenAI charge ``max_tokens`` against TPM when a request is admitted);
    rows × latency / concurrency (Little's law). ``batch``: priced at the Batch API rate
    (:func:`batcher.pricing.batch_price`; the time is then the provider's, within 24 h).
    """
    tally = _Tally(ctx, endpoint, price_input=price_input, price_output=price_output,
                   prices_table=prices_table, batch=batch)
    # Two cores: the tokenizer (Rust, which releases the GIL) counts one chunk on a worker
    # thread while this thread reads and parses the next; at most two chunks are held.
    iterator = iter(rows)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="batcher-tokens") as pool:
        pending: tuple[list[RequestRow], Future[list[int]]] | None = None
        while chunk := list(itertools.islice(iterator, CHUNK_ROWS)):
            future = pool.submit(batch_input_tokens, chunk, ctx, endpoint)
            if pending is not None:
                tally.add_rows(pending[0], pending[1].result())
            pending = (chunk, future)
        if pending is not None:
            tally.add_rows(pending[0], pending[1].result())
    return tally.report(rpm=rpm, tpm=tpm, concurrency=concurrency, latency_s=latency_s,
                        bad_rows=bad_rows)


def estimate_jsonl(
    path: Path | str,
    options: ReaderOptions,
    ctx: RequestContext,
    endpoint: str,
    *,
    rpm: float | None,
    tpm: float | None,
    concurrency: int,
    latency_s: float = DEFAULT_LATENCY_S,
    price_input: float | None = None,
    price_output: float | None = None,
    prices_table: Mapping[str, Mapping[str, float]] | None = None,
    batch: bool = False,
    problems_kept: int = 0,
) -> tuple[EstimateReport, list[InputProblem]]:
    """:func:`estimate` of a JSONL input's rows as :func:`batcher.io.readers.iter_batches`
    reads them (bad rows and duplicates skipped and counted in ``bad_rows``), in one pass
    that builds no request for rows that are only a prompt (:mod:`batcher.io.scan`): the
    same report, faster. Also returns the first ``problems_kept`` bad rows, in input order.

    The input's ids are gathered during that pass and checked at its end; if some are
    duplicates, the pass is made again knowing them (the totals must not count them).
    Raises what :func:`~batcher.io.readers.iter_batches` raises.
    """
    counter = prompt_counter(ctx, endpoint)

    def count(chunk: ScanChunk) -> tuple[list[int], list[int]]:
        prompts = counter(chunk.prompts) if counter is not None and chunk.prompts else []
        return prompts, batch_input_tokens(chunk.rows, ctx, endpoint)

    def tally_of(scan: JsonlScan) -> tuple[_Tally, RowPlan | None]:
        tally = _Tally(ctx, endpoint, price_input=price_input, price_output=price_output,
                       prices_table=prices_table, batch=batch)
        # As in estimate(): one chunk is counted on a worker thread (the tokenizer releases
        # the GIL and uses every core) while this thread parses the next.
        pending: list[tuple[ScanChunk, Future[tuple[list[int], list[int]]]]] = []
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="batcher-tokens") as pool:
            if counter is not None:
                pool.submit(counter, [])  # loads the vocabulary (GIL released) meanwhile

            def consume(chunk: ScanChunk) -> None:
                pending.append((chunk, pool.submit(count, chunk)))
                if len(pending) > 1:
                    done, future = pending.pop(0)
                    tally.add_chunk(done, *future.result())

            plan = scan.run(consume)
            for done, future in pending:
                tally.add_chunk(done, *future.result())
        return tally, plan

    scan = JsonlScan(path, options, prompts=counter is not None, problems_kept=problems_kept)
    tally, plan = tally_of(scan)
    if plan is not None and plan.duplicates:
        scan = JsonlScan(path, options, prompts=counter is not None, plan=plan,
                         problems_kept=problems_kept)
        tally, _ = tally_of(scan)
    report = tally.report(rpm=rpm, tpm=tpm, concurrency=concurrency, latency_s=latency_s,
                          bad_rows=scan.bad)
    return report, scan.problems


def _has_limit(row: RequestRow, ctx: RequestContext) -> bool:
    # request_max_output_tokens returns the default both when no limit is set and when the
    # limit equals it; this tells the two apart for the note about assumed output.
    keys = ("max_completion_tokens", "max_tokens", "max_output_tokens", "generationConfig")
    if row.body is not None:
        return any(row.body.get(k) is not None for k in keys)
    params = {**ctx.params, **row.params} if row.params else ctx.params
    return any(params.get(k) is not None for k in keys)


def _seconds(rows: int, tokens: int, *, rpm: float | None, tpm: float | None,
             concurrency: int, latency_s: float) -> tuple[float | None, str | None]:
    if rows == 0:
        return 0.0, None
    candidates: list[tuple[float, str]] = []
    if rpm:
        candidates.append((rows / rpm * 60.0, f"--rpm {rpm:g}"))
    if tpm:
        candidates.append((tokens / tpm * 60.0, f"--tpm {tpm:g}"))
    if concurrency > 0 and latency_s > 0:
        candidates.append((rows * latency_s / concurrency,
                           f"--concurrency {concurrency} at {latency_s:g}s per request"))
    if not candidates:
        return None, None
    seconds, bound_by = max(candidates)
    return seconds, bound_by


def _notes(by_model: list[ModelEstimate], unknown: list[str], default_max: int, endpoint: str,
           *, rpm: float | None, tpm: float | None, concurrency: int,
           latency_s: float) -> list[str]:
    notes: list[str] = []
    if default_max:
        notes.append(f"{default_max:,} row(s) set no max_tokens: assumed "
                     f"{DEFAULT_MAX_OUTPUT_TOKENS:,} output tokens each (a model may write more; "
                     "set -p max_tokens=N to bound cost and make --max-cost exact)")
    if endpoint != "embeddings":
        notes.append("cost_usd_max assumes every request writes its maximum output; "
                     "real output is usually far shorter")
    notes.append("input cost assumes no prompt caching (cached tokens are billed lower)")
    approx = [m.model or NO_MODEL for m in by_model if m.tokenizer == "approx"]
    if approx:
        notes.append(f"token counts for {', '.join(approx)} are approximate "
                     f"(o200k_base × {APPROX_FACTOR}; typically within ±20% for Latin-script "
                     "text and code, looser for other scripts)")
    if unknown:
        known = math.fsum(m.cost_usd_max or 0.0 for m in by_model)
        notes.append(f"totals omit cost: price unknown for {', '.join(unknown)}"
                     f" (known models' maximum: {_money(known)})")
    parts = []
    if rpm:
        parts.append(f"requests at {rpm:g}/min")
    if tpm:
        parts.append(f"input + maximum output tokens at {tpm:g}/min (as providers count "
                     "max_tokens against TPM)")
    parts.append(f"{concurrency} in flight at ~{latency_s:g}s each")
    notes.append("time = the slowest of: " + "; ".join(parts)
                 + "; retries and 429 back-off not included")
    return notes
