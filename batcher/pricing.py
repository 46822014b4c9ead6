"""Prices per model (bundled genai-prices data or user overrides), request costs, and the budget cap.

Prices come from the ``genai-prices`` package's bundled snapshot, read in-process: batcher
never starts its ``UpdatePrices`` background fetcher, and ``calc_price``/the snapshot lookup
read only the data shipped in the wheel, so nothing is fetched at run time. The snapshot is as
fresh as the installed package; users override with ``--price-input/--price-output`` or a
job file's ``[prices]`` table. All prices are USD per 1 M tokens; all costs are USD.

Known simplifications (each errs towards the higher price, never towards $0):
- time-of-day prices (DeepSeek's off-peak discount) are taken at their highest rate;
- cache *writes* (Anthropic) are priced as ordinary input: batcher's usage does not report them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from functools import lru_cache
from typing import TYPE_CHECKING

from batcher.types import Usage

if TYPE_CHECKING:
    from genai_prices.types import ModelInfo, ModelPrice

GENAI_PRICES = "genai-prices"
OVERRIDE = "override"


@dataclass(frozen=True, slots=True)
class PriceTier:
    """Rates that apply to a whole request once its prompt exceeds ``above`` tokens
    (providers' "long context" prices, e.g. Gemini above 128 k, Claude above 200 k)."""

    above: int
    input_per_m: float
    output_per_m: float
    cached_input_per_m: float | None


@dataclass(frozen=True, slots=True)
class Price:
    """A model's rates in USD per 1 M tokens.

    ``cached_input_per_m`` None means cached prompt tokens cost the full input rate.
    ``source`` is ``"genai-prices"`` or ``"override"``; ``matched`` names the priced model
    (``"openai:gpt-4o-mini"``) so a user can see what a model name was matched to.
    ``tiers`` (ascending) replace the base rates for prompts longer than their threshold.
    """

    input_per_m: float
    output_per_m: float
    cached_input_per_m: float | None
    source: str
    matched: str | None = None
    tiers: tuple[PriceTier, ...] = field(default=())

    def rates(self, prompt_tokens: int) -> tuple[float, float, float | None]:
        """(input, output, cached input) per 1 M tokens for a request of ``prompt_tokens``."""
        for tier in reversed(self.tiers):
            if prompt_tokens > tier.above:
                return tier.input_per_m, tier.output_per_m, tier.cached_input_per_m
        return self.input_per_m, self.output_per_m, self.cached_input_per_m


# --- looking prices up --------------------------------------------------------------------


def _base_and_tiers(value: object) -> tuple[float | None, dict[int, float]]:
    """A genai-prices price value (Decimal, TieredPrices or None) as (base, {start: rate})."""
    if value is None:
        return None, {}
    if isinstance(value, Decimal | int | float):
        return float(value), {}
    base = getattr(value, "base", None)
    tiers = getattr(value, "tiers", None) or []
    return (float(base) if base is not None else None,
            {int(t.start): float(t.price) for t in tiers})


def _rate_at(base: float | None, tiers: dict[int, float], prompt: int) -> float | None:
    rate = base
    for start in sorted(tiers):
        if prompt > start:
            rate = tiers[start]
    return rate


def _price_from_model_price(model_price: ModelPrice, matched: str) -> Price | None:
    inp, inp_tiers = _base_and_tiers(getattr(model_price, "input_mtok", None))
    out, out_tiers = _base_and_tiers(getattr(model_price, "output_mtok", None))
    cached, cached_tiers = _base_and_tiers(getattr(model_price, "cache_read_mtok", None))
    if inp is None and out is None:
        return None  # priced per request/image/second only: not a token price we can use
    starts = sorted(set(inp_tiers) | set(out_tiers) | set(cached_tiers))
    tiers = tuple(
        PriceTier(
            above=s,
            input_per_m=_rate_at(inp, inp_tiers, s + 1) or 0.0,
            output_per_m=_rate_at(out, out_tiers, s + 1) or 0.0,
            cached_input_per_m=_rate_at(cached, cached_tiers, s + 1),
        )
        for s in starts
    )
    return Price(input_per_m=inp or 0.0, output_per_m=out or 0.0, cached_input_per_m=cached,
                 source=GENAI_PRICES, matched=matched, tiers=tiers)


def _price_weight(price: Price) -> float:
    return price.input_per_m + price.output_per_m


_table_loaded = False


def table_loaded() -> bool:
    """Whether the bundled genai-prices table is loaded: a look-up no longer costs ~0.3 s."""
    return _table_loaded


def load_table() -> None:
    """Load the bundled genai-prices table (~0.3 s; safe from any thread)."""
    _find("")


def _find(model_ref: str) -> tuple[str, ModelInfo] | None:
    """(matched name, model info) for a model name in the bundled snapshot, or None."""
    # Imported here: loading genai-prices takes ~0.3 s, which commands that price nothing
    # should not pay.
    from genai_prices import data_snapshot

    global _table_loaded
    snapshot = data_snapshot.get_snapshot()
    _table_loaded = True
    if not model_ref:
        return None
    candidates = [model_ref]
    if "/" in model_ref:  # gateway names: "openai/gpt-4o-mini"
        candidates.append(model_ref.rsplit("/", 1)[-1])
    for ref in candidates:
        try:
            provider, model = snapshot.find_provider_model(ref, None, None, None)
        except (LookupError, ValueError):
            continue
        return f"{provider.id}:{model.id}", model
    return None


@lru_cache(maxsize=1024)
def genai_price(model: str) -> Price | None:
    """The bundled genai-prices rates for ``model``, or None when it is not listed there."""
    found = _find(model)
    if found is None:
        return None
    matched, info = found
    now = datetime.now(UTC)
    get_prices = info.get_prices
    best = _price_from_model_price(get_prices(now), matched)
    if isinstance(info.prices, list):
        # Conditional prices may change with the time of day: a job runs for hours, so
        # take the highest rate of the day rather than whatever applies this minute.
        midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
        for half_hours in range(48):
            candidate = _price_from_model_price(
                get_prices(midnight + timedelta(minutes=30 * half_hours) + timedelta(minutes=1)),
                matched)
            if candidate is not None and (best is None
                                          or _price_weight(candidate) > _price_weight(best)):
                best = candidate
    return best


@lru_cache(maxsize=1024)
def context_window(model: str | None) -> int | None:
    """The model's context window in tokens from the bundled genai-prices data, or None
    when the model or its window is not listed there."""
    found = _find(model) if model else None
    if found is None:
        return None
    window = found[1].context_window
    return window if window and window > 0 else None


def price_for(
    model: str | None,
    *,
    price_input: float | None = None,
    price_output: float | None = None,
    table: Mapping[str, Mapping[str, float]] | None = None,
) -> Price | None:
    """The rates for ``model``; None when unknown (the caller reports "price unknown").

    Precedence, per rate: ``price_input``/``price_output`` (the CLI flags, for every model),
    then the job file's ``[prices]`` table entry for the model (keys ``input``, ``output``,
    ``cached_input``), then genai-prices. A rate given by neither makes the price unknown
    unless genai-prices knows the model. Cached input is priced at the full input rate when an
    override sets the input rate without a ``cached_input``.
    """
    entry: Mapping[str, float] = {}
    if table and model is not None:
        entry = table.get(model) or table.get(model.lower()) or {}
    inp = price_input if price_input is not None else entry.get("input")
    out = price_output if price_output is not None else entry.get("output")
    cached = entry.get("cached_input")
    if inp is None and out is None and cached is None:
        return genai_price(model) if model else None
    base = genai_price(model) if model and (inp is None or out is None) else None
    if inp is None or out is None:
        if base is None:
            return None
        if inp is None:
            inp = base.input_per_m
            if cached is None:
                cached = base.cached_input_per_m
        if out is None:
            out = base.output_per_m
    return Price(input_per_m=float(inp), output_per_m=float(out),
                 cached_input_per_m=None if cached is None else float(cached),
                 source=OVERRIDE, matched=base.matched if base is not None else None)


BATCH_DISCOUNT = 0.5
"""Provider Batch APIs (OpenAI, Anthropic) charge half the live rates; genai-prices lists no
batch rates of its own, so every batch price is the live one times this."""


def batch_price(price: Price | None) -> Price | None:
    """``price`` at the Batch API rate (:data:`BATCH_DISCOUNT` of every rate, tiers too)."""
    if price is None:
        return None
    half = BATCH_DISCOUNT

    def cut(rate: float | None) -> float | None:
        return None if rate is None else rate * half

    tiers = tuple(PriceTier(t.above, t.input_per_m * half, t.output_per_m * half,
                            cut(t.cached_input_per_m)) for t in price.tiers)
    return Price(price.input_per_m * half, price.output_per_m * half,
                 cut(price.cached_input_per_m), price.source, price.matched, tiers)


# --- costs --------------------------------------------------------------------------------


def cost_usd(price: Price | None, usage: Usage) -> float | None:
    """The cost of one answered request, from the usage the server reported.

    Usage follows OpenAI's convention (provider adapters normalise to it): ``prompt_tokens``
    includes ``cached_tokens``; ``completion_tokens`` includes ``reasoning_tokens``. Cached
    tokens cost the cached rate (the input rate if the model has none), the rest of the prompt
    the input rate, all completion tokens — reasoning included, as OpenAI bills them — the
    output rate. None when the price is unknown or the usage reports no token counts at all.
    """
    if price is None or (usage.prompt_tokens is None and usage.completion_tokens is None):
        return None
    prompt = max(usage.prompt_tokens or 0, 0)
    completion = max(usage.completion_tokens or 0, 0)
    cached = min(max(usage.cached_tokens or 0, 0), prompt)
    inp, out, cached_rate = price.rates(prompt)
    if cached_rate is None:
        cached_rate = inp
    return ((prompt - cached) * inp + cached * cached_rate + completion * out) / 1_000_000


def input_cost_usd(price: Price | None, input_tokens: int) -> float | None:
    """The cost of ``input_tokens`` prompt tokens of one request, none of them cached."""
    if price is None:
        return None
    return input_tokens * price.rates(input_tokens)[0] / 1_000_000


def max_cost_usd(price: Price | None, input_tokens: int, max_output_tokens: int) -> float | None:
    """The most one request can cost: its prompt (uncached) plus ``max_output_tokens`` at the
    output rate. None when the price is unknown."""
    if price is None:
        return None
    inp, out, _ = price.rates(input_tokens)
    return (input_tokens * inp + max_output_tokens * out) / 1_000_000


# --- the budget cap -----------------------------------------------------------------------


class Budget:
    """The ``--max-cost`` cap: reserve a request's maximum cost before sending it, settle to
    the actual cost when it is answered.

    Guarantee: ``spent + reserved`` never exceeds ``max_cost`` through :meth:`try_reserve`,
    however many requests are in flight; so as long as no request costs more than it reserved
    (i.e. requests carry ``max_tokens``, which the reservation is computed from), spend never
    exceeds the cap. A request whose actual cost is unknown should be settled at its reserved
    amount. ``max_cost`` None means no cap (reservations are still tracked).
    Not thread-safe: use it from one event loop.
    """

    def __init__(self, max_cost: float | None) -> None:
        if max_cost is not None and (math.isnan(max_cost) or max_cost < 0):
            raise ValueError(f"max_cost must be >= 0, got {max_cost!r}")
        self.max_cost = max_cost
        self.spent = 0.0
        self.reserved = 0.0
        self.exhausted = False
        self._open = 0  # reservations not yet settled; at 0, float drift in ``reserved`` is reset

    def try_reserve(self, amount: float) -> bool:
        """Reserve ``amount`` USD; False (and ``exhausted`` set) if that would take
        ``spent + reserved`` past the cap. A refused reservation holds nothing."""
        if amount < 0 or math.isnan(amount):
            raise ValueError(f"a reservation must be >= 0, got {amount!r}")
        if self.max_cost is not None and self.spent + self.reserved + amount > self.max_cost:
            self.exhausted = True
            return False
        self.reserved += amount
        self._open += 1
        return True

    def settle(self, reserved: float, actual: float) -> None:
        """Release a reservation of ``reserved`` USD and add the ``actual`` cost to ``spent``.
        For a request that failed without being billed, ``actual`` is 0."""
        self._open = max(self._open - 1, 0)
        self.reserved = 0.0 if self._open == 0 else max(self.reserved - reserved, 0.0)
        self.spent += actual

    @property
    def remaining(self) -> float | None:
        """USD still available for new reservations (None when there is no cap)."""
        if self.max_cost is None:
            return None
        return max(self.max_cost - self.spent - self.reserved, 0.0)
