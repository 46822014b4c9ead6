"""`batcher run` end to end through the CLI against the simulator on 127.0.0.1."""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from batcher.simulate import SimulatorThread
from tests.conftest import prompts, read_output, run_cli, write_jsonl

RESULT_COLUMNS = [
    "id", "status", "output", "finish_reason", "model", "prompt_tokens", "completion_tokens",
    "total_tokens", "cached_tokens", "reasoning_tokens", "cost_usd", "latency_ms", "attempts",
    "http_status", "error", "response_id", "completed_at",
]


def _run(sim: SimulatorThread, input: Path, output: Path, *extra: str):  # type: ignore[no-untyped-def]
    return run_cli("run", input, "-o", output, "--base-url", sim.base_url,
                   "--model", "gpt-4o-mini", "--no-progress", *extra)


def test_prompt_rows_become_one_answer_each_with_usage_and_carried_columns(
        tmp_path: Path, sim: SimulatorThread) -> None:
    rows = [dict(r, expected=f"answer {i}") for i, r in enumerate(prompts(40))]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.parquet"
    result = _run(sim, src, out)
    assert result.exit_code == 0, result.stderr
    table = pq.read_table(out)
    for column in RESULT_COLUMNS:
        assert column in table.column_names, column
    got = {r["id"]: r for r in table.to_pylist()}
    assert sorted(got) == sorted(r["id"] for r in rows)
    for i, row in enumerate(rows):
        answer = got[row["id"]]
        assert answer["status"] == "ok"
        assert answer["output"].startswith("Simulated answer")
        assert answer["finish_reason"] == "stop"
        assert answer["model"] == "gpt-4o-mini"
        assert answer["prompt_tokens"] > 0 and answer["completion_tokens"] > 0
        assert answer["total_tokens"] == answer["prompt_tokens"] + answer["completion_tokens"]
        assert answer["cost_usd"] > 0
        assert answer["attempts"] == 1 and answer["http_status"] == 200
        assert answer["expected"] == f"answer {i}"          # input columns carried through
        assert answer["prompt"] == row["prompt"]
    assert sim.stats.requests == 40
    summary = json.loads((tmp_path / "out.summary.json").read_text())
    assert summary["ok"] == 40 and summary["exit_code"] == 0


def test_messages_rows_with_system_and_params(tmp_path: Path, sim: SimulatorThread) -> None:
    rows = [{"id": f"m{i}", "messages": [{"role": "user", "content": f"hello {i}"}],
             "max_tokens": 1 if i % 2 else 500} for i in range(10)]
    src = write_jsonl(tmp_path / "msgs.jsonl", rows)
    out = tmp_path / "out.parquet"
    result = _run(sim, src, out, "--system", "Be brief.", "-p", "temperature=0",
                  "-p", 'stop=["\\n"]', "--keep-raw")
    assert result.exit_code == 0, result.stderr
    got = {r["id"]: r for r in read_output(out)}
    assert len(got) == 10
    for i in range(10):
        answer = got[f"m{i}"]
        # a row's own max_tokens overrides the job's params: 1 token → cut → "length"
        assert answer["finish_reason"] == ("length" if i % 2 else "stop")
        raw = orjson.loads(answer["raw"])
        assert raw["choices"][0]["message"]["content"] == answer["output"]


def test_batch_api_lines_are_sent_as_is(tmp_path: Path, sim: SimulatorThread) -> None:
    lines = [{"custom_id": f"b{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "gpt-4.1-nano", "max_tokens": 40,
                       "messages": [{"role": "user", "content": f"batch {i}"}]}}
             for i in range(6)]
    src = write_jsonl(tmp_path / "batch.jsonl", lines)
    out = tmp_path / "out.parquet"
    result = _run(sim, src, out)
    assert result.exit_code == 0, result.stderr
    got = read_output(out)
    assert sorted(r["id"] for r in got) == [f"b{i}" for i in range(6)]
    assert {r["model"] for r in got} == {"gpt-4.1-nano"}      # the body's model, not --model
    assert sim.stats.by_path.get("/v1/chat/completions") == 6


