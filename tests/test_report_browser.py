"""The report opened in a real browser (Debian's chromium, headless): every chart drawn, no
console error, no network request, a screenshot. Skipped only when chromium is not installed
(.ci/run installs it)."""

from __future__ import annotations

import html.parser
import re
import struct
import subprocess
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batcher.io.writer import RESULT_SCHEMA
from batcher.report import write_report
from tests.test_report import CHART_IDS, assert_offline

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(),
                                reason="needs Debian's chromium at /usr/bin/chromium "
                                       "(apt-get install -y chromium; .ci/run does)")
BROWSER_OWN_HOSTS = re.compile(r"(^|\.)(google\.com|googleapis\.com|gvt1\.com|gstatic\.com)$")
"""Chromium's own update/account pings, made on any page (even about:blank) despite
--disable-background-networking; never a host the report names (asserted below)."""


def _output(path: Path) -> Path:
    """An output that has every chart: two models, streamed (ttft), errors, 429s, retries,
    a stall, an expected column."""
    t0 = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)
    rows: list[dict[str, Any]] = []
    for i in range(400):
        at = t0 + timedelta(seconds=i * 0.25 + (60 if i >= 200 else 0))  # a 60 s stall
        error = i % 37 == 0
        rows.append({
            "id": f"r{i}", "status": "error" if error else "ok",
            "model": "model-a" if i % 2 else "model-b",
            "output": None if error else str(i % 3), "expected": str(i % 2),
            "finish_reason": None if error else ("length" if i % 11 == 0 else "stop"),
            "prompt_tokens": None if error else 20, "completion_tokens": None if error else 5,
            "cost_usd": None if error else 0.0001, "latency_ms": 100.0 + (i * 7919) % 900,
            "ttft_ms": 40.0 + i % 50, "attempts": 2 if i % 5 == 0 else 1,
            "http_status": 429 if error else 200, "error_type": "rate_limited" if error else None,
            "error": "HTTP 429: slow down" if error else None, "completed_at": at,
        })
    fields = [f for f in RESULT_SCHEMA if f.name != "embedding"] + [pa.field("expected", pa.string())]
    pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema(fields)), path)
    return path


class _Recorder(SimpleHTTPRequestHandler):
    requests: list[str]

    def do_GET(self) -> None:
        type(self).requests.append(self.path)
        super().do_GET()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, Path, list[str]]]:
    """The report page, served from a loopback server that records every request."""
    page = write_report([_output(tmp_path / "out.parquet")], tmp_path / "report.html",
                        redact=lambda text: text)
    handler = type("Handler", (_Recorder,), {"requests": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0),
                                 lambda *a: handler(*a, directory=str(tmp_path)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/report.html", page, handler.requests
    finally:
        server.shutdown()
        server.server_close()


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    profile = tmp_path / "profile"
    profile.mkdir(exist_ok=True)
    return subprocess.run(
        [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu",
         "--disable-background-networking", "--disable-component-update", "--no-first-run",
         "--disable-sync", f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=1",
         *args], capture_output=True, timeout=120, check=False)


class _Charts(html.parser.HTMLParser):
    """Per chart figure: whether it holds an <svg>, its size and how many elements it has."""

    def __init__(self) -> None:
        super().__init__()
        self.charts: dict[str, dict[str, float]] = {}
        self._current: str | None = None
        self._depth = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "figure" and a.get("class") == "chart":
            self._current = str(a.get("id"))
            self.charts[self._current] = {"svg": 0, "elements": 0, "marks": 0, "w": 0, "h": 0}
            self._depth = 0
            return
        if self._current is None:
            return
        info = self.charts[self._current]
        if tag == "svg" and not info["svg"]:
            info["svg"], info["w"], info["h"] = 1, float(a.get("width") or 0), float(a.get("height") or 0)
        elif info["svg"]:
            info["elements"] += 1
            if "mark-" in (a.get("class") or "") and tag == "g":
                info["marks"] += 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "figure":
            self._current = None


def test_every_chart_renders_offline_in_chromium(
        tmp_path: Path, served: tuple[str, Path, list[str]]) -> None:
    url, page, requests = served
    text = page.read_text()
    assert_offline(text)
    ids = ["chart-" + name for name in CHART_IDS.findall(text)]
    assert {"chart-0-throughput", "chart-0-latency", "chart-0-ttft", "chart-0-tokens",
            "chart-0-cost", "chart-0-finish", "chart-0-errors", "chart-compare-latency",
            "chart-compare-errors", "chart-compare-accuracy"} <= set(ids)

    dumped = _chromium(tmp_path, "--dump-dom", url)
    assert dumped.returncode == 0, dumped.stderr[-2000:]
    parser = _Charts()
    parser.feed(dumped.stdout.decode())
    assert list(parser.charts) == ids  # the browser's DOM has every chart, in order
    for chart, info in parser.charts.items():
        assert info["svg"] and info["w"] > 0 and info["h"] > 0, chart
        assert info["elements"] > 10 and info["marks"] > 0, (chart, info)

    log = dumped.stderr.decode(errors="replace")
    assert not [line for line in log.splitlines() if "CONSOLE" in line]  # no console message
    assert requests == ["/report.html"]  # the page fetched nothing from its own origin
    origin = urlsplit(url).netloc
    for found in re.findall(r"https?://[^\s\"'<>]+", log):
        host = urlsplit(found).hostname or ""
        assert urlsplit(found).netloc == origin or BROWSER_OWN_HOSTS.search(host), found
        assert host not in text  # a browser ping, not something the page names


def test_screenshot_is_a_non_empty_png(tmp_path: Path, served: tuple[str, Path, list[str]]
                                       ) -> None:
    url, _, _ = served
    shot = tmp_path / "report.png"
    done = _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1280,2400",
                     "--hide-scrollbars", url)
    assert done.returncode == 0, done.stderr[-2000:]
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (1280, 2400)
