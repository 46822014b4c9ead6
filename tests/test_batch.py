"""Batch mode (issue 12) end to end through the CLI against the simulator's Batch APIs.

Batches end on the simulator's clock: a manual one here, advanced by the tests, so nothing
waits on real time (``--poll-interval`` is tiny; a batch with ``batch_seconds=0`` has ended
by the first poll).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from batcher.engines.batch.openai import OpenAIBatches
from batcher.pricing import price_for
from batcher.simulate import SimConfig, SimulatorThread, answer_text, make_app
from tests.conftest import prompts, read_output, run_cli, write_jsonl


class ManualClock:
    """The simulator's clock: moves only when a test says so."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def batch_sim() -> Iterator[Callable[..., tuple[SimulatorThread, ManualClock]]]:
    started: list[SimulatorThread] = []

    def start(**fields: Any) -> tuple[SimulatorThread, ManualClock]:
        clock = ManualClock()
        sim = SimulatorThread(SimConfig(**fields))
        sim.app = make_app(sim.config, clock=clock)
        sim.__enter__()
        started.append(sim)
        return sim, clock

    yield start
    for sim in started:
        sim.__exit__(None, None, None)


def _args(sim: SimulatorThread, src: Path, out: Path, *extra: str) -> list[str]:
    return ["run", str(src), "-o", str(out), "--base-url", sim.base_url, "--model",
            "gpt-4o-mini", "--mode", "batch", "--poll-interval", "0.01", "--no-progress",
            *extra]


def _submitted(tmp_path: Path, sim: SimulatorThread, *, rows: int
               ) -> tuple[Path, Path, list[str]]:
    """``rows`` prompts submitted with --no-wait (exit 75): the input, output and command."""
    src = write_jsonl(tmp_path / "in.jsonl", prompts(rows))
    out = tmp_path / "out.parquet"
    args = _args(sim, src, out, "--no-wait")
    assert run_cli(*args).exit_code == 75
    return src, out, args


def _matrix_job(tmp_path: Path, sim: SimulatorThread, *, rows: int) -> Path:
    """A job file running ``rows`` prompts on two models in batch mode with --no-wait."""
    write_jsonl(tmp_path / "in.jsonl", prompts(rows))
    job = tmp_path / "matrix.toml"
    job.write_text(f'input = "in.jsonl"\noutput = "out/{{model}}.parquet"\n'
                   f'models = ["gpt-4o-mini", "gpt-4o"]\nbase_url = "{sim.base_url}"\n'
                   'mode = "batch"\nno_wait = true\npoll_interval = 0.01\nno_report = true\n')
    return job


def _batches(sim: SimulatorThread) -> dict[str, Any]:
    counters: dict[str, Any] = sim.stats.batches.as_dict()
    return counters


def _by_id(out: Path) -> dict[str, dict[str, Any]]:
    rows = read_output(out)
    assert len(rows) == len({r["id"] for r in rows}), "an id is in the output twice"
    return {str(r["id"]): r for r in rows}


def test_split_by_count_maps_reversed_results_back_at_the_batch_price(
        tmp_path: Path, batch_sim: Callable[..., tuple[SimulatorThread, ManualClock]]) -> None:
    sim, _ = batch_sim()
    rows = prompts(7)
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.parquet"
    result = run_cli(*_args(sim, src, out, "--batch-max-requests", "3"))
    assert result.exit_code == 0, result.stderr
    counters = _batches(sim)
    assert counters["creates"] == 3 and counters["lines"] == 7   # 3 + 3 + 1
    assert all(n == 1 for n in counters["creates_by_part"].values())
    got = _by_id(out)
    price = price_for("gpt-4o-mini")
    assert price is not None
    for row in rows:
        answer = got[row["id"]]
        # The simulator writes results in reverse order: only custom_id mapping gets this.
        assert answer["status"] == "ok"
        assert answer["output"] == answer_text(row["prompt"], 16)
        assert answer["batch_id"].startswith("batch_")
        live = (answer["prompt_tokens"] * price.input_per_m
                + answer["completion_tokens"] * price.output_per_m) / 1e6
        assert answer["cost_usd"] == pytest.approx(live / 2)
        assert answer["prompt"] == row["prompt"]           # input columns carried through
    assert len({r["batch_id"] for r in got.values()}) == 3