def test_parquet_table_with_template_and_id_column(tmp_path: Path, sim: SimulatorThread) -> None:
    table = pa.table({"review_id": [10, 11, 12], "product": ["kettle", "lamp", "desk"],
                      "review": ["Boils fast.", "Too dim.", "Sturdy enough."]})
    src = tmp_path / "reviews.parquet"
    pq.write_table(table, src)
    out = tmp_path / "out.parquet"
    result = _run(sim, src, out, "--template", "Sentiment of this {product} review: {review}",
                  "--id-column", "review_id")
    assert result.exit_code == 0, result.stderr
    got = {r["id"]: r for r in read_output(out)}
    assert sorted(got) == ["10", "11", "12"]
    assert got["11"]["product"] == "lamp" and got["11"]["review"] == "Too dim."


def test_folder_of_parquet_and_gzipped_jsonl(tmp_path: Path, sim: SimulatorThread) -> None:
    folder = tmp_path / "parts"
    folder.mkdir()
    pq.write_table(pa.table({"id": ["a", "b"], "prompt": ["x", "y"]}), folder / "p1.parquet")
    pq.write_table(pa.table({"id": ["c"], "prompt": ["z"]}), folder / "p2.parquet")
    result = _run(sim, folder, tmp_path / "dir.parquet")
    assert result.exit_code == 0, result.stderr
    assert sorted(r["id"] for r in read_output(tmp_path / "dir.parquet")) == ["a", "b", "c"]

    gz = tmp_path / "in.jsonl.gz"
    gz.write_bytes(gzip.compress(b"".join(orjson.dumps(r) + b"\n" for r in prompts(5))))
    result = _run(sim, gz, tmp_path / "gz.parquet")
    assert result.exit_code == 0, result.stderr
    assert len(read_output(tmp_path / "gz.parquet")) == 5


def test_bad_rows_are_reported_with_line_and_field_skipped_and_counted(
        tmp_path: Path, sim: SimulatorThread) -> None:
    src = tmp_path / "bad.jsonl"
    src.write_bytes(
        b'{"id": "ok1", "prompt": "fine"}\n'
        b'{"id": "broken", "prompt": \n'
        b'{"id": "noprompt"}\n'
        b'{"id": "ok1", "prompt": "again"}\n'
        b'{"id": "latin", "prompt": "caf\xe9"}\n'
        b'{"id": "ok2", "prompt": "also fine"}\n')
    out = tmp_path / "out.parquet"
    result = _run(sim, src, out)
    assert result.exit_code == 1, result.stderr
    assert f"{src}:2" in result.stderr                      # malformed JSON
    assert f"{src}:3" in result.stderr and "prompt" in result.stderr
    assert f"{src}:4" in result.stderr and "duplicate" in result.stderr
    assert f"{src}:5" in result.stderr and "UTF-8" in result.stderr
    assert sorted(r["id"] for r in read_output(out)) == ["ok1", "ok2"]
    summary = json.loads((tmp_path / "out.summary.json").read_text())
    assert summary["skipped"] == 4 and summary["ok"] == 2


def test_strict_refuses_bad_input_before_sending_anything(
        tmp_path: Path, sim: SimulatorThread) -> None:
    rows = [*prompts(5), {"id": "x"}]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    result = _run(sim, src, tmp_path / "out.parquet", "--strict")
    assert result.exit_code == 2
    assert f"{src}:6" in result.stderr and "prompt" in result.stderr
    assert sim.stats.requests == 0


def test_missing_output_folders_are_created(tmp_path: Path, sim: SimulatorThread) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", prompts(2))
    out = tmp_path / "out" / "job" / "2026-12-03" / "answers.parquet"
    result = _run(sim, src, out)
    assert result.exit_code == 0, result.stderr
    assert pq.read_table(out).num_rows == 2


