"""Shared fixtures: a loopback simulator, a CLI driver, and input-file builders."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner, Result

from batcher.cli import cli
from batcher.simulate import SimConfig, SimulatorThread

ROOT = Path(__file__).resolve().parents[1]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--realserver", action="store_true",
                     help="run the integration test against a real llama.cpp server")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if ("realserver" in item.keywords and not config.getoption("--realserver")
                and not os.environ.get("BATCHER_REALSERVER")):
            item.add_marker(pytest.mark.skip(
                reason="real llama.cpp server: run with --realserver or BATCHER_REALSERVER=1"))


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test sees the developer's real keys or base URLs."""
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "BATCHER_BASE_URL", "ANTHROPIC_API_KEY"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def make_sim() -> Iterator[Callable[..., SimulatorThread]]:
    """Start simulators on 127.0.0.1 with the given SimConfig fields; all stopped at teardown."""
    started: list[SimulatorThread] = []

    def start(**fields: Any) -> SimulatorThread:
        sim = SimulatorThread(SimConfig(**fields))
        sim.__enter__()
        started.append(sim)
        return sim

    yield start
    for sim in started:
        sim.__exit__(None, None, None)


@pytest.fixture
def sim(make_sim: Callable[..., SimulatorThread]) -> SimulatorThread:
    return make_sim()


def stop_process(proc: subprocess.Popen[Any], timeout: float = 10) -> None:
    """Terminate a server process a test started; kill it if it is still there after
    ``timeout`` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    return path


def prompts(n: int, start: int = 0) -> list[dict[str, Any]]:
    return [{"id": f"r{i}", "prompt": f"Say something about item number {i}"}
            for i in range(start, start + n)]


def run_cli(*args: str | Path, env: dict[str, str] | None = None) -> Result:
    """Invoke the CLI in-process; stdout and stderr are kept apart."""
    runner = CliRunner()
    return runner.invoke(cli, [str(a) for a in args], env=env, catch_exceptions=False)


def read_output(path: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = pq.read_table(path).to_pylist()
    return rows
