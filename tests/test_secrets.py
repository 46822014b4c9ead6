"""Secrets stay secret (issue 11): header values masked wherever batcher repeats them, header
values from the environment, no keyless requests to a remote server."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from batcher.config import make_config
from batcher.errors import ConfigError
from batcher.secrets import check_key, is_loopback, redact_argv, redactor, resolve_headers
from batcher.types import HttpRequest, RequestContext
from tests.conftest import ROOT, prompts, run_cli, write_jsonl

SECRET = "sk-very-secret-0123456789"


def test_secret_header_values_are_masked_in_a_command_line() -> None:
    argv = ["run", "in.jsonl", "--header", f"Authorization: Bearer {SECRET}",
            f"--header=X-Api-Key: {SECRET}", "--header", "X-Trace: abc",
            "--header", "X-Gateway-Token: env:GW_TOKEN"]
    masked = redact_argv(argv)
    assert SECRET not in " ".join(masked)
    assert masked[3] == "Authorization: ***" and masked[4] == "--header=X-Api-Key: ***"
    assert masked[6] == "X-Trace: abc" and masked[8] == "X-Gateway-Token: env:GW_TOKEN"


def test_the_redactor_masks_the_key_and_secret_headers_but_not_ordinary_text() -> None:
    redact = redactor("sk-key-abcdef", {"X-Api-Key": SECRET, "X-Trace": "trace-123456"})
    text = f"bad key sk-key-abcdef; header {SECRET}; trace trace-123456"
    assert redact(text) == "bad key ***; header ***; trace trace-123456"


def test_env_header_values_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GW_TOKEN", SECRET)
    assert resolve_headers({"X-Token": "env:GW_TOKEN", "X-A": "b"}) == {
        "X-Token": SECRET, "X-A": "b"}
    monkeypatch.delenv("GW_TOKEN")
    with pytest.raises(ConfigError, match="GW_TOKEN"):
        resolve_headers({"X-Token": "env:GW_TOKEN"})


def test_no_repr_shows_a_key_or_headers() -> None:
    ctx = RequestContext(base_url="http://x/v1", model="m", api_key=SECRET,
                         headers={"Authorization": f"Bearer {SECRET}"})
    request = HttpRequest("POST", "http://x/v1/chat/completions",
                          {"Authorization": f"Bearer {SECRET}"}, b"{}")
    config = make_config({"input": "a.jsonl", "output": "b.parquet",
                          "headers": {"X-Api-Key": SECRET}})
    for obj in (ctx, request, config):
        assert SECRET not in repr(obj)


def test_a_remote_server_needs_a_key_and_a_local_one_does_not() -> None:
    for url in ("http://127.0.0.1:8000/v1", "http://localhost:1/v1", "http://[::1]:80/v1"):
        assert is_loopback(url)
        check_key(url, "", {}, "OPENAI_API_KEY")
    for url in ("https://api.openai.com/v1", "http://10.0.0.5/v1"):
        assert not is_loopback(url)
        with pytest.raises(ConfigError, match="OPENAI_API_KEY"):
            check_key(url, "", {}, "OPENAI_API_KEY")
        check_key(url, "k", {}, "OPENAI_API_KEY")
        check_key(url, "", {"Authorization": "Bearer x"}, "OPENAI_API_KEY")


def test_run_without_a_key_against_a_remote_url_exits_2_naming_the_variable(
        tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", prompts(2))
    # .invalid never resolves (RFC 6761): even a regression sends nothing anywhere.
    result = run_cli("run", src, "-o", tmp_path / "out.parquet", "--model", "gpt-4o-mini",
                     "--base-url", "http://batcher-test.invalid/v1", "--no-progress",
                     "--api-key-env", "MY_GATEWAY_KEY", "--max-attempts", "1")
    assert result.exit_code == 2, result.stderr
    assert "MY_GATEWAY_KEY" in result.stderr and "--api-key-env" in result.stderr
    assert not (tmp_path / "out.parquet").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_a_secret_header_never_reaches_the_summary_or_the_resume_line(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", prompts(2))
    out = tmp_path / "out.parquet"
    dead = f"http://127.0.0.1:{_free_port()}/v1"
    # A real process: the resume line is built from its own command line.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "BATCHER_"))}
    result = subprocess.run(
        [sys.executable, "-m", "batcher", "run", str(src), "-o", str(out), "--model",
         "gpt-4o-mini", "--base-url", dead, "--no-progress", "--max-attempts", "1",
         "--header", f"Authorization: Bearer {SECRET}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 3, result.stderr
    summary: dict[str, Any] = json.loads((tmp_path / "out.summary.json").read_text())
    assert "Authorization: ***" in summary["resume_command"]
    assert "Authorization: ***" in result.stderr
    assert SECRET not in json.dumps(summary) and SECRET not in result.stderr


def test_a_header_from_the_environment_authenticates(
        tmp_path: Path, make_sim: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    sim = make_sim(require_key=SECRET)
    src = write_jsonl(tmp_path / "in.jsonl", prompts(3))
    monkeypatch.setenv("GW_AUTH", f"Bearer {SECRET}")
    args = ["run", src, "-o", tmp_path / "out.parquet", "--model", "gpt-4o-mini",
            "--base-url", sim.base_url, "--no-progress", "--header", "Authorization: env:GW_AUTH"]
    result = run_cli(*args)
    assert result.exit_code == 0, result.stderr
    assert sim.stats.ok == 3
    monkeypatch.delenv("GW_AUTH")
    result = run_cli(*args, "--restart")
    assert result.exit_code == 2 and "GW_AUTH" in result.stderr


def test_estimate_sample_masks_a_key_the_server_quotes_back(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A server that echoes the Authorization header in its 400 error, as some gateways do."""
    import asyncio
    import threading

    from aiohttp import web

    async def echo(request: web.Request) -> web.Response:
        auth = request.headers.get("Authorization", "")
        return web.json_response({"error": {"message": f"model not allowed for {auth}",
                                            "type": "invalid_request_error"}}, status=400)

    ready = threading.Event()
    holder: dict[str, Any] = {}

    def serve() -> None:
        loop = asyncio.new_event_loop()
        app = web.Application()
        app.router.add_post("/v1/chat/completions", echo)
        runner = web.AppRunner(app)
        loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        loop.run_until_complete(site.start())
        holder["port"] = runner.addresses[0][1]
        holder["loop"] = loop
        ready.set()
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert ready.wait(10)
    try:
        monkeypatch.setenv("OPENAI_API_KEY", SECRET)
        src = write_jsonl(tmp_path / "in.jsonl", prompts(4))
        result = run_cli("estimate", src, "--model", "gpt-4o-mini", "--sample", "2",
                         "--base-url", f"http://127.0.0.1:{holder['port']}/v1")
        assert result.exit_code != 0
        assert "model not allowed" in result.stdout + result.stderr
        assert SECRET not in result.stdout + result.stderr
        assert "***" in result.stdout + result.stderr
    finally:
        holder["loop"].call_soon_threadsafe(holder["loop"].stop)
        thread.join(10)