def test_missing_input_and_unwritable_output_exit_2(tmp_path: Path, sim: SimulatorThread) -> None:
    result = _run(sim, tmp_path / "nope.jsonl", tmp_path / "out.parquet")
    assert result.exit_code == 2
    assert "nope.jsonl" in result.stderr
    src = write_jsonl(tmp_path / "in.jsonl", prompts(2))
    # A file where the output's folder should be is refused, naming it (issue 11).
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")
    result = _run(sim, src, blocker / "sub" / "out.parquet")
    assert result.exit_code == 2
    assert f"{blocker} is a file, not a folder" in result.stderr
    assert sim.stats.requests == 0
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"\n\n")
    result = _run(sim, empty, tmp_path / "out.parquet")
    assert result.exit_code == 2 and "empty" in result.stderr
    assert sim.stats.requests == 0


def test_template_naming_a_missing_parquet_column_exits_2(
        tmp_path: Path, sim: SimulatorThread) -> None:
    src = tmp_path / "t.parquet"
    pq.write_table(pa.table({"id": ["a"], "text": ["hello"]}), src)
    result = _run(sim, src, tmp_path / "out.parquet", "--template", "Say {txt}")
    assert result.exit_code == 2
    assert "txt" in result.stderr and "t.parquet" in result.stderr
    assert sim.stats.requests == 0


def test_transient_faults_are_retried_and_attempts_counted(
        tmp_path: Path, make_sim: Callable[..., SimulatorThread]) -> None:
    sim = make_sim(script=("500", "429:retry-after=0.05", "524", "invalid-json", "drop"))
    src = write_jsonl(tmp_path / "in.jsonl", prompts(1))
    out = tmp_path / "out.parquet"
    result = _run(sim, src, out, "--concurrency", "1", "--timeout", "5")
    assert result.exit_code == 0, result.stderr
    [row] = read_output(out)
    assert row["status"] == "ok" and row["attempts"] == 6
    assert sim.stats.ok == 1 and sim.stats.requests == 6


def test_rows_that_exhaust_attempts_are_written_as_errors(
        tmp_path: Path, make_sim: Callable[..., SimulatorThread]) -> None:
    sim = make_sim(fail_rate=1.0)
    src = write_jsonl(tmp_path / "in.jsonl", prompts(3))
    out = tmp_path / "out.parquet"
    result = _run(sim, src, out, "--max-attempts", "2")
    assert result.exit_code == 1
    rows = read_output(out)
    assert len(rows) == 3
    for row in rows:
        assert row["status"] == "error" and row["attempts"] == 2
        assert row["http_status"] == 500 and "500" in row["error"]
    assert sim.stats.requests == 6


def test_bad_request_is_a_row_error_not_retried(
        tmp_path: Path, make_sim: Callable[..., SimulatorThread]) -> None:
    sim = make_sim(script=("400",))
    src = write_jsonl(tmp_path / "in.jsonl", prompts(1))
    out = tmp_path / "out.parquet"
    result = _run(sim, src, out, "--concurrency", "1")
    assert result.exit_code == 1
    [row] = read_output(out)
    assert row["status"] == "error" and row["attempts"] == 1 and row["http_status"] == 400
    assert row["error_type"] == "bad_request"


def test_wrong_key_aborts_with_exit_3_and_never_leaks_the_key(
        tmp_path: Path, make_sim: Callable[..., SimulatorThread]) -> None:
    sim = make_sim(require_key="right-key")
    src = write_jsonl(tmp_path / "in.jsonl", prompts(300))
    out = tmp_path / "out.parquet"
    secret = "sk-wrong-key-1234567890"
    result = run_cli("run", src, "-o", out, "--base-url", sim.base_url, "--model", "m",
                     "--no-progress", "--concurrency", "8", env={"OPENAI_API_KEY": secret})
    assert result.exit_code == 3
    assert "401" in result.stderr
    assert sim.stats.requests <= 16
    everything = result.stderr + result.stdout
    for path in tmp_path.rglob("*"):
        if path.is_file():
            everything += path.read_bytes().decode("utf-8", "replace")
    assert secret not in everything
    # the right key from the environment works, and the rerun resumes
    result = run_cli("run", src, "-o", out, "--base-url", sim.base_url, "--model", "m",
                     "--no-progress", env={"OPENAI_API_KEY": "right-key"})
    assert result.exit_code == 0, result.stderr
    assert len(read_output(out)) == 300


