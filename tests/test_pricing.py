"""Prices, costs and the budget cap."""

from __future__ import annotations

import random
import socket
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal

import genai_prices
import pytest

from batcher.pricing import (
    Budget,
    Price,
    cost_usd,
    genai_price,
    input_cost_usd,
    max_cost_usd,
    price_for,
)
from batcher.types import Usage


def _reference(model: str, prompt: int, completion: int, cached: int = 0) -> float:
    """genai-prices' own figure for the same usage (its input_tokens include cache reads)."""
    usage = genai_prices.Usage(input_tokens=prompt, output_tokens=completion,
                               cache_read_tokens=cached or None)
    total = genai_prices.calc_price(usage, model).total_price
    assert isinstance(total, Decimal)
    return float(total)


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Pricing must never reach the network: any connection attempt fails the test."""
    def refuse(*_args: object, **_kw: object) -> None:
        raise AssertionError("pricing tried to open a network connection")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    genai_price.cache_clear()
    yield


@pytest.mark.parametrize("model", ["gpt-4o-mini", "claude-3-5-haiku-latest", "gemini-1.5-flash",
                                   "gpt-4.1"])
@pytest.mark.parametrize(("prompt", "completion", "cached"),
                         [(1000, 500, 0), (12_345, 678, 4_096), (0, 10, 0)])
def test_cost_matches_genai_prices(model: str, prompt: int, completion: int,
                                   cached: int) -> None:
    price = price_for(model)
    assert price is not None and price.source == "genai-prices"
    got = cost_usd(price, Usage(prompt_tokens=prompt, completion_tokens=completion,
                                cached_tokens=cached))
    assert got == pytest.approx(_reference(model, prompt, completion, cached), rel=1e-9)


def test_time_of_day_prices_take_the_highest_rate() -> None:
    """DeepSeek is cheaper off-peak; a job runs for hours, so batcher prices at the peak."""
    price = price_for("deepseek-chat")
    assert price is not None
    got = cost_usd(price, Usage(prompt_tokens=1000, completion_tokens=500, cached_tokens=100))
    day = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    options = []
    for hour in range(24):
        usage = genai_prices.Usage(input_tokens=1000, output_tokens=500, cache_read_tokens=100)
        calc = genai_prices.calc_price(usage, "deepseek-chat",
                                       genai_request_timestamp=day.replace(hour=hour))
        options.append(float(calc.total_price))
    assert len(set(options)) > 1  # the dataset really has time-of-day prices
    assert got == pytest.approx(max(options), rel=1e-9)


def test_known_rates() -> None:
    mini = price_for("gpt-4o-mini")
    assert mini is not None
    assert (mini.input_per_m, mini.output_per_m, mini.cached_input_per_m) == (0.15, 0.6, 0.075)
    assert mini.matched == "openai:gpt-4o-mini"
    # gateway-style names are matched by their last segment
    gateway = price_for("openai/gpt-4o-mini")
    assert gateway is not None and gateway.input_per_m == 0.15


def test_long_context_tier_matches_genai_prices() -> None:
    price = price_for("gemini-1.5-flash")
    assert price is not None and price.tiers
    big = Usage(prompt_tokens=200_000, completion_tokens=1_000, cached_tokens=50_000)
    assert cost_usd(price, big) == pytest.approx(
        _reference("gemini-1.5-flash", 200_000, 1_000, 50_000), rel=1e-9)
    assert cost_usd(price, big) > cost_usd(price, Usage(prompt_tokens=100_000,  # type: ignore[operator]
                                                       completion_tokens=1_000,
                                                       cached_tokens=50_000)) * 1.5


def test_cached_tokens_priced_at_cached_rate() -> None:
    price = Price(input_per_m=2.0, output_per_m=8.0, cached_input_per_m=0.5, source="override")
    usage = Usage(prompt_tokens=1_000_000, completion_tokens=100_000, cached_tokens=400_000,
                  reasoning_tokens=60_000)
    # 600k × $2 + 400k × $0.5 + 100k × $8 (reasoning is inside completion, billed once)
    assert cost_usd(price, usage) == pytest.approx(1.2 + 0.2 + 0.8)
    no_cache_rate = Price(input_per_m=2.0, output_per_m=8.0, cached_input_per_m=None,
                          source="override")
    assert cost_usd(no_cache_rate, usage) == pytest.approx(2.0 + 0.8)
    # cached larger than prompt (a confused server) never gives a negative uncached part
    odd = Usage(prompt_tokens=10, completion_tokens=0, cached_tokens=50)
    assert cost_usd(price, odd) == pytest.approx(10 * 0.5 / 1e6)


def test_cost_unknown() -> None:
    assert cost_usd(None, Usage(prompt_tokens=5, completion_tokens=5)) is None
    price = Price(1.0, 1.0, None, "override")
    assert cost_usd(price, Usage()) is None
    assert cost_usd(price, Usage(prompt_tokens=1_000_000)) == pytest.approx(1.0)


def test_max_cost() -> None:
    price = Price(input_per_m=1.0, output_per_m=4.0, cached_input_per_m=None, source="override")
    assert max_cost_usd(price, 1000, 500) == pytest.approx((1000 * 1 + 500 * 4) / 1e6)
    assert input_cost_usd(price, 1000) == pytest.approx(1000 / 1e6)
    assert max_cost_usd(None, 1000, 500) is None


def test_unknown_model_is_none_not_zero() -> None:
    assert price_for("my-local-llama-7b") is None
    assert price_for(None) is None
    assert price_for("") is None


def test_overrides() -> None:
    both = price_for("my-local-llama", price_input=0.5, price_output=1.5)
    assert both == Price(0.5, 1.5, None, "override")
    # flags win over genai-prices even for a known model
    flagged = price_for("gpt-4o-mini", price_input=1.0, price_output=2.0)
    assert flagged is not None and (flagged.input_per_m, flagged.output_per_m) == (1.0, 2.0)
    assert flagged.source == "override"
    table = {"my-local-llama": {"input": 0.1, "output": 0.2, "cached_input": 0.01},
             "gpt-4o-mini": {"output": 9.0}}
    from_table = price_for("my-local-llama", table=table)
    assert from_table == Price(0.1, 0.2, 0.01, "override")
    # one side from the table, the other from genai-prices
    mixed = price_for("gpt-4o-mini", table=table)
    assert mixed is not None
    assert (mixed.input_per_m, mixed.output_per_m, mixed.cached_input_per_m) == (0.15, 9.0, 0.075)
    # flags over table
    flag_over_table = price_for("my-local-llama", price_output=7.0, table=table)
    assert flag_over_table == Price(0.1, 7.0, 0.01, "override")
    # half a price for an unknown model is still unknown
    assert price_for("my-local-llama", price_input=1.0) is None
    assert price_for("other-model", table=table) is None


def test_budget_rejects_what_would_cross_the_cap() -> None:
    budget = Budget(1.0)
    assert budget.try_reserve(0.6)
    assert not budget.try_reserve(0.5)
    assert budget.exhausted
    assert budget.reserved == pytest.approx(0.6)
    budget.settle(0.6, 0.1)
    assert budget.spent == pytest.approx(0.1) and budget.reserved == 0.0
    assert budget.try_reserve(0.9)
    assert budget.remaining == pytest.approx(0.0)
    assert not budget.try_reserve(1e-9)
    unlimited = Budget(None)
    assert unlimited.try_reserve(1e9) and unlimited.remaining is None
    with pytest.raises(ValueError):
        Budget(-1.0)
    with pytest.raises(ValueError):
        budget.try_reserve(-0.1)


@pytest.mark.parametrize("seed", range(20))
def test_budget_never_exceeds_cap_under_interleaving(seed: int) -> None:
    """Many requests in flight, answered in random order, each costing at most what it
    reserved: spend + reservations never pass the cap, and dispatch stops only when the
    next request really would cross it."""
    rng = random.Random(seed)
    cap = rng.uniform(0.5, 5.0)
    budget = Budget(cap)
    in_flight: list[tuple[float, float]] = []
    sent = 0
    for _ in range(2000):
        if in_flight and (rng.random() < 0.45 or budget.exhausted):
            reserved, actual = in_flight.pop(rng.randrange(len(in_flight)))
            budget.settle(reserved, actual)
        else:
            amount = rng.uniform(0.0, 0.2)
            before = budget.spent + budget.reserved
            if budget.try_reserve(amount):
                sent += 1
                in_flight.append((amount, amount * rng.choice([0.0, 0.3, 1.0, rng.random()])))
            else:
                assert before + amount > cap  # refused only when it really would cross
        assert budget.spent + budget.reserved <= cap + 1e-12
        assert budget.reserved >= 0.0
    for reserved, actual in in_flight:
        budget.settle(reserved, actual)
    assert budget.spent <= cap + 1e-12
    assert budget.reserved == 0.0
    assert sent > 0
