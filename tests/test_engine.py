"""The engine seam: a job runs on any engine that keeps the contract of batcher.engine, and
the state, writer, budget gate, summary and exit code do not know which one ran."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from batcher import runner as runner_module
from batcher.config import RunConfig
from batcher.engine import Job
from batcher.errors import BadRequest
from batcher.results import Failed, Sent
from batcher.simulate import SimulatorThread
from batcher.types import Answer, HttpResponse, RequestRow, Usage
from tests.conftest import prompts, run_cli, write_jsonl


class EchoEngine:
    """Answers every row itself, without a network: row r3 fails with a client error."""

    name = "echo"

    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self.stopped: list[bool] = []
        self.consumers = 0

    async def run(self, rows: asyncio.Queue[RequestRow | None], job: Job) -> None:
        self.consumers = job.consumers
        ended = 0
        while ended < job.consumers:
            row = await rows.get()
            if row is None:
                ended += 1
                continue
            prepared = job.prepare([row])
            if prepared is None or isinstance(prepared, list):
                continue
            job.progress.in_flight += 1
            await asyncio.sleep(0)
            job.progress.in_flight -= 1
            response = HttpResponse(200, {}, b"{}")
            outcome: Sent | Failed
            if row.id == "r3":
                outcome = Failed(BadRequest("HTTP 400: no", 400), 1, 1.0, 0.0, response)
            else:
                usage = Usage(prompt_tokens=1_000_000, completion_tokens=0,
                              total_tokens=1_000_000)
                answer = Answer(f"echo {row.prompt}", "stop", "stop", "gpt-4o-mini", usage)
                outcome = Sent(response, answer, 1, 2.0, 0.5)
            job.finish(prepared, outcome)

    def stop(self, *, now: bool) -> int:
        self.stopped.append(now)
        return 0


@pytest.fixture
def echo(monkeypatch: pytest.MonkeyPatch) -> list[EchoEngine]:
    made: list[EchoEngine] = []

    def make(config: RunConfig) -> EchoEngine:
        made.append(EchoEngine(config))
        return made[-1]

    monkeypatch.setattr(runner_module, "get_engine", make)
    return made


def test_a_job_runs_on_another_engine_with_the_same_output_summary_and_exit_code(
        tmp_path: Path, echo: list[EchoEngine]) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", prompts(6))
    out = tmp_path / "out.parquet"
    result = run_cli("run", src, "-o", out, "--base-url", "http://127.0.0.1:9/v1",
                     "--model", "gpt-4o-mini", "--no-progress")
    assert len(echo) == 1
    assert result.exit_code == 1, result.stderr                # one failed row
    rows = {r["id"]: r for r in pq.read_table(out).to_pylist()}
    assert sorted(rows) == [f"r{i}" for i in range(6)]
    assert rows["r0"]["output"] == "echo Say something about item number 0"
    assert rows["r0"]["cost_usd"] == pytest.approx(0.15)       # priced by the job
    assert (rows["r3"]["status"], rows["r3"]["http_status"]) == ("error", 400)
    summary = json.loads((tmp_path / "out.summary.json").read_text())
    assert (summary["ok"], summary["error"], summary["exit_code"]) == (5, 1, 1)
    assert summary["cost_usd"] == pytest.approx(0.75)
    # Resumed on the same engine: nothing is left to send, the rerun changes nothing.
    result = run_cli("run", src, "-o", out, "--base-url", "http://127.0.0.1:9/v1",
                     "--model", "gpt-4o-mini", "--no-progress")
    assert result.exit_code == 1 and pq.read_table(out).num_rows == 6


def test_the_budget_gate_is_the_jobs_whatever_the_engine(
        tmp_path: Path, echo: list[EchoEngine]) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", prompts(6))
    out = tmp_path / "out.parquet"
    # Each row may cost up to ~$0.15 (1M tokens assumed by the echo's usage is more than
    # the gate reserves), so a $0.2 cap stops the job after a row or two, exit 3.
    result = run_cli("run", src, "-o", out, "--base-url", "http://127.0.0.1:9/v1",
                     "--model", "gpt-4o-mini", "--no-progress", "--max-cost", "0.2",
                     "-p", "max_tokens=300000")
    assert result.exit_code == 3, result.stderr
    assert "budget reached" in result.stderr
    assert echo[0].stopped == [False]                          # told to stop, once
    # The resume line is this job's command, never the test runner's own arguments (under
    # `python -m pytest`, sys.argv[0] is pytest's __main__.py).
    resume = json.loads((tmp_path / "out.summary.json").read_text())["resume_command"]
    assert resume.startswith(f"batcher run {src} -o {out}"), resume


def test_an_engine_gets_the_pool_the_open_file_limit_allows(
        tmp_path: Path, echo: list[EchoEngine], monkeypatch: pytest.MonkeyPatch) -> None:
    # Capped at start (batcher.resources.fit_open_files): the engine's workers and the row
    # queue's end markers follow the cap, not the --concurrency asked for.
    monkeypatch.setattr(runner_module, "fit_open_files",
                        lambda concurrency: (3, f"{concurrency} is too many: running 3"))
    src = write_jsonl(tmp_path / "in.jsonl", prompts(4))
    result = run_cli("run", src, "-o", tmp_path / "out.parquet", "--base-url",
                     "http://127.0.0.1:9/v1", "--model", "gpt-4o-mini", "--no-progress",
                     "--concurrency", "64")
    assert result.exit_code == 1, result.stderr                # r3 fails, as always
    assert echo[0].consumers == 3 and echo[0].config.concurrency == 3


def test_engine_ray_without_ray_installed_exits_2_naming_the_install(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    # `import ray` fails as it does where the extra is not installed.
    monkeypatch.setitem(sys.modules, "ray", None)
    for name in [m for m in sys.modules if m.startswith("batcher.engines.ray")]:
        monkeypatch.delitem(sys.modules, name)
    src = write_jsonl(tmp_path / "in.jsonl", prompts(3))
    out = tmp_path / "out.parquet"
    result = run_cli("run", src, "-o", out, "--base-url", "http://127.0.0.1:9/v1",
                     "--model", "m", "--engine", "ray", "--no-progress")
    assert result.exit_code == 2
    assert "pip install 'batcher[ray]'" in result.stderr
    assert not out.exists() and not (tmp_path / "out.parquet.state").exists()


@pytest.mark.parametrize(("args", "message"), [
    (("--ray-actors", "2"), "needs engine ray"),
    (("--ray-address", "auto"), "needs engine ray"),
    (("--engine", "ray", "--ray-actors", "0"), "ray_actors (--ray-actors): 0 is out of range"),
])
def test_ray_options_are_checked(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", prompts(1))
    result = run_cli("run", src, "-o", tmp_path / "out.parquet", "--model", "m", *args)
    assert result.exit_code == 2
    assert message in result.stderr


def test_job_file_engine_is_checked(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "in.jsonl", prompts(1))
    job = tmp_path / "job.toml"
    job.write_text('input = "in.jsonl"\noutput = "out.parquet"\nmodel = "m"\nengine = "spark"\n')
    result = run_cli("run", job, "--no-progress")
    assert result.exit_code == 2
    assert "engine (--engine): 'spark' is not one of live, ray" in result.stderr


def test_engine_local_is_the_live_engine(tmp_path: Path) -> None:
    from batcher.config import make_config
    from batcher.engines import LiveEngine, get_engine

    config = make_config({"input": tmp_path / "in.jsonl", "output": tmp_path / "o.parquet",
                          "engine": "local"})
    assert config.engine == "live"
    assert isinstance(get_engine(config), LiveEngine)


def test_the_live_engine_collects_young_garbage_less_often_while_it_runs(
        tmp_path: Path, sim: SimulatorThread, monkeypatch: pytest.MonkeyPatch) -> None:
    """Python's default (700 allocations) ran the cyclic collector every few requests; the
    engine raises it for its run and puts the caller's setting back afterwards."""
    import gc

    from batcher.engines import live
    from batcher.http1 import PlainTransport

    seen: list[int] = []
    real_send = PlainTransport.send

    async def send(self: PlainTransport, request: object) -> object:
        seen.append(gc.get_threshold()[0])
        return await real_send(self, request)  # type: ignore[arg-type]

    monkeypatch.setattr(PlainTransport, "send", send)
    before = gc.get_threshold()
    src = write_jsonl(tmp_path / "in.jsonl", prompts(5))
    result = run_cli("run", src, "-o", tmp_path / "out.parquet", "--base-url",
                     sim.base_url, "--model", "gpt-4o-mini", "--no-progress")
    assert result.exit_code == 0, result.stderr
    assert seen and all(young >= live.GC_YOUNG_THRESHOLD for young in seen), seen
    assert gc.get_threshold() == before
