"""``estimate --sample N``: send N random rows for real, then extrapolate output, cost and time.

The dry run (:func:`batcher.estimate.estimate`) can only bound output by ``max_tokens``; real
answers are usually far shorter. A sample measures them:

1. **Choose.** One pass over the input both counts every row (the ordinary dry run) and draws
   a uniform random sample of ``n`` rows with reservoir sampling (Li's Algorithm L: memory
   O(n), O(n·(1 + log(rows/n))) random draws), seeded, so the same command samples the same
   rows.
2. **Send.** The sampled rows go through the real provider adapters and :class:`Transport`
   with the job's key, base URL, timeout, rpm/tpm limits and ``min(n, concurrency)`` requests
   in flight. Retryable errors are retried (at most :data:`SAMPLE_MAX_ATTEMPTS` sends); an
   auth or quota error (:class:`JobFatal`) stops the sample and is raised as is (exit 3).
   Rows that fail otherwise are left out of the measurement; if every one fails, the first
   error is raised.
3. **Extrapolate.** For the ``k`` answered rows, per-row completion tokens ``c_i`` and output
   cost ``o_i`` (``c_i`` at the answering model's output rate). Over the input's ``R`` rows:
   expected output tokens ``R·mean(c)``, expected cost = the dry run's input cost +
   ``R·mean(o)``. The range is a two-sided :data:`CONFIDENCE` Student-t interval for that
   total: ``R·(mean ± t[k-1]·s/√k·√((R-k)/(R-1)))`` with ``s`` the sample standard deviation
   and the finite-population correction (a sample of every row gives an exact, zero-width
   range). Everything is clipped to what is possible: at least 0, at most the dry run's
   maximum (every row writing its ``max_tokens``). One answer gives no spread: the range is
   then the dry run's bounds. Expected wall time: the dry run's rules (rpm, tpm with
   ``max_tokens`` counted as providers do, Little's law) with the mean measured latency of an
   answered request.

Caveats, said in the report's notes: a small sample of a skewed length distribution (a few
answers hitting ``max_tokens``) makes the t interval optimistic; latency was measured at the
sample's low concurrency, which a loaded server may not keep; input cost is the dry run's
count (no caching assumed).
"""

from __future__ import annotations

import asyncio
import math
import random
import statistics
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Generic, TypeVar

from batcher.config import RunConfig
from batcher.engine import Prepared
from batcher.engines.live import LiveEngine
from batcher.errors import Aborted, ConfigError, InputError, JobFatal, ProviderError
from batcher.estimate import EstimateReport, estimate
from batcher.io.readers import iter_batches
from batcher.pricing import Price, cost_usd, price_for
from batcher.providers import provider_for_row
from batcher.results import Failed, Sent
from batcher.secrets import redactor
from batcher.tokens import request_input_tokens, request_max_output_tokens
from batcher.types import Answer, HttpRequest, RequestContext, RequestRow, ResultRow

T = TypeVar("T")

DEFAULT_SEED = 0
"""The reservoir's seed when none is given: the same input and ``n`` sample the same rows."""

SAMPLE_MAX_ATTEMPTS = 3
"""Sends per sampled row at most (fewer if the job's ``max_attempts`` is lower): a sample
should answer in seconds, not wait out a long backoff."""
SAMPLE_MAX_RATE_LIMIT_WAIT = 60.0
"""Seconds of 429s after which a sampled row is given up (a sample should not wait an hour)."""

CONFIDENCE = 0.90
"""The two-sided level of the reported ranges."""

_T95 = {1: 6.314, 2: 2.920, 3: 2.353, 4: 2.132, 5: 2.015, 6: 1.943, 7: 1.895, 8: 1.860,
        9: 1.833, 10: 1.812, 11: 1.796, 12: 1.782, 13: 1.771, 14: 1.761, 15: 1.753,
        16: 1.746, 17: 1.740, 18: 1.734, 19: 1.729, 20: 1.725, 21: 1.721, 22: 1.717,
        23: 1.714, 24: 1.711, 25: 1.708, 26: 1.706, 27: 1.703, 28: 1.701, 29: 1.699,
        30: 1.697, 40: 1.684, 60: 1.671, 120: 1.658}
_Z95 = 1.645


