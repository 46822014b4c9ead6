"""``--engine ray`` reads its input with Ray Data: the same rows, ids, line numbers and
bad-row reports as the local engine, for gzip JSONL and a folder of Parquet, and inputs at
``s3://`` URLs (a real S3-compatible server on 127.0.0.1)."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batcher.simulate import SimulatorThread
from tests.conftest import prompts, run_cli
from tests.s3_server import Bucket, s3, s3_endpoint  # noqa: F401  (fixtures)

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.ray

COMPARED = ("id", "status", "output", "finish_reason", "prompt_tokens", "completion_tokens",
            "cost_usd", "error", "prompt", "extra")


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    ray.init(address="local", num_cpus=2, namespace="batcher", include_dashboard=False,
             configure_logging=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(autouse=True)
def _key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-ray-input")


def _args(src: Path | str, out: Path, sim: SimulatorThread) -> list[str]:
    return ["run", str(src), "-o", str(out), "--base-url", sim.base_url, "--model",
            "gpt-4o-mini", "--no-progress", "--log-format", "json"]


def _events(stderr: str, name: str) -> list[dict[str, Any]]:
    events = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    return [e for e in events if e["event"] == name]


def _same_job(local: Path, on_ray: Path, first: Any, second: Any) -> None:
    """Outputs, summaries and bad-row reports (with their file and line) alike."""
    assert first.exit_code == second.exit_code == 1, second.stderr   # bad rows: exit 1
    a, b = pq.read_table(local), pq.read_table(on_ray)
    assert a.schema == b.schema
    names = [n for n in COMPARED if n in a.schema.names]
    assert a.select(names).to_pylist() == b.select(names).to_pylist()   # input order too
    reports = [[(e["where"], e["field"], e["problem"]) for e in _events(run.stderr,
                                                                          "bad_row_skipped")]
               for run in (first, second)]
    assert reports[0] == reports[1] and reports[0]
    summaries = [json.loads(out.with_name(out.stem + ".summary.json").read_text())
                 for out in (local, on_ray)]
    for key in ("rows", "ok", "error", "skipped", "prompt_tokens", "completion_tokens",
                "cost_usd"):
        assert summaries[0][key] == summaries[1][key], key
    assert _events(second.stderr, "ray_data_read"), "the input was not read by Ray Data"


def test_ray_data_reads_gzip_jsonl_and_parquet_parts_as_the_local_engine_does(
        local_ray: None, sim: SimulatorThread, tmp_path: Path) -> None:
    lines = [json.dumps(r) for r in prompts(40)]
    lines[5:5] = ["{broken", "", "   ", json.dumps({"id": "r2", "prompt": "dup"}),
                  json.dumps({"id": "no-prompt"}), "[1, 2]"]
    src = tmp_path / "in.jsonl.gz"
    with gzip.open(src, "wt") as fh:
        fh.write("\ufeff" + "\n".join(lines))   # a BOM, and no newline at the end
    local, on_ray = tmp_path / "local.parquet", tmp_path / "ray.parquet"
    first = run_cli(*_args(src, local, sim))
    second = run_cli(*_args(src, on_ray, sim), "--engine", "ray", "--ray-actors", "2")
    _same_job(local, on_ray, first, second)

    folder = tmp_path / "parts"
    folder.mkdir()
    for index in range(3):
        rows = prompts(30, start=30 * index)
        table = pa.table({"id": [r["id"] for r in rows],
                          "prompt": [None if i == 7 else r["prompt"] for i, r in enumerate(rows)],
                          "extra": list(range(30))})
        pq.write_table(table, folder / f"part-{index}.parquet", row_group_size=11)
    local, on_ray = tmp_path / "plocal.parquet", tmp_path / "pray.parquet"
    first = run_cli(*_args(folder, local, sim))
    second = run_cli(*_args(folder, on_ray, sim), "--engine", "ray", "--ray-actors", "2")
    _same_job(local, on_ray, first, second)


def test_an_s3_input_on_ray_is_read_on_the_cluster(
        sim: SimulatorThread, tmp_path: Path, s3: Bucket) -> None:  # noqa: F811
    # Its own Ray (a subprocess driver): the read tasks' workers get the endpoint and the
    # credentials from the environment, as a cluster's nodes would from theirs.
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join([json.dumps(r) for r in prompts(20)] + ["{bad"]) + "\n")
    url = s3.put("in.jsonl", src)
    local, on_ray = tmp_path / "local.parquet", tmp_path / "ray.parquet"
    first = run_cli(*_args(src, local, sim))
    done = subprocess.run([sys.executable, "-m", "batcher", *_args(url, on_ray, sim),
                           "--engine", "ray", "--ray-actors", "1"],
                          capture_output=True, text=True, timeout=240, check=False,
                          env={**os.environ, "RAY_DISABLE_USAGE_STATS": "1"})
    assert done.returncode == 1, done.stderr
    assert first.exit_code == 1
    a, b = pq.read_table(local), pq.read_table(on_ray)
    assert a.select(["id", "output"]).to_pylist() == b.select(["id", "output"]).to_pylist()
    assert [e["where"] for e in _events(done.stderr, "bad_row_skipped")] == [f"{url}:21"]
    assert _events(done.stderr, "ray_data_read")
    assert "Traceback" not in done.stderr


def _shared_memory_kib() -> int:
    """This process's resident shared memory (the object store's pages it has mapped)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssShmem:"):
            return int(line.split()[1])
    raise AssertionError("no RssShmem in /proc/self/status")


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/status")
def test_the_driver_keeps_neither_big_blocks_nor_the_pages_of_blocks_it_read(
        local_ray: None, tmp_path: Path) -> None:
    # The driver's memory must not grow with the input: Ray Data used to merge a file's
    # tables into one block (up to 128 MiB), and the object-store pages of every block the
    # driver read stayed in its RSS. 24 MiB of input is more than six blocks; the driver may hold two.
    from batcher.engines.ray.data import BLOCK_BYTES, RayScan, _read_jsonl
    from batcher.io.location import InputLocation

    text = "Classify the sentiment of this review, in one word. " * 8
    lines = [json.dumps({"id": f"r{n}", "prompt": f"{text}{n}"}) for n in range(60_000)]
    data = ("\n".join(lines) + "\n").encode()
    src, parquet = tmp_path / "in.jsonl", tmp_path / "in.parquet"
    src.write_bytes(data)
    pq.write_table(pa.table({"id": [f"r{n}" for n in range(60_000)],
                             "prompt": [f"{text}{n}" for n in range(60_000)]}), parquet)
    assert len(data) > 6 * BLOCK_BYTES
    scan = RayScan(None)
    location = InputLocation(src, scan=scan)
    file = location.resolve()[1][0]

    sizes = [table.nbytes for table in scan._read(
        location, file, lambda loc, f: _read_jsonl(loc, f, gz=False))]
    assert len(sizes) >= 6 and max(sizes) < 1.5 * BLOCK_BYTES, sizes

    before = _shared_memory_kib()
    assert b"".join(scan.jsonl_blocks(location, file, gz=False)) == data
    grown = _shared_memory_kib() - before
    assert grown < 2 * BLOCK_BYTES / 1024, f"{grown} KiB of the object store stayed mapped"

    location = InputLocation(parquet, scan=scan)
    before = _shared_memory_kib()
    rows = sum(batch.num_rows for batch in scan.parquet_batches(
        location, location.resolve()[1][0], None, 1024))
    assert rows == 60_000
    grown = _shared_memory_kib() - before
    assert grown < 2 * BLOCK_BYTES / 1024, f"{grown} KiB of the object store stayed mapped"
