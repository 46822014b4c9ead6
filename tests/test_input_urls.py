"""Inputs at object-store URLs (``s3://``) on the local engine, against a real S3-compatible
server on 127.0.0.1: the same rows, bad-row reports, fingerprint and resume as a local file;
a missing object or bucket is a usage error that names the URL."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from batcher.checkpoint import input_fingerprint
from batcher.simulate import SimulatorThread
from tests.conftest import prompts, read_output, run_cli, write_jsonl
from tests.s3_server import Bucket, s3, s3_endpoint  # noqa: F401  (fixtures)
from tests.test_resume import _assert_exactly_once, _start, _wait_for_progress

COMPARED = ("id", "status", "output", "prompt_tokens", "completion_tokens", "error", "prompt")


def _run(src: Path | str, out: Path | str, sim: SimulatorThread, *extra: str) -> Any:
    return run_cli("run", src, "-o", out, "--base-url", sim.base_url, "--model", "gpt-4o-mini",
                   "--no-progress", "--log-format", "json", *extra)


def _rows(out: Path) -> list[dict[str, Any]]:
    return sorted(pq.read_table(out).select(COMPARED).to_pylist(), key=lambda r: str(r["id"]))


def _bad_rows(stderr: str) -> list[tuple[str, str | None, str]]:
    events = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    return [(e["where"], e["field"], e["problem"]) for e in events
            if e["event"] == "bad_row_skipped"]


def check_runs_as_local_copies(tmp_path: Path, sim: SimulatorThread, store: Bucket) -> None:
    """A JSONL file (with bad rows) and a Parquet folder in ``store`` give their local
    copies' output, bad-row reports (the URL in place of the path) and fingerprint."""
    lines = [json.dumps(r) for r in prompts(12)]
    lines[3:3] = ["{not json", "", json.dumps({"id": "r1", "prompt": "again"})]
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(lines) + "\n")
    url = store.put("data/in.jsonl", src)
    assert input_fingerprint(url) == input_fingerprint(src)   # where it lives is no part of it

    local, remote = tmp_path / "local.parquet", tmp_path / "remote.parquet"
    first, second = _run(src, local, sim), _run(url, remote, sim)
    assert first.exit_code == second.exit_code == 1, second.stderr   # bad rows: exit 1
    assert _rows(local) == _rows(remote)
    assert _bad_rows(second.stderr) == [
        (where.replace(str(src), url), field, problem.replace(str(src), url))
        for where, field, problem in _bad_rows(first.stderr)]
    assert [w for w, _, _ in _bad_rows(second.stderr)] == [f"{url}:4", f"{url}:6"]

    folder = tmp_path / "parts"
    folder.mkdir()
    pq.write_table(pa.table({"id": ["a", "b"], "prompt": ["one", None]}), folder / "0.parquet")
    pq.write_table(pa.table({"id": ["c"], "prompt": ["three"]}), folder / "1.parquet")
    (folder / "_SUCCESS").write_text("")
    for part in ("0.parquet", "1.parquet", "_SUCCESS"):
        store.put(f"parts/{part}", folder / part)
    local, remote = tmp_path / "plocal.parquet", tmp_path / "premote.parquet"
    base = f"{store.scheme}://{store.bucket}/parts/"
    first, second = _run(folder, local, sim), _run(base, remote, sim)
    assert first.exit_code == second.exit_code == 1, second.stderr
    assert _rows(local) == _rows(remote)
    assert [w for w, _, _ in _bad_rows(second.stderr)] == [f"{base}0.parquet:2"]


def test_an_s3_jsonl_file_and_parquet_folder_run_as_their_local_copies(
        tmp_path: Path, sim: SimulatorThread, s3: Bucket) -> None:  # noqa: F811
    check_runs_as_local_copies(tmp_path, sim, s3)


def test_a_resume_of_an_s3_input_sends_nothing_twice(
        tmp_path: Path, make_sim: Any, s3: Bucket) -> None:  # noqa: F811
    sim = make_sim(latency_ms=150)
    rows = prompts(200)
    url = s3.put("in.jsonl", write_jsonl(tmp_path / "in.jsonl", rows))
    out = tmp_path / "out.parquet"
    proc = _start(sim, url, out, "--concurrency", "8")
    _wait_for_progress(out, proc, minimum=16)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 143, stderr
    answered = len(read_output(out)) if out.exists() else None
    assert answered is None   # interrupted: no final output yet
    result = _run(url, out, sim, "--concurrency", "8")
    assert result.exit_code == 0, result.stderr
    assert sim.stats.resent_after_ok == 0
    assert sim.stats.requests == len(rows)
    _assert_exactly_once(out, [r["id"] for r in rows])


def test_a_missing_s3_object_or_bucket_or_an_s3_output_exits_2_naming_the_url(
        tmp_path: Path, sim: SimulatorThread, s3: Bucket) -> None:  # noqa: F811
    url = s3.put("in.jsonl", write_jsonl(tmp_path / "in.jsonl", prompts(2)))
    for missing in (f"s3://{s3.bucket}/nope.jsonl", "s3://no-such-bucket-here/in.jsonl"):
        result = _run(missing, tmp_path / "out.parquet", sim)
        assert result.exit_code == 2, result.stderr
        assert missing in result.stderr and "no such file" in result.stderr
        assert "Traceback" not in result.stderr
    result = _run(url, f"s3://{s3.bucket}/out.parquet", sim)
    assert result.exit_code == 2, result.stderr
    assert "must be a local path" in result.stderr and "Traceback" not in result.stderr
    assert sim.stats.requests == 0


def test_a_job_file_may_name_an_s3_input(tmp_path: Path, sim: SimulatorThread,
                                         s3: Bucket) -> None:  # noqa: F811
    url = s3.put("in.jsonl", write_jsonl(tmp_path / "in.jsonl", prompts(3)))
    job = tmp_path / "job.toml"
    job.write_text(f'input = "{url}"\noutput = "out/answers.parquet"\nmodel = "gpt-4o-mini"\n')
    result = run_cli("run", job, "--base-url", sim.base_url, "--no-progress")
    assert result.exit_code == 0, result.stderr
    assert len(read_output(tmp_path / "out" / "answers.parquet")) == 3


def check_dry_run_as_local_copy(tmp_path: Path, store: Bucket) -> None:
    """``batcher estimate`` of a JSONL object (with a bad row) reports as its local copy: the
    one-pass dry run reads it through the same location layer as the reader."""
    lines = [json.dumps(r) for r in prompts(20)] + ["{not json"]
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(lines) + "\n")
    url = store.put("dry/in.jsonl", src)
    local = run_cli("estimate", src, "--model", "gpt-4o-mini", "--json")
    remote = run_cli("estimate", url, "--model", "gpt-4o-mini", "--json")
    assert local.exit_code == remote.exit_code == 1, remote.stderr   # a bad row: exit 1
    mine, theirs = json.loads(local.stdout), json.loads(remote.stdout)
    assert theirs["rows"] == mine["rows"] == 20 and theirs["bad_rows"] == mine["bad_rows"] == 1
    assert theirs["input_tokens"] == mine["input_tokens"] > 0


def test_a_dry_run_of_an_s3_jsonl_file_reports_as_its_local_copy(
        tmp_path: Path, s3: Bucket) -> None:  # noqa: F811
    check_dry_run_as_local_copy(tmp_path, s3)
