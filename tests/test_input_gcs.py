"""Inputs at ``gs://`` URLs on the local engine, against a real GCS-compatible server on
127.0.0.1 (gcp-storage-emulator, run as its own process) that batcher reaches the way a user
would point it at an emulator: ``STORAGE_EMULATOR_HOST``. The same rows, bad-row reports and
dry run as a local file; a missing object or bucket is a usage error that names the URL.

The emulator answers one request at a time and writes a whole object to the socket before it
reads the next request, while Arrow's GCS client starts an open-ended download at every open
and seek: the objects here stay small (KiBs) so a download never waits on an unread one.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from batcher.simulate import SimulatorThread
from tests.conftest import prompts, run_cli, stop_process, write_jsonl
from tests.s3_server import Bucket
from tests.test_input_urls import _run, check_dry_run_as_local_copy, check_runs_as_local_copies


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def gcs_endpoint() -> Iterator[str]:
    # Its own process: an emulator thread in the test process would serve the in-process CLI.
    pytest.importorskip("gcp_storage_emulator")
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "gcp_storage_emulator", "start", "--host", "127.0.0.1",
         "--port", str(port), "--in-memory", "--quiet"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the GCS emulator did not start: "
                                       + server.communicate()[1].decode(errors="replace")
                                       ) from None
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process(server)


@pytest.fixture
def gcs(gcs_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Bucket:
    """A fresh bucket; the environment points batcher at the server."""
    monkeypatch.delenv("CLOUD_STORAGE_EMULATOR_ENDPOINT", raising=False)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_endpoint)
    fs = pafs.GcsFileSystem(anonymous=True, scheme="http", project_id="batcher-tests",
                            endpoint_override=gcs_endpoint.removeprefix("http://"))
    bucket = f"b-{uuid.uuid4().hex[:12]}"
    fs.create_dir(bucket)
    return Bucket("gs", gcs_endpoint, bucket, fs)


def test_a_gcs_jsonl_file_and_parquet_folder_run_as_their_local_copies(
        tmp_path: Path, sim: SimulatorThread, gcs: Bucket) -> None:
    check_runs_as_local_copies(tmp_path, sim, gcs)


def test_a_missing_gcs_object_or_bucket_exits_2_naming_the_url(
        tmp_path: Path, sim: SimulatorThread, gcs: Bucket) -> None:
    gcs.put("in.jsonl", write_jsonl(tmp_path / "in.jsonl", prompts(2)))
    for missing in (f"gs://{gcs.bucket}/nope.jsonl", "gs://no-such-bucket-here/in.jsonl"):
        result = _run(missing, tmp_path / "out.parquet", sim)
        assert result.exit_code == 2, result.stderr
        assert missing in result.stderr and "no such file" in result.stderr
        assert "Traceback" not in result.stderr
    assert sim.stats.requests == 0


def test_a_dry_run_of_a_gcs_jsonl_file_reports_as_its_local_copy(
        tmp_path: Path, gcs: Bucket) -> None:
    check_dry_run_as_local_copy(tmp_path, gcs)


def test_an_emulator_variable_that_is_no_endpoint_exits_2_naming_the_url_and_variable(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CLOUD_STORAGE_EMULATOR_ENDPOINT", raising=False)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "ftp://127.0.0.1:9/x")
    result = run_cli("estimate", "gs://bucket/in.jsonl", "--model", "gpt-4o-mini")
    assert result.exit_code == 2, result.stderr
    assert "gs://bucket/in.jsonl" in result.stderr and "STORAGE_EMULATOR_HOST" in result.stderr
    assert "Traceback" not in result.stderr



def test_an_emulator_that_does_not_answer_exits_2_naming_the_url_in_seconds(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The GCS client's own default is to retry for 15 minutes, uninterruptibly.
    monkeypatch.delenv("CLOUD_STORAGE_EMULATOR_ENDPOINT", raising=False)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"127.0.0.1:{_free_port()}")   # nobody there
    started = time.monotonic()
    result = run_cli("estimate", "gs://bucket/in.jsonl", "--model", "gpt-4o-mini")
    assert result.exit_code == 2, result.stderr
    assert "gs://bucket/in.jsonl" in result.stderr and "Traceback" not in result.stderr
    assert time.monotonic() - started < 60