def t_quantile_95(df: int) -> float:
    """The 0.95 quantile of Student's t with ``df`` degrees of freedom (``df`` >= 1): the
    multiplier of a two-sided 90 % interval. Between tabulated ``df`` the next lower one is
    used (a slightly wider, conservative interval); above 120, the normal 1.645."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df > 120:
        return _Z95
    return _T95[max(k for k in _T95 if k <= df)]


# --- choosing rows ------------------------------------------------------------------------


class Reservoir(Generic[T]):
    """A uniform random sample of ``size`` items from a stream of unknown length, in one
    pass and O(``size``) memory (Li's Algorithm L: it draws how many items to skip rather
    than one number per item). Every item is kept with probability ``size / seen``.
    :meth:`items` returns the sample in stream order."""

    def __init__(self, size: int, rng: random.Random) -> None:
        if size < 1:
            raise ValueError(f"a reservoir holds at least 1 item, got {size}")
        self.size = size
        self.seen = 0
        self._rng = rng
        self._kept: list[tuple[int, T]] = []
        self._w = 1.0
        self._next: float = 0  # index of the next item to replace one in the reservoir

    def _uniform(self) -> float:
        # (0, 1): log() of it must be finite and negative.
        return self._rng.random() or 5e-324

    def _advance(self) -> None:
        self._w *= math.exp(math.log(self._uniform()) / self.size)
        if self._w >= 1.0:  # rounding with a huge reservoir: replacements become negligible
            self._next = math.inf
            return
        self._next += math.floor(math.log(self._uniform()) / math.log1p(-self._w)) + 1

    def add(self, item: T) -> None:
        index = self.seen
        self.seen += 1
        if index < self.size:
            self._kept.append((index, item))
            if index == self.size - 1:
                self._next = index
                self._advance()
        elif index == self._next:
            self._kept[self._rng.randrange(self.size)] = (index, item)
            self._advance()

    def items(self) -> list[T]:
        return [item for _, item in sorted(self._kept, key=lambda pair: pair[0])]


def read_and_sample(config: RunConfig, n: int,
                    seed: int = DEFAULT_SEED) -> tuple[EstimateReport, list[RequestRow]]:
    """The dry-run report of ``config``'s input and a uniform sample of ``min(n, rows)`` of
    its good rows, from one streaming pass. Sends nothing."""
    if n < 1:
        raise ConfigError(f"--sample: expected a number of rows >= 1, got {n}")
    options = config.reader_options()
    ctx = config.request_context(sending=False)
    reservoir: Reservoir[RequestRow] = Reservoir(n, random.Random(seed))
    bad = 0

    def rows() -> Iterator[RequestRow]:
        nonlocal bad
        for batch in iter_batches(config.input, options):
            bad += len(batch.problems)
            for row in batch.rows:
                reservoir.add(row)
                yield row

    report = estimate(rows(), ctx, config.endpoint, rpm=config.rpm, tpm=config.tpm,
                      concurrency=config.concurrency, price_input=config.price_input,
                      price_output=config.price_output, prices_table=config.prices)
    report.bad_rows = bad
    return report, reservoir.items()


# --- sending them -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Measured:
    """One answered sample row. Tokens as the server reported them (``completion_tokens``
    None: not reported); ``latency_s`` of the answered send; costs in USD (None: price
    unknown); ``output_cost_usd`` is the completion part alone."""

    id: str
    prompt_tokens: int | None
    completion_tokens: int | None
    latency_s: float
    cost_usd: float | None
    output_cost_usd: float | None


@dataclass
class SampleOutcome:
    """What a sample did: ``sent`` rows, the ``answers`` measured, the ``failures``
    (row id, error) of rows that got no answer."""

    sent: int
    answers: list[Measured] = field(default_factory=list)
    failures: list[tuple[str, BaseException]] = field(default_factory=list)


def _price(config: RunConfig, model: str | None) -> Price | None:
    return price_for(model, price_input=config.price_input, price_output=config.price_output,
                     table=config.prices)


def _measure(config: RunConfig, row: RequestRow, ctx: RequestContext, request: HttpRequest,
             answer: Answer, latency_s: float) -> Measured:
    usage = answer.usage
    # As the runner prices a row: the answering model, else the one asked for.
    price = _price(config, answer.model or request.model)
    if price is None and answer.model:
        price = _price(config, request.model)
    completion = usage.completion_tokens
    if completion is None and request_max_output_tokens(row, ctx, config.endpoint) == 0:
        completion = 0  # embeddings report no completion tokens: they write none
    output_cost: float | None = None
    if price is not None and completion is not None:
        prompt = usage.prompt_tokens if usage.prompt_tokens is not None else \
            request_input_tokens(row, ctx, config.endpoint)
        output_cost = completion * price.rates(prompt)[1] / 1_000_000
    return Measured(id=row.id, prompt_tokens=usage.prompt_tokens, completion_tokens=completion,
                    latency_s=latency_s, cost_usd=cost_usd(price, usage),
                    output_cost_usd=output_cost)


class _Counters:
    in_flight = 0
    retries = 0
    rate_limited = 0
    stage = ""


class _SampleJob:
    """The job a sample runs on the live engine: each row is one request, measured when it
    is answered; nothing is written, cached or budgeted (see :mod:`batcher.engine`)."""

    def __init__(self, config: RunConfig, ctx: RequestContext, redact: Callable[[str], str],
                 outcome: SampleOutcome, consumers: int) -> None:
        self.config = config
        self.stop = asyncio.Event()
        self.consumers = consumers
        self.progress = _Counters()
        self.fatal: list[JobFatal] = []
        self._ctx = ctx
        self._redact = redact
        self._outcome = outcome

    def prepare(self, rows: list[RequestRow]) -> Prepared | list[ResultRow] | None:
        config, ctx, [row] = self.config, self._ctx, rows
        self._outcome.sent += 1
        try:
            provider = provider_for_row(row, config.endpoint)
            request = provider.build_request(row, ctx)
        except InputError as exc:
            self._outcome.failures.append((row.id, exc))
            return []
        tokens = (request_input_tokens(row, ctx, config.endpoint)
                  + request_max_output_tokens(row, ctx, config.endpoint)
                  if config.tpm is not None else 0)
        return Prepared(rows, provider, request, tokens, 0.0, None)

    def finish(self, prepared: Prepared, outcome: Sent | Failed | None) -> None:
        row = prepared.rows[0]
        if isinstance(outcome, Sent):
            self._outcome.answers.append(_measure(
                self.config, row, self._ctx, prepared.request, outcome.answer,
                (outcome.latency_ms or 0.0) / 1000.0))
        elif isinstance(outcome, Failed):
            # Servers quote keys back in errors: masked as `run` masks them.
            error = outcome.error
            self._outcome.failures.append(
                (row.id, type(error)(self._redact(error.message), error.status)))

    def deliver(self, result: ResultRow) -> None:
        pass   # prepare hands back no result rows

    def abort(self, exc: Aborted | JobFatal) -> None:
        if isinstance(exc, JobFatal) and not self.fatal:
            self.fatal.append(type(exc)(self._redact(exc.message), exc.status))
        self.stop.set()

    def leave_pending(self, rows: int) -> None:
        """Never called: a sample is sent live, nothing is left with a provider."""

    def first_send(self) -> None:
        pass


async def send_sample(rows: Sequence[RequestRow], config: RunConfig) -> SampleOutcome:
    """Send ``rows`` for real, as the job would (see the module docstring): on the live
    engine, one request per row, at most ``SAMPLE_MAX_ATTEMPTS`` failed sends and
    ``SAMPLE_MAX_RATE_LIMIT_WAIT`` seconds of 429s each; measure the answers. Raises the
    first :class:`JobFatal` (auth, quota) after stopping."""
    ctx = config.request_context()
    outcome = SampleOutcome(sent=0)
    if not rows:
        return outcome
    workers = min(len(rows), config.concurrency)
    sample_config = replace(
        config, concurrency=workers, batch_size=1, cache=None,
        max_attempts=min(SAMPLE_MAX_ATTEMPTS, config.max_attempts),
        max_rate_limit_wait=min(SAMPLE_MAX_RATE_LIMIT_WAIT, config.max_rate_limit_wait))
    job = _SampleJob(sample_config, ctx, redactor(ctx.api_key, ctx.headers), outcome, workers)
    queue: asyncio.Queue[RequestRow | None] = asyncio.Queue()
    for row in rows:
        queue.put_nowait(row)
    for _ in range(workers):
        queue.put_nowait(None)
    await LiveEngine(sample_config).run(queue, job)
    if job.fatal:
        raise job.fatal[0]
    return outcome


# --- extrapolating ------------------------------------------------------------------------


def _interval(values: Sequence[float], population: int) -> tuple[float, float, float]:
    """(expected total, low, high) over ``population`` rows from a sample of per-row
    ``values`` (at least 2): the t interval of the module docstring."""
    k = len(values)
    mean = statistics.fmean(values)
    total = population * mean
    fpc = math.sqrt((population - k) / (population - 1)) if population > k else 0.0
    half = population * t_quantile_95(k - 1) * statistics.stdev(values) / math.sqrt(k) * fpc
    return total, total - half, total + half


def _clip(value: float, low: float, high: float) -> float:
    return min(max(value, low), high)


def _seconds(report: EstimateReport, config: RunConfig, latency_s: float) -> float:
    # The dry run's rules (batcher.estimate), with the measured latency.
    candidates = [report.rows * latency_s / config.concurrency]
    if config.rpm:
        candidates.append(report.rows / config.rpm * 60.0)
    if config.tpm:
        candidates.append((report.input_tokens + report.output_tokens_max) / config.tpm * 60.0)
    return max(candidates)


def apply_sample(report: EstimateReport, outcome: SampleOutcome, config: RunConfig) -> None:
    """Fill ``report``'s measured fields from ``outcome`` (see the module docstring).
    Raises the first failure when no sampled row was answered."""
    report.sample_size = outcome.sent
    report.sample_ok = len(outcome.answers)
    report.sample_confidence = CONFIDENCE
    if outcome.sent and not outcome.answers:
        row_id, error = outcome.failures[0]
        if isinstance(error, ProviderError):
            raise type(error)(f"no sampled request was answered ({len(outcome.failures)} "
                              f"failed); row {row_id}: {error.message}", error.status)
        raise error
    answers = outcome.answers
    costs = [a.cost_usd for a in answers]
    report.sample_cost_usd = None if any(c is None for c in costs) else \
        math.fsum(c or 0.0 for c in costs)
    latencies = [a.latency_s for a in answers]
    if latencies:
        report.measured_latency_s_mean = statistics.fmean(latencies)
        report.seconds_expected = _seconds(report, config, report.measured_latency_s_mean)
    prompts = [a.prompt_tokens for a in answers if a.prompt_tokens is not None]
    if prompts:
        report.measured_prompt_tokens_mean = statistics.fmean(prompts)
    if outcome.failures:
        row_id, error = outcome.failures[0]
        report.notes.append(f"{len(outcome.failures)} of {outcome.sent} sampled requests got "
                            f"no answer and are not measured (first: row {row_id}: {error})")
    tokens = [float(a.completion_tokens) for a in answers if a.completion_tokens is not None]
    if not tokens:
        if answers:
            report.notes.append("the server reported no completion tokens: output length "
                                "could not be measured")
        return
    report.measured_output_tokens_mean = statistics.fmean(tokens)
    report.measured_output_tokens_stdev = statistics.stdev(tokens) if len(tokens) > 1 else None
    rows, out_max = report.rows, float(report.output_tokens_max)
    if len(tokens) > 1:
        expected, low, high = _interval(tokens, rows)
    else:
        expected, low, high = rows * tokens[0], 0.0, out_max
    report.output_tokens_expected = round(_clip(expected, 0.0, out_max))
    report.output_tokens_expected_low = round(_clip(low, 0.0, out_max))
    report.output_tokens_expected_high = round(_clip(high, 0.0, out_max))

    out_costs = [a.output_cost_usd for a in answers if a.completion_tokens is not None]
    if report.cost_usd_input is not None and report.cost_usd_max is not None \
            and all(c is not None for c in out_costs):
        costs_out = [c or 0.0 for c in out_costs]
        most = report.cost_usd_max - report.cost_usd_input
        if len(costs_out) > 1:
            c_expected, c_low, c_high = _interval(costs_out, rows)
        else:
            c_expected, c_low, c_high = rows * costs_out[0], 0.0, most
        base = report.cost_usd_input
        report.cost_usd_expected = base + _clip(c_expected, 0.0, most)
        report.cost_usd_expected_low = base + _clip(c_low, 0.0, most)
        report.cost_usd_expected_high = base + _clip(c_high, 0.0, most)
    method = (f"ranges are {CONFIDENCE:.0%} Student-t intervals (optimistic when a few "
              "answers are much longer than the rest)" if len(tokens) > 1 else
              "one answer gives no spread, so the ranges are the dry run's bounds")
    report.notes.append(
        f"expected figures are measured on {len(tokens)} answered sample row(s) and "
        f"extrapolated to {rows:,} rows; {method}; the time uses the latency measured at "
        f"{min(outcome.sent, config.concurrency)} in flight")


async def estimate_with_sample(config: RunConfig, n: int,
                               seed: int = DEFAULT_SEED) -> EstimateReport:
    """``batcher estimate --sample n``: the dry-run report plus the figures measured on ``n``
    randomly chosen rows sent for real (this costs what those requests cost). The input is
    read synchronously, in one pass, before anything is sent."""
    report, rows = read_and_sample(config, n, seed)
    outcome = await send_sample(rows, config)
    apply_sample(report, outcome, config)
    return report
