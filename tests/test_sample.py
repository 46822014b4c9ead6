"""`estimate --sample N`: real requests to the simulator, measured figures, ranges, failures."""

from __future__ import annotations

import json
import math
import random
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from batcher.config import make_config
from batcher.estimate import SAMPLE_FIELDS, EstimateReport
from batcher.sample import (
    CONFIDENCE,
    Measured,
    Reservoir,
    SampleOutcome,
    apply_sample,
    t_quantile_95,
)
from batcher.simulate import SimulatorThread, answer_text, count_tokens
from tests.conftest import prompts, run_cli, write_jsonl

PRICE_IN, PRICE_OUT = 2.0, 10.0  # USD per 1M tokens: simple arithmetic


def _estimate(src: Path, sim: SimulatorThread, *extra: str) -> Any:
    result = run_cli("estimate", src, "--base-url", sim.base_url, "--model", "gpt-4o-mini",
                     "--price-input", str(PRICE_IN), "--price-output", str(PRICE_OUT),
                     "--json", *extra)
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def _true_output_tokens(rows: list[dict[str, Any]], answer_tokens: int, max_tokens: int) -> int:
    """What the simulator would answer for every row (its answers are deterministic)."""
    return sum(min(count_tokens(answer_text(r["prompt"], answer_tokens)), max_tokens)
               for r in rows)


def test_sample_sends_exactly_n_and_reports_what_the_server_measured(
        tmp_path: Path, make_sim: Callable[..., SimulatorThread]) -> None:
    sim = make_sim(answer_tokens=40, latency_ms=30)
    rows = prompts(300)
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    report = _estimate(src, sim, "--sample", "10", "-p", "max_tokens=100")

    stats = sim.stats
    assert stats.requests == 10 and stats.ok == 10
    assert stats.resent_after_ok == 0                      # ten different rows
    assert report["sample_size"] == 10 and report["sample_ok"] == 10
    assert report["measured_output_tokens_mean"] == pytest.approx(stats.completion_tokens / 10)
    assert report["measured_prompt_tokens_mean"] == pytest.approx(stats.prompt_tokens / 10)
    assert report["sample_cost_usd"] == pytest.approx(
        (stats.prompt_tokens * PRICE_IN + stats.completion_tokens * PRICE_OUT) / 1e6)
    assert report["measured_latency_s_mean"] >= 0.03

    expected = report["output_tokens_expected"]
    assert expected == pytest.approx(300 * stats.completion_tokens / 10, abs=1)
    assert report["output_tokens_expected_low"] <= expected <= report["output_tokens_expected_high"]
    assert report["output_tokens_expected_high"] <= report["output_tokens_max"] == 300 * 100
    # the measured answers are ~40 tokens: far below the dry run's bound
    assert expected < report["output_tokens_max"] / 2
    # the truth for all 300 rows lies in the range (the simulator's lengths spread ±25%)
    truth = _true_output_tokens(rows, 40, 100)
    assert report["output_tokens_expected_low"] <= truth <= report["output_tokens_expected_high"]

    cost_in = report["cost_usd_input"]
    assert report["cost_usd_expected"] == pytest.approx(cost_in + expected * PRICE_OUT / 1e6,
                                                        rel=1e-3)
    assert (cost_in <= report["cost_usd_expected_low"] <= report["cost_usd_expected"]
            <= report["cost_usd_expected_high"] <= report["cost_usd_max"])
    # 300 rows at 64 in flight and the measured latency
    assert report["seconds_expected"] == pytest.approx(
        300 * report["measured_latency_s_mean"] / 64)
    assert report["sample_confidence"] == CONFIDENCE


def test_sample_text_is_labelled_measured(tmp_path: Path, sim: SimulatorThread) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", prompts(40))
    result = run_cli("estimate", src, "--base-url", sim.base_url, "--model", "gpt-4o-mini",
                     "--sample", "5", "-p", "max_tokens=50")
    assert result.exit_code == 0, result.stderr
    assert "measured on 5 sampled rows" in result.stdout
    assert "90% range" in result.stdout
    assert sim.stats.requests == 5


def test_without_sample_nothing_is_sent(tmp_path: Path, sim: SimulatorThread) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", prompts(30))
    report = _estimate(src, sim, "-p", "max_tokens=50")
    assert sim.stats.requests == 0
    assert all(report[name] is None for name in SAMPLE_FIELDS)
    text = run_cli("estimate", src, "--base-url", sim.base_url, "--model", "gpt-4o-mini")
    assert "measured" not in text.stdout and sim.stats.requests == 0