def test_split_by_bytes_sent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                             batch_sim: Callable[..., tuple[SimulatorThread, ManualClock]]
                             ) -> None:
    sim, _ = batch_sim()
    cap = 600
    monkeypatch.setattr(OpenAIBatches, "max_bytes", cap)
    src = write_jsonl(tmp_path / "in.jsonl", prompts(12))
    out = tmp_path / "out.parquet"
    result = run_cli(*_args(sim, src, out))
    assert result.exit_code == 0, result.stderr
    counters = _batches(sim)
    assert counters["largest_input"] <= cap
    line = len(OpenAIBatches().line("r0", "/v1/chat/completions", _request("r0")))
    assert counters["creates"] >= 12 // (cap // line)
    assert counters["creates"] > 1 and counters["lines"] == 12
    assert len(_by_id(out)) == 12


def _request(row_id: str) -> Any:
    from batcher.providers import get_provider
    from batcher.types import RequestContext, RequestRow

    row = RequestRow(id=row_id, shape="prompt", source="x", line=1,
                     prompt="Say something about item number 0")
    return get_provider("chat").build_request(row, RequestContext("http://x/v1", "gpt-4o-mini"))


def test_failed_expired_and_cancelled_lines_are_sent_again(
        tmp_path: Path, batch_sim: Callable[..., tuple[SimulatorThread, ManualClock]]) -> None:
    sim, _ = batch_sim(batch_fail_rate=0.25, batch_expire_rate=0.25, batch_cancel_rate=0.2,
                       seed=3)
    src = write_jsonl(tmp_path / "in.jsonl", prompts(40))
    out = tmp_path / "out.parquet"
    result = run_cli(*_args(sim, src, out, "--batch-max-requests", "10"))
    assert result.exit_code == 0, result.stderr
    got = _by_id(out)
    assert len(got) == 40 and all(r["status"] == "ok" for r in got.values())
    retried = [r for r in got.values() if r["attempts"] == 2]
    assert len(retried) >= 10          # ~70% of 40 lines failed, expired or were cancelled
    counters = _batches(sim)
    assert counters["lines"] == 40 + len(retried)       # only the failed lines sent again
    assert sim.stats.ok == 40                             # nothing answered twice


