"""Structured output end to end (--response-format, --flatten): the CLI against the simulator:
retries, errors, the parsed and flattened columns, job files, resume, cache and estimates."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from jsonschema import Draft202012Validator

from batcher.io.flatten import arrow_type
from batcher.schema import ANTHROPIC_TOOL_PROMPT_TOKENS
from batcher.simulate import SimulatorThread
from batcher.tokens import count_text, request_input_tokens
from batcher.types import RequestContext
from tests.conftest import ROOT, read_output, run_cli, write_jsonl
from tests.golden_cases import make_row
from tests.structured_cases import EXAMPLE_SCHEMA, SCHEMA, TICKET

# --- flatten types -----------------------------------------------------------------------


def test_arrow_types_come_from_the_schema() -> None:
    assert arrow_type({"type": "string"}) == pa.string()
    assert arrow_type({"type": "integer"}) == pa.int64()
    assert arrow_type({"type": "number"}) == pa.float64()
    assert arrow_type({"type": "boolean"}) == pa.bool_()
    assert arrow_type({"type": ["integer", "null"]}) == pa.int64()
    assert arrow_type({"enum": ["a", "b"]}) == pa.string()
    assert arrow_type({"type": "array", "items": {"type": "number"}}) == pa.list_(pa.float64())
    assert arrow_type({"type": "object", "properties": {"x": {"type": "boolean"}}}) == \
        pa.struct([pa.field("x", pa.bool_())])
    # no single type: the value's JSON text, never lost
    assert arrow_type({"anyOf": [{"type": "string"}, {"type": "integer"}]}) == pa.string()
    assert arrow_type({"type": "object"}) == pa.string()


# --- estimates ---------------------------------------------------------------------------


def test_estimate_counts_the_schema_where_each_vendor_bills_it() -> None:
    row = make_row({"id": "r", "shape": "prompt", "prompt": "Route: refund please"})
    for endpoint, model, extra in (
            ("chat", "gpt-4o-mini",
             count_text(orjson.dumps(SCHEMA.openai_response_format(),
                                     option=orjson.OPT_SORT_KEYS).decode(), "gpt-4o-mini")),
            ("anthropic", "claude-sonnet-4-5", None),
            ("gemini", "gemini-2.5-flash", None)):
        plain = RequestContext(base_url="http://h/v1", model=model)
        with_schema = RequestContext(base_url="http://h/v1", model=model, response_schema=SCHEMA)
        added = (request_input_tokens(row, with_schema, endpoint)
                 - request_input_tokens(row, plain, endpoint))
        if extra is not None:
            assert added == extra  # OpenAI models: exact, the response_format's own tokens
        else:
            assert added > 50
        if endpoint == "anthropic":
            assert added > ANTHROPIC_TOOL_PROMPT_TOKENS


def test_estimate_cli_reports_more_input_tokens_with_a_schema() -> None:
    args = ["estimate", ROOT / "examples" / "classify.jsonl", "--model", "gpt-4o-mini", "--json"]
    plain = orjson.loads(run_cli(*args).stdout)
    schema = orjson.loads(run_cli(*args, "--response-format", EXAMPLE_SCHEMA).stdout)
    assert schema["input_tokens"] > plain["input_tokens"] + 8 * 100


# --- end to end: the CLI against the simulator --------------------------------------------


def _input(tmp_path: Path, n: int = 6) -> Path:
    return write_jsonl(tmp_path / "in.jsonl",
                       [{"id": f"t{i}", "prompt": f"ticket number {i}", "expected": "bug"}
                        for i in range(n)])


def _schema_file(tmp_path: Path, schema: dict[str, Any] | None = None) -> Path:
    path = tmp_path / "ticket.json"
    path.write_bytes(orjson.dumps(schema or TICKET))
    return path


def _base(sim: SimulatorThread, endpoint: str) -> str:
    return sim.base_url.replace("/v1", "/v1beta") if endpoint == "gemini" else sim.base_url


def _run(src: Path, out: Path, sim: SimulatorThread, *extra: str | Path,
         endpoint: str = "chat") -> Any:
    return run_cli("run", src, "-o", out, "--base-url", _base(sim, endpoint), "--model", "m",
                   "--endpoint", endpoint, "--no-progress", *extra)


@pytest.mark.parametrize(("endpoint", "stream"), [
    ("chat", False), ("chat", True), ("anthropic", False), ("anthropic", True),
    ("gemini", False)])
def test_every_vendor_gets_parsed_answers_that_fit(tmp_path: Path, sim: SimulatorThread,
                                                   endpoint: str, stream: bool) -> None:
    out = tmp_path / "out.parquet"
    extra = ["-p", "stream=true"] if stream else []
    result = _run(_input(tmp_path), out, sim, "--response-format", _schema_file(tmp_path),
                  *extra, endpoint=endpoint)
    assert result.exit_code == 0, result.stderr
    validator = Draft202012Validator(TICKET)
    rows = read_output(out)
    assert len(rows) == 6
    for row in rows:
        assert row["status"] == "ok" and row["finish_reason"] == "stop"
        parsed = orjson.loads(row["parsed"])
        assert validator.is_valid(parsed)
        assert orjson.loads(row["output"]) == parsed  # the raw text is kept as it came
        assert row["expected"] == "bug"  # input columns still carried through
    assert sim.stats.requests == 6


def test_broken_answers_are_sent_again_and_counted_in_attempts(
        tmp_path: Path, make_sim: Any) -> None:
    sim = make_sim(rate_bad_schema=0.5, seed=3)
    out = tmp_path / "out.parquet"
    result = _run(_input(tmp_path, 12), out, sim, "--response-format", _schema_file(tmp_path),
                  "--concurrency", "1", "--max-attempts", "10")
    assert result.exit_code == 0, result.stderr
    rows = read_output(out)
    assert {r["status"] for r in rows} == {"ok"}
    broken = sim.stats.faults["bad_schema"]
    assert broken > 0
    assert sum(r["attempts"] for r in rows) == 12 + broken == sim.stats.requests
    summary = orjson.loads((tmp_path / "out.summary.json").read_bytes())
    assert summary["ok"] == 12


@pytest.mark.parametrize("endpoint", ["chat", "anthropic", "gemini"])
def test_attempts_run_out_then_error_type_schema_with_the_validators_message(
        tmp_path: Path, make_sim: Any, endpoint: str) -> None:
    sim = make_sim(rate_bad_schema=1.0)
    out = tmp_path / "out.parquet"
    result = _run(_input(tmp_path, 4), out, sim, "--response-format", _schema_file(tmp_path),
                  "--max-attempts", "3", endpoint=endpoint)
    assert result.exit_code == 1, result.stderr
    rows = read_output(out)
    assert sim.stats.requests == 4 * 3
    for row in rows:
        assert (row["status"], row["error_type"], row["attempts"]) == ("error", "schema", 3)
        assert ("not valid JSON" in row["error"]
                or "does not fit the schema" in row["error"]), row["error"]
        assert row["output"]  # the last answer, to see what did not fit
        assert row["parsed"] is None
    summary = orjson.loads((tmp_path / "out.summary.json").read_bytes())
    assert summary["errors_by_type"] == {"schema": 4}


@pytest.mark.parametrize(("endpoint", "stream"), [
    ("chat", False), ("chat", True), ("anthropic", False), ("anthropic", True),
    ("gemini", False)])
def test_json_cut_by_the_token_limit_is_reported_as_cut_and_sent_once(
        tmp_path: Path, sim: SimulatorThread, endpoint: str, stream: bool) -> None:
    out = tmp_path / "out.parquet"
    result = _run(_input(tmp_path, 3), out, sim, "--response-format", _schema_file(tmp_path),
                  "-p", "max_tokens=6", *(["-p", "stream=true"] if stream else []),
                  endpoint=endpoint)
    assert result.exit_code == 1, result.stderr
    assert sim.stats.requests == 3  # not retried: the same limit would cut it again
    for row in read_output(out):
        assert (row["status"], row["error_type"], row["finish_reason"]) == \
            ("error", "schema", "length")
        assert "token limit cut the answer" in row["error"] and "max_tokens" in row["error"]


def test_flatten_adds_one_typed_column_per_property(tmp_path: Path,
                                                    sim: SimulatorThread) -> None:
    out = tmp_path / "out.parquet"
    result = _run(ROOT / "examples" / "classify.jsonl", out, sim,
                  "--response-format", EXAMPLE_SCHEMA, "--flatten")
    assert result.exit_code == 0, result.stderr
    table = pq.read_table(out)
    schema = table.schema
    assert schema.field("category").type == pa.string()
    assert schema.field("urgency").type == pa.int64()
    assert schema.field("confidence").type == pa.float64()
    assert schema.field("needs_human").type == pa.bool_()
    assert schema.field("products").type == pa.list_(pa.string())
    assert schema.field("contact").type == pa.struct([pa.field("wants_callback", pa.bool_()),
                                                      pa.field("language", pa.string())])
    for row in table.to_pylist():
        parsed = orjson.loads(row["parsed"])
        assert {k: row[k] for k in parsed} == parsed
    # and it reads straight into a dataframe-like column
    assert set(table.column("category").to_pylist()) <= {
        "billing", "bug", "feature_request", "account", "other"}


def test_flatten_keeps_clashing_names_apart_and_rebuilds_on_every_final_write(
        tmp_path: Path, make_sim: Any) -> None:
    sim = make_sim(rate_bad_schema=1.0)
    schema = {"type": "object", "properties": {"id": {"type": "integer"},
                                               "expected": {"type": "string"},
                                               "score": {"type": "number"}},
              "required": ["id", "expected", "score"], "additionalProperties": False}
    src, path = _input(tmp_path, 3), _schema_file(tmp_path, schema)
    out = tmp_path / "out.parquet"
    first = _run(src, out, sim, "--response-format", path, "--flatten", "--max-attempts", "1")
    assert first.exit_code == 1
    names = pq.read_schema(out).names
    assert names.count("id") == 1 and "parsed_id" in names
    assert "expected" in names and "parsed_expected" in names  # an input column wins its name
    assert pq.read_table(out).column("parsed_id").to_pylist() == [None] * 3  # error rows
    good = SimulatorThread(sim.config.__class__())
    with good:
        second = run_cli("run", src, "-o", out, "--base-url", good.base_url, "--model", "m",
                         "--no-progress", "--response-format", path, "--flatten",
                         "--retry-failed")
    assert second.exit_code == 0, second.stderr
    table = pq.read_table(out)
    assert table.schema.names == names  # rebuilt, not added twice
    assert all(isinstance(v, int) for v in table.column("parsed_id").to_pylist())
    third = run_cli("run", src, "-o", out, "--base-url", good.base_url, "--model", "m",
                    "--no-progress", "--response-format", path)
    assert third.exit_code == 0, third.stderr
    assert "parsed_id" not in pq.read_schema(out).names  # no --flatten: no flattened columns


def test_a_changed_schema_does_not_silently_resume(tmp_path: Path,
                                                   sim: SimulatorThread) -> None:
    src, out = _input(tmp_path, 2), tmp_path / "out.parquet"
    assert _run(src, out, sim, "--response-format", _schema_file(tmp_path)).exit_code == 0
    changed = dict(TICKET, properties={**TICKET["properties"], "urgency": {"type": "integer"}})
    result = _run(src, out, sim, "--response-format", _schema_file(tmp_path, changed))
    assert result.exit_code == 2
    assert "response_format" in result.stderr
    # without the option the fingerprint is as before: older states still resume
    plain_out = tmp_path / "plain.parquet"
    assert _run(src, plain_out, sim).exit_code == 0
    meta = orjson.loads((tmp_path / "plain.parquet.state" / "meta.json").read_bytes())
    assert "response_format" not in meta["fingerprint"]


@pytest.mark.parametrize(("args", "message"), [
    (["--endpoint", "embeddings"], "takes no schema"),
    (["-p", 'response_format={"type":"json_object"}'], "give one of them"),
    (["--endpoint", "gemini", "--response-format-oneof"], "Gemini's schema subset"),
])
def test_unusable_combinations_are_exit_2_before_anything_is_sent(
        tmp_path: Path, sim: SimulatorThread, args: list[str], message: str) -> None:
    path = _schema_file(tmp_path)
    if "--response-format-oneof" in args:
        args = [a for a in args if a != "--response-format-oneof"]
        path = _schema_file(tmp_path, {"type": "object", "properties": {
            "a": {"oneOf": [{"type": "string"}, {"type": "integer"}]}}})
    result = run_cli("run", _input(tmp_path), "-o", tmp_path / "out.parquet", "--base-url",
                     sim.base_url, "--model", "m", "--no-progress", "--response-format", path,
                     *args)
    assert result.exit_code == 2, result.stderr
    assert message in result.stderr
    assert sim.stats.requests == 0


def test_flatten_without_a_schema_is_exit_2(tmp_path: Path, sim: SimulatorThread) -> None:
    result = _run(_input(tmp_path), tmp_path / "out.parquet", sim, "--flatten")
    assert result.exit_code == 2 and "needs response_format" in result.stderr


def test_job_file_response_format_is_relative_to_the_job_file(
        tmp_path: Path, sim: SimulatorThread, monkeypatch: pytest.MonkeyPatch) -> None:
    jobs = tmp_path / "jobs"
    (jobs / "schemas").mkdir(parents=True)
    _input(jobs)
    (jobs / "schemas" / "ticket.json").write_bytes(orjson.dumps(TICKET))
    (jobs / "label.toml").write_text(
        'input = "in.jsonl"\noutput = "out/{job}.parquet"\nmodel = "m"\n'
        f'base_url = "{sim.base_url}"\nresponse_format = "schemas/ticket.json"\n'
        "flatten = true\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = run_cli("run", jobs / "label.toml", "--no-progress")
    assert result.exit_code == 0, result.stderr
    table = pq.read_table(jobs / "out" / "label.parquet")
    assert table.schema.field("urgency").type == pa.int64()
    assert set(table.column("status").to_pylist()) == {"ok"}


def test_cache_serves_schema_answers_and_a_changed_schema_misses(
        tmp_path: Path, sim: SimulatorThread) -> None:
    src, cache = _input(tmp_path, 3), tmp_path / "cache"
    args = ["--cache", str(cache), "-p", "temperature=0"]
    path = _schema_file(tmp_path)
    assert _run(src, tmp_path / "a.parquet", sim, "--response-format", path, *args).exit_code == 0
    assert _run(src, tmp_path / "b.parquet", sim, "--response-format", path, *args).exit_code == 0
    assert sim.stats.requests == 3
    rows = read_output(tmp_path / "b.parquet")
    assert all(r["cached"] and r["parsed"] for r in rows)
    other = _schema_file(tmp_path, dict(TICKET, title="other"))
    assert _run(src, tmp_path / "c.parquet", sim, "--response-format", other,
                *args).exit_code == 0
    assert sim.stats.requests == 6


def test_the_simulator_option_is_on_the_command_line() -> None:
    result = run_cli("simulate", "--help")
    assert "--rate-bad-schema" in result.stdout
    assert os.path.exists(EXAMPLE_SCHEMA)


def test_a_missing_schema_file_is_exit_2_for_run_and_estimate(tmp_path: Path,
                                                              sim: SimulatorThread) -> None:
    missing = tmp_path / "nope.json"
    src = _input(tmp_path)
    ran = _run(src, tmp_path / "out.parquet", sim, "--response-format", missing)
    estimated = run_cli("estimate", src, "--model", "m", "--response-format", missing)
    for result in (ran, estimated):
        assert result.exit_code == 2
        assert "cannot read" in result.stderr and "nope.json" in result.stderr
    assert sim.stats.requests == 0


def test_answers_that_never_fit_do_not_make_the_server_look_down(
        tmp_path: Path, make_sim: Any) -> None:
    # The server answers every request (200s that break the schema) for longer than
    # server_down_after: rows fail as schema errors, the job is not aborted as "down".
    sim = make_sim(rate_bad_schema=1.0)
    _input(tmp_path, 4)
    _schema_file(tmp_path)
    job = tmp_path / "job.toml"
    job.write_text(f'input = "in.jsonl"\noutput = "out.parquet"\nmodel = "m"\n'
                   f'base_url = "{sim.base_url}"\nresponse_format = "ticket.json"\n'
                   "server_down_after = 0.2\nmax_attempts = 4\nconcurrency = 1\n")
    result = run_cli("run", job, "--no-progress")
    assert result.exit_code == 1, result.stderr
    summary = orjson.loads((tmp_path / "out.summary.json").read_bytes())
    assert summary["outcome"] == "finished" and summary["errors_by_type"] == {"schema": 4}
