"""The repo's jobs/ run end to end through the CLI against the simulator; job-file wiring."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from batcher.simulate import SimulatorThread
from tests.conftest import ROOT, prompts, run_cli, write_jsonl

JOBS = ROOT / "jobs"


def test_nightly_eval_matrix_runs_each_model_with_expected_beside_output(
        tmp_path: Path, sim: SimulatorThread) -> None:
    out = tmp_path / "{job}-{model}.parquet"
    result = run_cli("run", JOBS / "nightly_eval.toml", "-o", out,
                     env={"BATCHER_BASE_URL": sim.base_url})
    assert result.exit_code == 0, result.stderr
    events = [json.loads(line) for line in result.stderr.splitlines()]
    assert {e["job"] for e in events} == {"nightly_eval"}       # json logs from the file
    assert len({e["run_id"] for e in events}) == 2
    expected_rows = sum(1 for _ in (ROOT / "examples" / "eval.jsonl").open())
    for model in ("gpt-4o-mini", "gpt-4.1-nano"):
        path = tmp_path / f"nightly_eval-{model}.parquet"
        table = pq.read_table(path)
        assert table.num_rows == expected_rows
        assert set(table.column("model").to_pylist()) == {model}
        assert table.column("expected").null_count == 0
        summary = json.loads((tmp_path / f"nightly_eval-{model}.summary.json").read_text())
        assert summary["job"] == "nightly_eval" and summary["model"] == model
        assert summary["ok"] == expected_rows and summary["exit_code"] == 0
    assert sim.stats.requests == 2 * expected_rows



def test_classify_reviews_job_over_parquet(tmp_path: Path, sim: SimulatorThread) -> None:
    out = tmp_path / "reviews.parquet"
    result = run_cli("run", JOBS / "classify_reviews.toml", "-o", out, "--no-progress",
                     env={"BATCHER_BASE_URL": sim.base_url})
    assert result.exit_code == 0, result.stderr
    rows = pq.read_table(out).to_pylist()
    source = pq.read_table(ROOT / "examples" / "reviews.parquet").to_pylist()
    assert sorted(r["id"] for r in rows) == sorted(str(r["review_id"]) for r in source)
    assert all(r["status"] == "ok" and r["review"] for r in rows)
    # max_tokens = 4 from the file's [params]: the simulator's longer answers are cut
    assert {r["finish_reason"] for r in rows} == {"length"}


def test_job_file_matrix_exit_code_is_the_worst(
        tmp_path: Path, make_sim: Callable[..., SimulatorThread]) -> None:
    sim = make_sim(script=("400",))
    src = write_jsonl(tmp_path / "in.jsonl", prompts(3))
    job = tmp_path / "two.toml"
    job.write_text(f'input = "in.jsonl"\noutput = "out-{{model}}.parquet"\n'
                   f'models = ["a", "b"]\nbase_url = "{sim.base_url}"\nconcurrency = 1\n')
    result = run_cli("run", job, "--no-progress")
    assert result.exit_code == 1                   # one row of model a failed with a 400
    assert (tmp_path / "out-a.parquet").exists() and (tmp_path / "out-b.parquet").exists()
    b = json.loads((tmp_path / "out-b.summary.json").read_text())
    assert b["exit_code"] == 0
    assert src.exists()


def test_job_file_errors_name_the_key(tmp_path: Path) -> None:
    job = tmp_path / "bad.toml"
    job.write_text('input = "in.jsonl"\noutput = "o.parquet"\nconcurency = 4\n')
    result = run_cli("run", job)
    assert result.exit_code == 2
    assert "concurency" in result.stderr and "concurrency" in result.stderr
    job.write_text('input = "in.jsonl"\noutput = "o.parquet"\napi_key = "sk-live-abcdef123"\n')
    result = run_cli("run", job)
    assert result.exit_code == 2
    assert "sk-live" not in result.stderr and "api_key_env" in result.stderr


def test_estimate_and_dry_run_send_nothing(tmp_path: Path, sim: SimulatorThread) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", prompts(50))
    result = run_cli("estimate", src, "--model", "gpt-4o-mini", "--json", "--rpm", "60",
                     "-p", "max_tokens=100")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["rows"] == 50
    assert report["output_tokens_max"] == 5000
    assert report["input_tokens"] > 50
    assert report["cost_usd_max"] > report["cost_usd_input"] > 0
    assert report["seconds_estimate"] >= 49
    dry = run_cli("run", src, "-o", tmp_path / "o.parquet", "--base-url", sim.base_url,
                  "--model", "gpt-4o-mini", "--dry-run", "--json", "-p", "max_tokens=100")
    assert dry.exit_code == 0
    assert json.loads(dry.stdout)["rows"] == 50
    assert sim.stats.requests == 0
    assert not (tmp_path / "o.parquet").exists()
    text = run_cli("estimate", src, "--model", "some-unknown-model")
    assert text.exit_code == 0 and "unknown" in text.stdout.lower()


def test_status_of_a_job_file_reports_each_output(tmp_path: Path, sim: SimulatorThread) -> None:
    write_jsonl(tmp_path / "in.jsonl", prompts(4))
    job = tmp_path / "eval.toml"
    job.write_text(f'input = "in.jsonl"\noutput = "out/{{job}}-{{date}}-{{model}}.parquet"\n'
                   f'models = ["m1", "m2"]\nbase_url = "{sim.base_url}"\n')
    (tmp_path / "out").mkdir()
    assert run_cli("run", job, "--no-progress").exit_code == 0
    result = run_cli("status", job, "--json")
    assert result.exit_code == 0
    infos = json.loads(result.stdout)
    assert len(infos) == 2
    assert all(info["ok"] == 4 and info["pending"] == 0 for info in infos)
    text = run_cli("status", job)
    assert text.stdout.count("eval-") >= 2


def test_every_job_file_runs_from_a_fresh_clone_with_its_own_outputs(
        tmp_path: Path, sim: SimulatorThread) -> None:
    """As a new user's cron line would: a fresh clone, each job's own output template (whose
    folders do not exist yet), no -o."""
    import shutil
    import subprocess

    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs git and a git checkout to clone")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True, timeout=120)
    jobs = sorted((clone / "jobs").glob("*.toml"))
    assert jobs, "the clone has no job files"
    for job in jobs:
        result = run_cli("run", job, "--no-progress", env={"BATCHER_BASE_URL": sim.base_url})
        assert result.exit_code == 0, f"{job.name}: {result.stderr}"
    written = sorted(p.relative_to(clone) for p in clone.rglob("*.parquet")
                     if p.parent.name != "examples" and ".state" not in str(p))
    assert len(written) >= len(jobs), written
    assert all(p.parts[0] == "out" for p in written), written