def test_a_sample_of_every_row_is_exact(tmp_path: Path,
                                        make_sim: Callable[..., SimulatorThread]) -> None:
    sim = make_sim(answer_tokens=24)
    rows = prompts(12)
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    report = _estimate(src, sim, "--sample", "50", "-p", "max_tokens=64")
    assert sim.stats.requests == 12 and report["sample_size"] == 12
    truth = _true_output_tokens(rows, 24, 64)
    assert truth == sim.stats.completion_tokens
    # the finite-population correction: nothing left to guess
    assert (report["output_tokens_expected_low"] == report["output_tokens_expected"]
            == report["output_tokens_expected_high"] == truth)
    assert report["cost_usd_expected"] == pytest.approx(
        report["cost_usd_input"] + truth * PRICE_OUT / 1e6)


def test_retryable_errors_are_retried_and_rpm_sets_the_time(
        tmp_path: Path, make_sim: Callable[..., SimulatorThread]) -> None:
    sim = make_sim(script=("500", "429:retry-after-ms=10"))
    src = write_jsonl(tmp_path / "in.jsonl", prompts(1200))
    report = _estimate(src, sim, "--sample", "6", "--rpm", "600", "--concurrency", "2")
    assert report["sample_ok"] == 6
    assert sim.stats.requests == 8                       # 6 rows + 2 retried faults
    assert report["seconds_expected"] == pytest.approx(120.0)   # 1200 rows at 600/min


@pytest.mark.parametrize("sim_fields, needle", [
    ({"require_key": "sk-right"}, "401"),
    ({"quota_exhausted": True}, "quota"),
])
def test_auth_or_quota_failure_exits_3_at_once(
        tmp_path: Path, make_sim: Callable[..., SimulatorThread], sim_fields: dict[str, Any],
        needle: str) -> None:
    sim = make_sim(**sim_fields)
    src = write_jsonl(tmp_path / "in.jsonl", prompts(50))
    result = run_cli("estimate", src, "--base-url", sim.base_url, "--model", "gpt-4o-mini",
                     "--sample", "20", "--concurrency", "2", "--json",
                     env={"OPENAI_API_KEY": "sk-wrong-key-123"})
    assert result.exit_code == 3
    assert needle in result.stderr.lower()
    assert "sk-wrong" not in result.stderr + result.stdout
    assert result.stdout == ""
    assert 1 <= sim.stats.requests <= 2                  # no more than were in flight


def test_the_right_key_is_sent(tmp_path: Path, make_sim: Callable[..., SimulatorThread]) -> None:
    sim = make_sim(require_key="sk-right")
    src = write_jsonl(tmp_path / "in.jsonl", prompts(10))
    result = run_cli("estimate", src, "--base-url", sim.base_url, "--model", "m", "--sample", "3",
                     "--json", env={"OPENAI_API_KEY": "sk-right"})
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["sample_ok"] == 3


def test_row_errors_are_left_out_and_all_failing_exits_3(
        tmp_path: Path, make_sim: Callable[..., SimulatorThread]) -> None:
    sim = make_sim(script=("400",))
    src = write_jsonl(tmp_path / "in.jsonl", prompts(30))
    report = _estimate(src, sim, "--sample", "5", "--concurrency", "1")
    assert report["sample_size"] == 5 and report["sample_ok"] == 4
    assert any("1 of 5 sampled requests" in n for n in report["notes"])

    bad = make_sim(script=("400",) * 5)
    result = run_cli("estimate", src, "--base-url", bad.base_url, "--model", "m",
                     "--sample", "5", "--json")
    assert result.exit_code == 3
    assert "no sampled request was answered" in result.stderr and "400" in result.stderr