def test_4xx_lines_are_errors_and_batch_lines_group_by_url(
        tmp_path: Path, batch_sim: Callable[..., tuple[SimulatorThread, ManualClock]]) -> None:
    sim, _ = batch_sim()
    lines = [
        {"custom_id": "c1", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}},
        {"custom_id": "e1", "method": "POST", "url": "/v1/embeddings",
         "body": {"model": "text-embedding-3-small", "input": "hello"}},
        {"custom_id": "c2", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "gpt-4o-mini", "messages": []}},                 # refused: 400
        {"custom_id": "e2", "method": "POST", "url": "/v1/embeddings",
         "body": {"model": "text-embedding-3-small", "input": "world"}},
    ]
    src = write_jsonl(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out.parquet"
    result = run_cli(*_args(sim, src, out))
    assert result.exit_code == 1, result.stderr
    assert _batches(sim)["creates"] == 2                 # one batch per url
    got = _by_id(out)
    assert got["c1"]["status"] == "ok" and got["c1"]["output"]
    assert got["e1"]["status"] == "ok" and len(got["e1"]["embedding"]) > 0
    assert got["c2"]["status"] == "error" and got["c2"]["http_status"] == 400
    assert got["c2"]["attempts"] == 1                   # a 4xx line is not sent again
    assert got["e2"]["status"] == "ok"


def _ledger_events(out: Path) -> list[dict[str, Any]]:
    path = out.with_name(out.name + ".state") / "batches" / "ledger.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _wait_created(out: Path, proc: subprocess.Popen[str], parts: int) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if sum(e["event"] == "created" for e in _ledger_events(out)) >= parts:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    raise AssertionError("the batches were never created")


@pytest.mark.parametrize("lose_ids", [False, True], ids=["ids-written", "ids-lost"])
def test_kill_9_after_submission_then_resume_submits_nothing_twice(
        tmp_path: Path, lose_ids: bool,
        batch_sim: Callable[..., tuple[SimulatorThread, ManualClock]]) -> None:
    sim, clock = batch_sim(batch_seconds=100)
    src = write_jsonl(tmp_path / "in.jsonl", prompts(9))
    out = tmp_path / "out.parquet"
    args = _args(sim, src, out, "--batch-max-requests", "4")
    proc = subprocess.Popen([sys.executable, "-m", "batcher", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_created(out, proc, parts=3)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.communicate(timeout=30)
    if lose_ids:
        # The instant between "create returned" and "id written": the ledger knows the parts
        # but not their batch ids; the resume must find them by their metadata.
        ledger = out.with_name(out.name + ".state") / "batches" / "ledger.jsonl"
        kept = [e for e in _ledger_events(out) if e["event"] != "created"]
        ledger.write_text("".join(json.dumps(e) + "\n" for e in kept))
    assert _batches(sim)["creates"] == 3
    clock.now = 1000.0                      # the provider has finished them meanwhile
    result = run_cli(*args)
    assert result.exit_code == 0, result.stderr
    counters = _batches(sim)
    assert counters["creates"] == 3 and counters["lines"] == 9
    assert sorted(counters["creates_by_part"].values()) == [1, 1, 1]
    assert sorted(_by_id(out)) == sorted(r["id"] for r in prompts(9))


def test_no_wait_exits_75_then_the_same_command_collects(
        tmp_path: Path, batch_sim: Callable[..., tuple[SimulatorThread, ManualClock]]) -> None:
    sim, clock = batch_sim(batch_seconds=60)
    src = write_jsonl(tmp_path / "in.jsonl", prompts(5))
    out = tmp_path / "out.parquet"
    args = _args(sim, src, out, "--no-wait")
    first = run_cli(*args)
    assert first.exit_code == 75, first.stderr
    # The collect command (in-process the CLI knows only its own arguments' gist).
    assert "run the same command again to collect them: batcher run" in first.stderr
    assert not out.exists()
    status = run_cli("status", out, "--json")
    listing = json.loads(status.stdout)["batches"]
    assert [b["state"] for b in listing] == ["in_progress"]
    again = run_cli(*args)                            # still running: still 75, no new batch
    assert again.exit_code == 75, again.stderr
    assert _batches(sim)["creates"] == 1
    clock.now = 61.0
    done = run_cli(*args)
    assert done.exit_code == 0, done.stderr
    assert len(_by_id(out)) == 5 and _batches(sim)["creates"] == 1
    listing = json.loads(run_cli("status", out, "--json").stdout)["batches"]
    assert listing[0]["state"] == "completed" and listing[0]["counts"]["completed"] == 5


def test_cancel_collects_what_finished_and_writes_the_rest_as_cancelled(
        tmp_path: Path, batch_sim: Callable[..., tuple[SimulatorThread, ManualClock]]) -> None:
    sim, clock = batch_sim(batch_seconds=10)
    src, out, args = _submitted(tmp_path, sim, rows=10)
    assert not out.exists()
    clock.now = 5.0                                  # half of the lines are done
    cancelled = run_cli("cancel", out)
    assert cancelled.exit_code == 0, cancelled.stderr
    assert _batches(sim)["cancels"] == 1 and _batches(sim)["creates"] == 1
    got = _by_id(out)                                # the output is written, every row in it
    assert len(got) == 10
    ok = [r for r in got.values() if r["status"] == "ok"]
    gone = [r for r in got.values() if r["status"] == "error"]
    assert len(ok) == 5 and all(r["cost_usd"] > 0 and r["batch_id"] for r in ok)
    assert len(gone) == 5 and {r["error_type"] for r in gone} == {"cancelled"}
    assert all(r["error"].startswith("cancelled (batcher cancel)") for r in gone)
    assert "--retry-failed" in cancelled.stdout and f"batcher run {src} -o {out}" in cancelled.stdout
    listing = json.loads(run_cli("status", out, "--json").stdout)["batches"]
    assert [b["state"] for b in listing] == ["cancelled"]
    again = run_cli("cancel", out)                   # nothing running: nothing changes
    assert again.exit_code == 0, again.stderr
    assert _batches(sim)["cancels"] == 1 and len(_by_id(out)) == 10
    retry = [*args, "--retry-failed"]
    result = run_cli(*retry)                         # the cancelled 5 go in a new batch
    assert result.exit_code == 75, result.stderr
    assert _batches(sim)["creates"] == 2
    clock.now = 100.0
    result = run_cli(*retry)                         # the same command collects them
    assert result.exit_code == 0, result.stderr
    got = _by_id(out)
    assert len(got) == 10 and all(r["status"] == "ok" for r in got.values())
    assert sorted(r["attempts"] for r in got.values()) == [1] * 5 + [2] * 5


def test_cancel_of_a_job_file_run_collects_that_output_only(
        tmp_path: Path, batch_sim: Callable[..., tuple[SimulatorThread, ManualClock]]) -> None:
    sim, clock = batch_sim(batch_seconds=10)
    job = _matrix_job(tmp_path, sim, rows=4)
    assert run_cli("run", job, "--no-progress").exit_code == 75
    assert _batches(sim)["creates"] == 2
    clock.now = 5.0
    first, second = tmp_path / "out" / "gpt-4o-mini.parquet", tmp_path / "out" / "gpt-4o.parquet"
    cancelled = run_cli("cancel", first)
    assert cancelled.exit_code == 0, cancelled.stderr
    assert _batches(sim)["cancels"] == 1
    assert {r["status"] for r in _by_id(first).values()} == {"ok", "error"}
    assert not second.exists()                       # the other model's batch runs on
    clock.now = 100.0                                # 1: the first output has cancelled rows
    assert run_cli("run", job, "--no-progress").exit_code == 1
    assert _batches(sim)["creates"] == 2 and len(_by_id(second)) == 4
    assert all(r["status"] == "ok" for r in _by_id(second).values())


def test_cancel_without_a_recorded_command_cancels_and_says_how_to_collect(
        tmp_path: Path, batch_sim: Callable[..., tuple[SimulatorThread, ManualClock]]) -> None:
    sim, _ = batch_sim(batch_seconds=10)
    src, out, _ = _submitted(tmp_path, sim, rows=4)
    meta_path = tmp_path / "out.parquet.state" / "meta.json"
    meta = json.loads(meta_path.read_text())
    assert meta["command"][:4] == ["batcher", "run", str(src), "-o"]
    assert "--mode" in meta["command"] and meta["cwd"] == os.getcwd()
    del meta["command"]                              # a state written before it was kept
    meta_path.write_text(json.dumps(meta))
    cancelled = run_cli("cancel", out)
    assert cancelled.exit_code == 0, cancelled.stderr
    assert _batches(sim)["cancels"] == 1 and not out.exists()
    assert "Not collected: its state does not name the command" in cancelled.stdout
    assert "Rerun your `batcher run` command" in cancelled.stdout

def test_server_without_batch_api_exits_2(
        tmp_path: Path, batch_sim: Callable[..., tuple[SimulatorThread, ManualClock]]) -> None:
    sim, _ = batch_sim(batch_api=False)
    src = write_jsonl(tmp_path / "in.jsonl", prompts(3))
    result = run_cli(*_args(sim, src, tmp_path / "out.parquet"))
    assert result.exit_code == 2
    assert "has no Batch API" in result.stderr and "Traceback" not in result.stderr


def test_bad_key_exits_3(tmp_path: Path,
                         batch_sim: Callable[..., tuple[SimulatorThread, ManualClock]]) -> None:
    sim, _ = batch_sim(require_key="sk-right")
    src = write_jsonl(tmp_path / "in.jsonl", prompts(3))
    result = run_cli(*_args(sim, src, tmp_path / "out.parquet"),
                     env={"OPENAI_API_KEY": "sk-wrong"})
    assert result.exit_code == 3, result.stderr
    assert "HTTP 401" in result.stderr and "sk-wrong" not in result.stderr
    assert _batches(sim)["creates"] == 0


def test_quota_exits_3(tmp_path: Path,
                       batch_sim: Callable[..., tuple[SimulatorThread, ManualClock]]) -> None:
    sim, _ = batch_sim(quota_exhausted=True)
    src = write_jsonl(tmp_path / "in.jsonl", prompts(3))
    result = run_cli(*_args(sim, src, tmp_path / "out.parquet"))
    assert result.exit_code == 3, result.stderr
    assert "quota" in result.stderr


def test_max_cost_reserves_a_whole_batch_before_submitting_it(
        tmp_path: Path, batch_sim: Callable[..., tuple[SimulatorThread, ManualClock]]) -> None:
    sim, _ = batch_sim()
    src = write_jsonl(tmp_path / "in.jsonl", prompts(6))
    out = tmp_path / "out.parquet"
    # $1 per 1M tokens live, $0.5 batch; each row reserves ~(input + 100) tokens at the batch
    # price: the first batch of 3 fits under the cap, the second does not.
    args = _args(sim, src, out, "--batch-max-requests", "3", "-p", "max_tokens=100",
                 "--price-input", "1", "--price-output", "1", "--max-cost", "0.00025")
    result = run_cli(*args)
    assert result.exit_code == 3, result.stderr
    assert "budget" in result.stderr
    counters = _batches(sim)
    assert counters["creates"] == 1 and counters["lines"] == 3


def test_anthropic_ids_that_do_not_fit_are_mapped_back(
        tmp_path: Path, batch_sim: Callable[..., tuple[SimulatorThread, ManualClock]]) -> None:
    sim, _ = batch_sim(batch_fail_rate=0.5, seed=1)
    rows = [{"id": f"row {i}/ü", "prompt": f"Tell me about {i}"} for i in range(6)]
    rows.append({"id": "plain_id-7", "prompt": "Tell me about 7"})
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.parquet"
    result = run_cli("run", src, "-o", out, "--base-url", sim.base_url, "--endpoint",
                     "anthropic", "--model", "claude-3-5-haiku-latest", "--mode", "batch",
                     "-p", "max_tokens=64", "--poll-interval", "0.01", "--no-progress")
    assert result.exit_code == 0, result.stderr
    got = _by_id(out)
    assert sorted(got) == sorted(r["id"] for r in rows)
    for row in rows:
        assert got[row["id"]]["status"] == "ok"
        assert got[row["id"]]["output"] == answer_text(row["prompt"], 16)
        assert got[row["id"]]["batch_id"].startswith("msgbatch_")
    assert any(r["attempts"] == 2 for r in got.values())      # errored lines sent again


def _post_json(url: str, body: dict[str, Any]) -> dict[str, Any]:
    import urllib.request

    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"content-type": "application/json",
                                              "anthropic-version": "2023-06-01"})
    with urllib.request.urlopen(request, timeout=10) as response:
        answer: dict[str, Any] = json.loads(response.read())
    return answer


@pytest.mark.parametrize("case", ["found", "ambiguous", "not-this-part"])
def test_an_anthropic_batch_whose_id_was_not_written_is_found_by_its_size(
        tmp_path: Path, case: str, monkeypatch: pytest.MonkeyPatch,
        batch_sim: Callable[..., tuple[SimulatorThread, ManualClock]]) -> None:
    from batcher.engines.batch import anthropic
    from batcher.results import now_iso

    sim, clock = batch_sim(batch_seconds=100)
    src = write_jsonl(tmp_path / "in.jsonl", prompts(9))
    out = tmp_path / "out.parquet"
    args = ["run", str(src), "-o", str(out), "--base-url", sim.base_url, "--endpoint",
            "anthropic", "--model", "claude-3-5-haiku-latest", "--mode", "batch", "-p",
            "max_tokens=64", "--poll-interval", "0.01", "--no-progress",
            "--batch-max-requests", "4", "--no-wait"]
    assert run_cli(*args).exit_code == 75
    assert _batches(sim)["creates"] == 3             # parts of 4, 4 and 1 rows
    # The instant between "create returned" and "id written", for the last part: only one
    # part can be in it (parts are created one after another).
    events = _ledger_events(out)
    lost = next(e for e in reversed(events) if e["event"] == "created")
    kept = [e for e in events if e is not lost]
    if case == "not-this-part":    # announced after its batch was made: that one is not it
        monkeypatch.setattr(anthropic, "CLOCK_SKEW", 0.0)
        for event in kept:
            if event["event"] == "part" and event["part"] == lost["part"]:
                event["at"] = now_iso()
        time.sleep(0.05)
    ledger = out.with_name(out.name + ".state") / "batches" / "ledger.jsonl"
    ledger.write_text("".join(json.dumps(e) + "\n" for e in kept))
    foreign = None
    if case != "found":            # someone else's one-request batch, made just now, whose
        # custom_id is the lost part's row id (another job on the same input)
        ids = ledger.with_name(f"part-{lost['part']:06d}.ids").read_text().splitlines()
        same = json.loads(ids[0])[1]
        foreign = _post_json(sim.base_url + "/messages/batches", {"requests": [
            {"custom_id": same, "params": {
                "model": "claude-3-5-haiku-latest", "max_tokens": 16,
                "messages": [{"role": "user", "content": "Not batcher's"}]}}]})["id"]
    codes = []
    for moment in (1000.0, 2000.0, 3000.0):
        clock.now = moment
        codes.append(run_cli(*args).exit_code)
        if codes[-1] != 75:
            break
    assert codes[-1] == 0, codes
    got = _by_id(out)
    assert sorted(got) == sorted(r["id"] for r in prompts(9))
    assert all(r["status"] == "ok" for r in got.values())
    assert foreign not in {r["batch_id"] for r in got.values()}
    assert all(r["output"] != answer_text("Not batcher's", 16) for r in got.values())
    if case == "found":            # taken, not submitted again
        assert _batches(sim)["creates"] == 3
        assert lost["batch_id"] in {r["batch_id"] for r in got.values()}
    else:                          # not taken (two candidates) or refused by its results
        assert _batches(sim)["creates"] == 3 + 1 + 1


def test_batch_answers_go_in_the_cache(
        tmp_path: Path, batch_sim: Callable[..., tuple[SimulatorThread, ManualClock]]) -> None:
    sim, _ = batch_sim()
    src = write_jsonl(tmp_path / "in.jsonl", prompts(6))
    cache = tmp_path / "cache"
    first = tmp_path / "first.parquet"
    result = run_cli(*_args(sim, src, first, "--cache", cache, "-p", "temperature=0"))
    assert result.exit_code == 0, result.stderr
    assert _batches(sim)["lines"] == 6
    for mode in ("batch", "live"):                   # either mode is answered from the cache
        again = tmp_path / f"again-{mode}.parquet"
        result = run_cli("run", src, "-o", again, "--base-url", sim.base_url, "--model",
                         "gpt-4o-mini", "--mode", mode, "--no-progress", "--cache", cache,
                         "-p", "temperature=0")
        assert result.exit_code == 0, result.stderr
        summary = json.loads(again.with_name(f"again-{mode}.summary.json").read_text())
        assert summary["cache_hits"] == 6 and summary["sent_this_run"] == 0
        assert {k: r["output"] for k, r in _by_id(again).items()} == \
            {k: r["output"] for k, r in _by_id(first).items()}
    assert _batches(sim)["lines"] == 6 and _batches(sim)["creates"] == 1


def test_gemini_batch_mode_exits_2(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", prompts(2))
    result = run_cli("run", src, "-o", tmp_path / "out.parquet", "--endpoint", "gemini",
                     "--model", "gemini-2.0-flash", "--mode", "batch")
    assert result.exit_code == 2
    assert "not supported for the gemini endpoint" in result.stderr


def test_estimate_prices_batch_mode_at_half(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", prompts(20))
    base = ["--model", "gpt-4o-mini", "-p", "max_tokens=50", "--json"]
    live = json.loads(run_cli("estimate", src, *base).stdout)
    batch = json.loads(run_cli("estimate", src, *base, "--mode", "batch").stdout)
    dry = json.loads(run_cli("run", src, "-o", tmp_path / "o.parquet", "--dry-run",
                             "--mode", "batch", *base).stdout)
    for key in ("cost_usd_input", "cost_usd_max"):
        assert batch[key] == pytest.approx(live[key] / 2)
        assert dry[key] == pytest.approx(live[key] / 2)


def test_ctrl_c_while_waiting_stops_polling_and_exits_130(
        tmp_path: Path, batch_sim: Callable[..., tuple[SimulatorThread, ManualClock]]) -> None:
    sim, clock = batch_sim(batch_seconds=100)
    src = write_jsonl(tmp_path / "in.jsonl", prompts(4))
    out = tmp_path / "out.parquet"
    args = _args(sim, src, out)
    proc = subprocess.Popen([sys.executable, "-m", "batcher", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_created(out, proc, parts=1)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    assert "resume with" in stderr and "Traceback" not in stderr
    assert _batches(sim)["cancels"] == 0            # the batch keeps running at the provider
    clock.now = 1000.0
    result = run_cli(*args)
    assert result.exit_code == 0, result.stderr
    assert _batches(sim)["creates"] == 1 and len(_by_id(out)) == 4


def test_job_file_mode_batch(tmp_path: Path,
                             batch_sim: Callable[..., tuple[SimulatorThread, ManualClock]]) -> None:
    sim, _ = batch_sim()
    write_jsonl(tmp_path / "in.jsonl", prompts(4))
    job = tmp_path / "nightly.toml"
    job.write_text(f'input = "in.jsonl"\noutput = "out/{{job}}.parquet"\n'
                   f'model = "gpt-4o-mini"\nbase_url = "{sim.base_url}"\nmode = "batch"\n'
                   'poll_interval = 0.01\nbatch_max_requests = 2\nno_report = true\n')
    result = run_cli("run", job, "--no-progress")
    assert result.exit_code == 0, result.stderr
    assert _batches(sim)["creates"] == 2
    assert len(_by_id(tmp_path / "out" / "nightly.parquet")) == 4


def _failing_batches_app() -> tuple[Any, dict[str, int]]:
    """A server speaking the OpenAI Batch wire whose every batch fails validation."""
    from aiohttp import web

    counts = {"creates": 0}

    async def upload(request: web.Request) -> web.Response:
        await request.post()
        return web.json_response({"id": "file-1", "object": "file", "purpose": "batch"})

    async def create(request: web.Request) -> web.Response:
        counts["creates"] += 1
        return web.json_response({"id": f"batch_{counts['creates']}", "object": "batch",
                                  "status": "validating", "created_at": int(time.time()),
                                  "request_counts": {"total": 0, "completed": 0, "failed": 0}})

    async def get(request: web.Request) -> web.Response:
        return web.json_response({
            "id": request.match_info["id"], "object": "batch", "status": "failed",
            "created_at": int(time.time()), "output_file_id": None, "error_file_id": None,
            "errors": {"object": "list", "data": [{
                "code": "model_not_found", "line": 1, "param": "body.model",
                "message": "The model 'gpt-nope' does not exist."}]},
            "request_counts": {"total": 0, "completed": 0, "failed": 0}})

    app = web.Application()
    app.router.add_post("/v1/files", upload)
    app.router.add_post("/v1/batches", create)
    app.router.add_get("/v1/batches/{id}", get)
    return app, counts


def test_a_batch_that_fails_as_a_whole_is_reported_not_looped(tmp_path: Path) -> None:
    sim = SimulatorThread(SimConfig())
    sim.app, counts = _failing_batches_app()
    with sim:
        src = write_jsonl(tmp_path / "in.jsonl", prompts(3))
        out = tmp_path / "out.parquet"
        result = run_cli(*_args(sim, src, out, "--model", "gpt-nope"))
        assert result.exit_code == 1, result.stderr
        assert counts["creates"] == 1          # not submitted again
        again = run_cli(*_args(sim, src, out, "--model", "gpt-nope"))
        assert again.exit_code == 1 and counts["creates"] == 1     # done rows stay done
        retry = run_cli(*_args(sim, src, out, "--model", "gpt-nope", "--retry-failed"))
        assert retry.exit_code == 1 and counts["creates"] == 2     # sent again when asked
    got = _by_id(out)
    for row in got.values():
        assert row["status"] == "error" and row["batch_id"] == "batch_2"
        assert "failed: model_not_found: The model 'gpt-nope' does not exist." in row["error"]


def test_status_says_when_the_provider_cannot_be_asked(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", prompts(3))
    out = tmp_path / "out.parquet"
    with SimulatorThread(SimConfig(batch_seconds=3600)) as sim:
        assert run_cli(*_args(sim, src, out, "--no-wait")).exit_code == 75
    shown = run_cli("status", out)                    # the server is gone now
    assert shown.exit_code == 0, shown.stderr
    assert "batches  1" in shown.stdout and "in_progress" in shown.stdout
    assert "states as last seen: the provider could not be asked" in shown.stdout
    cancelled = run_cli("cancel", out)
    assert cancelled.exit_code == 3 and "Traceback" not in cancelled.stderr


@pytest.mark.parametrize("wire", ["openai", "anthropic"])
def test_a_batch_line_never_asks_for_a_stream(wire: str) -> None:
    import orjson

    from batcher.engines.batch.anthropic import AnthropicBatches
    from batcher.types import HttpRequest

    body = orjson.dumps({"model": "m", "stream": True, "stream_options": {"include_usage": True},
                         "messages": [{"role": "user", "content": "hi"}]})
    request = HttpRequest("POST", "http://x/v1/chat/completions", {}, body)
    batches = OpenAIBatches() if wire == "openai" else AnthropicBatches()
    line = orjson.loads(batches.line("c-1", "/v1/chat/completions", request))
    sent = line["body"] if wire == "openai" else line["params"]
    assert line["custom_id"] == "c-1" and "stream" not in sent
    assert sent["messages"] == [{"role": "user", "content": "hi"}]
    if wire == "openai":
        assert line["method"] == "POST" and line["url"] == "/v1/chat/completions"
        assert "stream_options" not in sent


def test_poll_intervals_back_off_from_10_to_60_seconds_unless_given() -> None:
    import itertools

    from batcher.engines.batch.engine import poll_intervals

    assert list(itertools.islice(poll_intervals(None), 7)) == [
        10.0, 15.0, 22.5, 33.75, 50.625, 60.0, 60.0]
    assert list(itertools.islice(poll_intervals(2.5), 3)) == [2.5, 2.5, 2.5]


def test_a_matrix_with_a_pending_run_exits_75(
        tmp_path: Path, batch_sim: Callable[..., tuple[SimulatorThread, ManualClock]]) -> None:
    sim, clock = batch_sim(batch_seconds=10)
    job = _matrix_job(tmp_path, sim, rows=2)
    first = run_cli("run", job, "--no-progress")
    assert first.exit_code == 75, first.stderr
    assert _batches(sim)["creates"] == 2
    clock.now = 11.0
    done = run_cli("run", job, "--no-progress")
    assert done.exit_code == 0, done.stderr
    assert _batches(sim)["creates"] == 2


def test_batch_mode_on_ray_exits_2(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", prompts(2))
    result = run_cli("run", src, "-o", tmp_path / "out.parquet", "--model", "gpt-4o-mini",
                     "--mode", "batch", "--engine", "ray")
    assert result.exit_code == 2
    assert "--engine ray is for live mode" in result.stderr


async def test_the_progress_bar_shows_the_batches_by_state() -> None:
    from batcher.summary import Progress
    from tests.test_progress import _bar_text

    progress = Progress(total=10, ok=4, stage="batches: 1 completed, 2 in_progress")
    text = await _bar_text(progress)
    assert "0 err · batches: 1 completed" in " ".join(text.split())


def test_the_key_and_secret_headers_are_nowhere_in_the_state_output_or_summary(
        tmp_path: Path, batch_sim: Callable[..., tuple[SimulatorThread, ManualClock]]) -> None:
    # Batch mode keeps more on disk than live mode (a ledger, the lines of every part): none
    # of it may hold the key or a secret header's value, whether the run ends or waits.
    key, token = "sk-batch-key-0123456789", "tok-secret-9876543210"
    sim, _ = batch_sim(require_key=key)
    src = write_jsonl(tmp_path / "in.jsonl", prompts(5))
    out = tmp_path / "out.parquet"
    result = run_cli(*_args(sim, src, out, "--header", f"X-Api-Token: {token}"),
                     env={"OPENAI_API_KEY": key})
    assert result.exit_code == 0, result.stderr
    assert len(_by_id(out)) == 5
    files = [p for p in tmp_path.rglob("*") if p.is_file() and p != src]
    assert any("state" in str(p) for p in files) and any(p.suffix == ".json" for p in files)
    for path in files:
        data = path.read_bytes()
        assert key.encode() not in data and token.encode() not in data, path
    assert key not in result.stdout + result.stderr and token not in result.stdout + result.stderr


def test_a_slot_keeps_its_rows_ordinal_so_a_resume_goes_by_ordinals() -> None:
    from batcher.engines.batch.ledger import Slot

    slot = Slot("k_r1", "r1", 1, 0.5, "gpt-4o-mini", None, "in.jsonl", 3, {"n": 1}, b"{}",
                None, 7)
    assert Slot.parse(slot.encode()) == slot
    # A part written before slots kept it (11 fields): read, the ordinal unknown (0), so
    # its rows' results make a resume go by ids.
    old = json.dumps(["k_r1", "r1", 1, 0.5, "gpt-4o-mini", None, "in.jsonl", 3, {}, "{}",
                      None]).encode()
    parsed = Slot.parse(old)
    assert parsed is not None and parsed.ordinal == 0 and parsed.row_id == "r1"