def test_exhausted_quota_aborts_with_exit_3(
        tmp_path: Path, make_sim: Callable[..., SimulatorThread]) -> None:
    sim = make_sim(quota_exhausted=True)
    src = write_jsonl(tmp_path / "in.jsonl", prompts(500))
    result = _run(sim, src, tmp_path / "out.parquet", "--concurrency", "4")
    assert result.exit_code == 3
    assert "quota" in result.stderr.lower()
    assert sim.stats.requests <= 8


def test_api_key_env_names_the_variable(tmp_path: Path,
                                        make_sim: Callable[..., SimulatorThread]) -> None:
    sim = make_sim(require_key="k-123")
    src = write_jsonl(tmp_path / "in.jsonl", prompts(3))
    result = run_cli("run", src, "-o", tmp_path / "o.parquet", "--base-url", sim.base_url,
                     "--model", "m", "--no-progress", "--api-key-env", "MY_GATEWAY_KEY",
                     env={"MY_GATEWAY_KEY": "k-123"})
    assert result.exit_code == 0, result.stderr


def test_base_url_from_environment(tmp_path: Path, sim: SimulatorThread) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", prompts(2))
    result = run_cli("run", src, "-o", tmp_path / "o.parquet", "--model", "m", "--no-progress",
                     env={"BATCHER_BASE_URL": sim.base_url,
                          "OPENAI_BASE_URL": "http://127.0.0.1:9/v1"})
    assert result.exit_code == 0, result.stderr
    assert sim.stats.requests == 2


def test_json_logs_are_one_object_per_line(tmp_path: Path, sim: SimulatorThread) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", [*prompts(3), {"id": "bad"}])
    result = _run(sim, src, tmp_path / "o.parquet", "--log-format", "json")
    assert result.exit_code == 1
    events = [json.loads(line) for line in result.stderr.splitlines()]
    assert {"run_started", "bad_row_skipped", "run_finished"} <= {e["event"] for e in events}
    for event in events:
        assert {"event", "level", "timestamp", "run_id"} <= set(event)


def test_bad_template_exits_2_with_a_message_and_leaves_no_state(
        tmp_path: Path, sim: SimulatorThread) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", prompts(2))
    out = tmp_path / "out.parquet"
    result = _run(sim, src, out, "--template", "Say {prompt!r}")
    assert result.exit_code == 2
    assert "template" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out.parquet.state").exists()
    assert sim.stats.requests == 0


def test_library_use_without_the_cli(tmp_path: Path, sim: SimulatorThread) -> None:
    import asyncio

    from batcher.config import make_config
    from batcher.runner import run_job

    src = write_jsonl(tmp_path / "in.jsonl", prompts(7))
    config = make_config({"input": src, "output": tmp_path / "lib.parquet",
                          "base_url": sim.base_url, "model": "gpt-4o-mini", "concurrency": 3})
    summary = asyncio.run(run_job(config))
    assert (summary.outcome, summary.exit_code, summary.ok) == ("finished", 0, 7)
    assert len(read_output(tmp_path / "lib.parquet")) == 7


def test_an_existing_file_is_never_clobbered_without_restart(
        tmp_path: Path, sim: SimulatorThread) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", prompts(3))
    precious = tmp_path / "precious.parquet"
    pq.write_table(pa.table({"x": [1, 2, 3]}), precious)
    result = _run(sim, src, precious)
    assert result.exit_code == 2 and "--restart" in result.stderr
    assert pq.read_table(precious).column_names == ["x"]
    assert _run(sim, src, src).exit_code == 2                    # the input itself
    assert src.read_bytes().count(b"\n") == 3
    assert sim.stats.requests == 0
    result = _run(sim, src, precious, "--restart")
    assert result.exit_code == 0, result.stderr
    assert len(read_output(precious)) == 3


def test_unreadable_parquet_exits_2_naming_the_file(tmp_path: Path, sim: SimulatorThread) -> None:
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1" + bytes(range(256)) * 4)
    result = _run(sim, broken, tmp_path / "out.parquet")
    assert result.exit_code == 2
    assert "broken.parquet" in result.stderr and "Traceback" not in result.stderr
    assert sim.stats.requests == 0