def test_unknown_price_still_measures_tokens(tmp_path: Path, sim: SimulatorThread) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", prompts(20))
    result = run_cli("estimate", src, "--base-url", sim.base_url, "--model", "my-local-llama",
                     "--sample", "4", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["measured_output_tokens_mean"] == pytest.approx(
        sim.stats.completion_tokens / 4)
    assert report["cost_usd_expected"] is None and report["sample_cost_usd"] is None


def test_bad_sample_size_is_a_usage_error(tmp_path: Path, sim: SimulatorThread) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", prompts(5))
    result = run_cli("estimate", src, "--base-url", sim.base_url, "--sample", "-2")
    assert result.exit_code == 2 and "--sample" in result.stderr
    assert sim.stats.requests == 0


# --- the method, without a server -----------------------------------------------------------


def test_reservoir_is_uniform_and_reproducible() -> None:
    rng = random.Random(1)
    counts = [0] * 20
    trials = 20_000
    for _ in range(trials):
        res: Reservoir[int] = Reservoir(4, rng)
        for i in range(20):
            res.add(i)
        picked = res.items()
        assert len(set(picked)) == 4 and picked == sorted(picked)   # distinct, input order
        for i in picked:
            counts[i] += 1
    for c in counts:  # each kept with probability 4/20; 4 standard deviations ≈ ±0.011
        assert c / trials == pytest.approx(0.2, abs=0.012)

    def draw(seed: int) -> list[int]:
        res: Reservoir[int] = Reservoir(5, random.Random(seed))
        for i in range(1000):
            res.add(i)
        return res.items()

    assert draw(7) == draw(7) and draw(7) != draw(8)
    small: Reservoir[str] = Reservoir(10, random.Random(0))
    for x in "abc":
        small.add(x)
    assert small.items() == ["a", "b", "c"]


def test_t_quantiles_match_the_t_distribution() -> None:
    def cdf_above_zero(q: float, df: int, steps: int = 4000) -> float:
        # Simpson's rule on Student's t density from 0 to q.
        c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
        h = q / steps
        total = 0.0
        for i in range(steps + 1):
            w = 1 if i in (0, steps) else (4 if i % 2 else 2)
            x = i * h
            total += w * c * (1 + x * x / df) ** (-(df + 1) / 2)
        return total * h / 3

    for df in (1, 2, 5, 9, 19, 30, 60, 120):
        assert cdf_above_zero(t_quantile_95(df), df) == pytest.approx(0.45, abs=2e-4)
    assert t_quantile_95(1000) == pytest.approx(1.645)
    assert t_quantile_95(35) == t_quantile_95(30)   # conservative between table entries


def _report(rows: int, out_max: int) -> EstimateReport:
    return EstimateReport(rows=rows, bad_rows=0, input_tokens=rows * 10,
                          output_tokens_max=out_max, cost_usd_input=0.0,
                          cost_usd_max=out_max * PRICE_OUT / 1e6, seconds_estimate=None,
                          by_model=[], unknown_price_models=[], notes=[])


def test_the_90_percent_range_covers_the_truth_about_90_percent_of_the_time() -> None:
    # Simulator-like answer lengths over a population; many independent samples of 10.
    population = [count_tokens(answer_text(f"row {i}", 40)) for i in range(500)]
    truth = sum(population)
    config = make_config({"input": "in.jsonl", "output": "o.parquet"})
    rng = random.Random(3)
    covered, trials = 0, 600
    for _ in range(trials):
        res: Reservoir[int] = Reservoir(10, rng)
        for n in population:
            res.add(n)
        outcome = SampleOutcome(sent=10, answers=[
            Measured(id=str(i), prompt_tokens=5, completion_tokens=n, latency_s=0.1,
                     cost_usd=0.0, output_cost_usd=n * PRICE_OUT / 1e6)
            for i, n in enumerate(res.items())])
        report = _report(500, 500 * 100)
        apply_sample(report, outcome, config)
        assert report.output_tokens_expected_low is not None
        assert report.output_tokens_expected_high is not None
        covered += report.output_tokens_expected_low <= truth <= report.output_tokens_expected_high
    assert 0.84 <= covered / trials <= 0.96


def test_ranges_are_clipped_to_what_is_possible() -> None:
    config = make_config({"input": "in.jsonl", "output": "o.parquet"})
    # answers at max_tokens but one: the upper bound cannot exceed every row at its maximum
    lengths = [100, 100, 100, 2]
    outcome = SampleOutcome(sent=4, answers=[
        Measured(id=str(i), prompt_tokens=5, completion_tokens=n, latency_s=0.1, cost_usd=0.0,
                 output_cost_usd=n * PRICE_OUT / 1e6) for i, n in enumerate(lengths)])
    report = _report(1000, 1000 * 100)
    apply_sample(report, outcome, config)
    assert report.output_tokens_expected == round(1000 * statistics.fmean(lengths))
    assert report.output_tokens_expected_high == 100_000
    assert report.cost_usd_expected_high == pytest.approx(report.cost_usd_max)
    one = _report(1000, 1000 * 100)
    apply_sample(one, SampleOutcome(sent=1, answers=outcome.answers[:1]), config)
    assert one.output_tokens_expected_low == 0 and one.output_tokens_expected_high == 100_000
    assert any("no spread" in n for n in one.notes)
