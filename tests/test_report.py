"""`batcher report` and job runs' automatic reports, end to end against the simulator."""

from __future__ import annotations

import html
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batcher.io.writer import RESULT_SCHEMA
from batcher.simulate import SimulatorThread
from tests.conftest import ROOT, run_cli, write_jsonl

CHART_IDS = re.compile(r'<figure class="chart" id="chart-([\w-]+)">')


def assert_offline(page: str) -> None:
    """Nothing the page would fetch: no script, no stylesheet link, no external URL."""
    assert "<script" not in page and "<img" not in page and "<iframe" not in page
    assert re.findall(r"<link[^>]*>", page) == ['<link rel="icon" href="data:,">']
    assert not re.search(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//""", page, re.I)
    assert not re.search(r"url\(\s*['\"]?(?:https?:)?//", page, re.I)
    assert "@import" not in page


def eval_rows(n: int) -> list[dict[str, object]]:
    return [{"id": f"q{i}", "prompt": f"What is {i}+0?", "expected": str(i)} for i in range(n)]


def test_report_on_a_real_run(tmp_path: Path, make_sim: Callable[..., SimulatorThread]) -> None:
    sim = make_sim(latency_ms=5, jitter_ms=4, fail_rate=0.15)
    src = write_jsonl(tmp_path / "in.jsonl", eval_rows(120))
    out = tmp_path / "answers.parquet"
    ran = run_cli("run", src, "-o", out, "--base-url", sim.base_url, "--model", "gpt-4o-mini",
                  "--max-attempts", "2", "--no-progress")
    assert ran.exit_code in (0, 1), ran.stderr
    assert not (tmp_path / "answers.report.html").exists()  # only job runs write one by themselves

    result = run_cli("report", out)
    assert result.exit_code == 0, result.stderr
    page_path = tmp_path / "answers.report.html"
    assert result.stdout.strip() == str(page_path)
    page = page_path.read_text()
    assert_offline(page)
    charts = CHART_IDS.findall(page)
    assert {"0-throughput", "0-latency", "0-tokens", "0-cost", "0-finish"} <= set(charts)
    table = pq.read_table(out)
    errors = table.column("status").to_pylist().count("error")
    assert ("0-errors" in charts) == (errors > 0)
    assert f"{table.num_rows - errors:,} ok, {errors:,} error" in page
    assert "gpt-4o-mini" in page and "finished (exit" in page
    assert "exact match" in page  # the input's expected column is carried to the output


def test_report_of_several_outputs_is_one_comparison_page(
        tmp_path: Path, sim: SimulatorThread) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", eval_rows(20))
    outs = []
    for model in ("model-a", "model-b"):
        out = tmp_path / f"{model}.parquet"
        ran = run_cli("run", src, "-o", out, "--base-url", sim.base_url, "--model", model,
                      "--no-progress")
        assert ran.exit_code == 0, ran.stderr
        outs.append(out)
    dest = tmp_path / "cmp" / "both.html"
    result = run_cli("report", *outs, "-o", dest, "--expected-column", "expected")
    assert result.exit_code == 0, result.stderr
    page = dest.read_text()
    assert "Side by side" in page
    charts = set(CHART_IDS.findall(page))
    assert {"compare-latency", "compare-errors", "compare-accuracy", "0-throughput",
            "1-throughput"} <= charts
    assert page.index("model-a") < page.index("model-b")


def test_job_matrix_writes_reports_beside_summaries_unless_no_report(
        tmp_path: Path, sim: SimulatorThread) -> None:
    out = tmp_path / "{job}-{model}.parquet"
    env = {"BATCHER_BASE_URL": sim.base_url}
    job = ROOT / "jobs" / "nightly_eval.toml"
    result = run_cli("run", job, "-o", out, "--rpm", "100000", env=env)
    assert result.exit_code == 0, result.stderr
    written = [json.loads(line)["path"] for line in result.stderr.splitlines()
               if json.loads(line)["event"] == "report_written"]
    expected = [tmp_path / f"nightly_eval-{m}.report.html" for m in ("gpt-4o-mini", "gpt-4.1-nano")]
    assert written == [str(p) for p in [*expected, tmp_path / "nightly_eval.comparison.report.html"]]
    for page in expected:
        assert page.with_name(page.name.replace(".report.html", ".summary.json")).exists()
        assert "exact match" in page.read_text()
    comparison = (tmp_path / "nightly_eval.comparison.report.html").read_text()
    assert "Run report: nightly_eval" in comparison and "gpt-4.1-nano" in comparison

    for page in [*expected, tmp_path / "nightly_eval.comparison.report.html"]:
        page.unlink()
    again = run_cli("run", job, "-o", out, "--rpm", "100000", "--no-report", "--restart", env=env)
    assert again.exit_code == 0, again.stderr
    assert not list(tmp_path.glob("*.html"))


def test_report_on_a_job_file(tmp_path: Path, sim: SimulatorThread) -> None:
    write_jsonl(tmp_path / "in.jsonl", eval_rows(5))
    job = tmp_path / "two.toml"
    job.write_text('input = "in.jsonl"\noutput = "out/{model}.parquet"\nmodels = ["a", "b"]\n'
                   f'base_url = "{sim.base_url}"\nno_report = true\n')
    assert run_cli("run", job, "--no-progress").exit_code == 0
    assert not list(tmp_path.rglob("*.html"))  # no_report = true in the file
    result = run_cli("report", job)
    assert result.exit_code == 0, result.stderr
    pages = [Path(line) for line in result.stdout.split()]
    assert pages == [tmp_path / "out" / "a.report.html", tmp_path / "out" / "b.report.html",
                     tmp_path / "out" / "two.comparison.report.html"]
    assert all(p.exists() for p in pages)


def _output_with_error(path: Path, message: str) -> Path:
    fields = [f for f in RESULT_SCHEMA if f.name != "embedding"]
    rows = [{"id": "r1", "status": "error", "error": message, "error_type": "bad_request",
             "http_status": 400, "model": "m"}]
    pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema(fields)), path)
    return path


def test_report_masks_keys_from_the_environment(tmp_path: Path) -> None:
    key = "sk-test-0123456789abcdef"
    out = _output_with_error(tmp_path / "o.parquet", f"invalid key {key} <b>bold</b>")
    result = run_cli("report", out, env={"OPENAI_API_KEY": key})
    assert result.exit_code == 0, result.stderr
    page = (tmp_path / "o.report.html").read_text()
    assert key not in page and "invalid key *** &lt;b&gt;bold&lt;/b&gt;" in page


def test_report_usage_errors_exit_2(tmp_path: Path) -> None:
    missing = run_cli("report", tmp_path / "nope.parquet")
    assert missing.exit_code == 2 and "no such output" in missing.stderr
    (tmp_path / "junk.parquet").write_text("not parquet")
    junk = run_cli("report", tmp_path / "junk.parquet")
    assert junk.exit_code == 2 and "not a readable Parquet output" in junk.stderr
    out = _output_with_error(tmp_path / "o.parquet", "boom")
    gold = run_cli("report", out, "--expected-column", "gold")
    assert gold.exit_code == 2 and "--expected-column 'gold'" in gold.stderr
    two = run_cli("report", out, out, out, "-o", tmp_path / "x.html")
    assert two.exit_code == 0, two.stderr  # several outputs, one page


def test_report_without_the_extra_names_the_install_command(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "vl_convert", None)  # import fails as if not installed
    out = _output_with_error(tmp_path / "o.parquet", "boom")
    result = run_cli("report", out)
    assert result.exit_code == 2
    assert "pip install 'batcher[report]'" in result.stderr
    assert not (tmp_path / "o.report.html").exists()


def test_an_interrupted_run_shows_its_outcome_and_resume_command(tmp_path: Path) -> None:
    key = "sk-live-abcdef0123456789"
    out = _output_with_error(tmp_path / "o.parquet", "boom")
    (tmp_path / "o.summary.json").write_text(json.dumps({
        "job": "nightly", "input": "in.jsonl", "started_at": "2026-03-01T08:00:00.000Z",
        "finished_at": "2026-03-01T08:10:00.000Z", "duration_s": 600.0,
        "outcome": "interrupted", "exit_code": 130, "message": None, "skipped": 2,
        "resumed": 10, "sent_this_run": 5,
        "resume_command": f"batcher run in.jsonl -o o.parquet --header 'X-Key: {key}'"}))
    result = run_cli("report", out, env={"OPENAI_API_KEY": key})
    assert result.exit_code == 0, result.stderr
    page = (tmp_path / "o.report.html").read_text()
    assert "Run report: nightly" in page and "interrupted (exit 130)" in page
    assert "2 bad input rows skipped" in page and "600.0 s" in page
    assert "Resume with:" in page and "X-Key: ***" in page and key not in page


def test_hostile_labels_are_escaped_and_masked_in_charts_too(tmp_path: Path) -> None:
    key = "sk-in-a-model-name-0123456789"
    fields = [f for f in RESULT_SCHEMA if f.name != "embedding"]
    rows = [{"id": "<i>1</i>", "status": "ok", "model": "<script>alert(1)</script>",
             "finish_reason": "<b>stop</b>", "latency_ms": 5.0},
            {"id": "2", "status": "ok", "model": f"m-{key}", "latency_ms": 7.0},
            {"id": "3", "status": "error", "error_type": "</svg><script>x</script>",
             "error": "e", "model": "m"}]
    out = tmp_path / "o.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema(fields)), out)
    result = run_cli("report", out, env={"OPENAI_API_KEY": key})
    assert result.exit_code == 0, result.stderr
    page = (tmp_path / "o.report.html").read_text()
    assert_offline(page)
    assert key not in page and "m-***" in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_report_on_a_run_stopped_by_its_budget_reads_the_state(
        tmp_path: Path, sim: SimulatorThread) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", eval_rows(200))
    out = tmp_path / "o.parquet"
    ran = run_cli("run", src, "-o", out, "--base-url", sim.base_url, "--model", "gpt-4o-mini",
                  "--max-cost", "0.004", "--concurrency", "1", "--no-progress")
    assert ran.exit_code == 3, ran.stderr
    assert not out.exists()  # the answers so far are in o.parquet.state/
    result = run_cli("report", out)
    assert result.exit_code == 0, result.stderr
    page = (tmp_path / "o.report.html").read_text()
    summary = json.loads((tmp_path / "o.summary.json").read_text())
    assert summary["ok"] > 0 and f"{summary['ok']:,} ok, 0 error" in page
    assert "aborted (exit 3): budget reached" in page
    assert "Resume with:" in page and html.escape(summary["resume_command"]) in page
