"""Tests for the streaming input readers: shapes, ids, carried columns, bad input, batching."""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import gzip
import random
import tracemalloc
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batcher.errors import ConfigError, InputError
from batcher.io import readers
from batcher.io import rows as rows_module
from batcher.io.readers import (
    OUTPUT_COLUMNS,
    InputProblem,
    ReaderOptions,
    RowBatch,
    count_rows,
    detect_shape,
    iter_batches,
)
from batcher.types import RequestRow, ResultRow

# --- helpers ----------------------------------------------------------------------------


def jsonl(path: Path, *lines: Any) -> Path:
    """Write lines: dicts/lists are JSON-encoded, bytes and str are written as they are."""
    out = []
    for line in lines:
        if isinstance(line, bytes):
            out.append(line)
        elif isinstance(line, str):
            out.append(line.encode())
        else:
            out.append(orjson.dumps(line))
    path.write_bytes(b"\n".join(out) + b"\n")
    return path


def parquet(path: Path, data: dict[str, list[Any]] | pa.Table) -> Path:
    table = data if isinstance(data, pa.Table) else pa.table(data)
    pq.write_table(table, path)
    return path


def read_all(path: Path, options: ReaderOptions | None = None,
             skip_ids: set[str] | None = None) -> tuple[list[RequestRow], list[InputProblem]]:
    rows: list[RequestRow] = []
    problems: list[InputProblem] = []
    for batch in iter_batches(path, options or ReaderOptions(), skip_ids):
        rows.extend(batch.rows)
        problems.extend(batch.problems)
    return rows, problems


def one_problem(path: Path, options: ReaderOptions | None = None) -> InputProblem:
    _, problems = read_all(path, options)
    assert len(problems) == 1, problems
    return problems[0]


# --- shapes -----------------------------------------------------------------------------


def test_prompt_rows_carry_their_columns(tmp_path: Path) -> None:
    path = jsonl(tmp_path / "in.jsonl",
                 {"id": "a", "prompt": "Hello", "expected": "hi", "score": 1.5, "ok": True},
                 {"id": "b", "prompt": "Bye", "expected": None, "score": 2, "ok": False})
    rows, problems = read_all(path)
    assert problems == []
    assert [(r.id, r.shape, r.prompt, r.line, r.source) for r in rows] == [
        ("a", "prompt", "Hello", 1, str(path)), ("b", "prompt", "Bye", 2, str(path))]
    assert rows[0].messages is None and rows[0].body is None and rows[0].model is None
    assert dict(rows[0].columns) == {"prompt": "Hello", "expected": "hi", "score": 1.5, "ok": True}
    assert dict(rows[1].columns) == {"prompt": "Bye", "expected": None, "score": 2, "ok": False}
    assert dict(rows[0].params) == {}


def test_custom_id_and_prompt_columns(tmp_path: Path) -> None:
    path = jsonl(tmp_path / "in.jsonl", {"key": 7, "question": "Why?", "id": "other"})
    rows, problems = read_all(path, ReaderOptions(id_column="key", prompt_column="question"))
    assert problems == []
    assert rows[0].id == "7" and rows[0].prompt == "Why?"
    # `id` is not the id column here, and it names an output column: carried renamed.
    assert dict(rows[0].columns) == {"question": "Why?", "input_id": "other"}


def test_explicit_prompt_column_is_required_even_if_other_shapes_fit(tmp_path: Path) -> None:
    path = jsonl(tmp_path / "in.jsonl", {"id": "a", "messages": [{"role": "user", "content": "x"}]})
    problem = one_problem(path, ReaderOptions(prompt_column="text"))
    assert (problem.field, problem.message) == ("text", "missing")


def test_messages_rows(tmp_path: Path) -> None:
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                {"role": "assistant", "content": None,
                 "tool_calls": [{"id": "c1", "type": "function",
                                 "function": {"name": "f", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "42"}]
    path = jsonl(tmp_path / "in.jsonl", {"id": "m1", "messages": messages, "topic": "x"})
    rows, problems = read_all(path)
    assert problems == []
    assert rows[0].shape == "messages" and rows[0].messages == messages
    assert rows[0].prompt is None
    assert dict(rows[0].columns) == {"topic": "x"}  # messages are not carried


@pytest.mark.parametrize(("messages", "expected"), [
    ([], "must not be empty"),
    ("hello", "must be a list of messages, got string"),
    ([{"content": "x"}], "message 0: 'role' missing"),
    ([{"role": "user", "content": "x"}, {"role": 1, "content": "x"}],
     "message 1: 'role' must be a string, got number"),
    ([{"role": "user"}], "message 0: 'content' missing"),
    ([{"role": "user", "content": 3}], "message 0: 'content' must be a string or a list, got number"),
    ([{"role": "user", "content": None}], "message 0: 'content' must be a string or a list, got null"),
    (["hi"], "message 0: must be an object, got string"),
])
def test_bad_messages_are_problems(tmp_path: Path, messages: Any, expected: str) -> None:
    path = jsonl(tmp_path / "in.jsonl",
                 {"id": "ok", "messages": [{"role": "user", "content": "x"}]},
                 {"id": "bad", "messages": messages})
    rows, problems = read_all(path)
    assert [r.id for r in rows] == ["ok"]
    assert [(p.line, p.field, p.message) for p in problems] == [(2, "messages", expected)]


def test_messages_file_row_without_messages(tmp_path: Path) -> None:
    path = jsonl(tmp_path / "in.jsonl",
                 {"id": "a", "messages": [{"role": "user", "content": "x"}]},
                 {"id": "b", "prompt_text": "x"})
    problem = one_problem(path)
    assert (problem.line, problem.field, problem.message) == (2, "messages", "missing")


def test_batch_api_lines(tmp_path: Path) -> None:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}],
            "temperature": 0.2}
    path = jsonl(tmp_path / "in.jsonl",
                 {"custom_id": "req-1", "method": "POST", "url": "/v1/chat/completions",
                  "body": body, "temperature": 0.9, "note": [1, 2]})
    rows, problems = read_all(path)
    assert problems == []
    row = rows[0]
    assert (row.id, row.shape, row.url, row.model) == (
        "req-1", "batch", "/v1/chat/completions", "gpt-4o-mini")
    assert row.body == body
    # The body is sent as is: top-level fields are carried, never taken as parameters.
    assert dict(row.params) == {}
    assert dict(row.columns) == {"temperature": 0.9, "note": "[1,2]"}


@pytest.mark.parametrize(("change", "field", "message"), [
    ({"method": "GET"}, "method", "must be 'POST', got 'GET'"),
    ({"method": None}, "method", "must be 'POST', got None"),
    ({"url": 5}, "url", "must be a non-empty string, got number"),
    ({"body": "x"}, "body", "must be an object, got string"),
    ({"body": None}, "body", "must be an object, got null"),
])
def test_bad_batch_lines(tmp_path: Path, change: dict[str, Any], field: str, message: str) -> None:
    good = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "m", "messages": []}}
    path = jsonl(tmp_path / "in.jsonl", good, {**good, "custom_id": "b", **change})
    problem = one_problem(path)
    assert (problem.line, problem.field, problem.message) == (2, field, message)


def test_batch_line_missing_fields(tmp_path: Path) -> None:
    good = {"custom_id": "a", "method": "POST", "url": "/v1/embeddings", "body": {"input": "x"}}
    path = jsonl(tmp_path / "in.jsonl", good, {"custom_id": "b", "method": "POST", "url": "/x"},
                 {"custom_id": "c", "url": "/x", "body": {}})
    _, problems = read_all(path)
    assert [(p.line, p.field, p.message) for p in problems] == [
        (2, "body", "missing"), (3, "method", "missing")]


def test_template_rows(tmp_path: Path) -> None:
    path = jsonl(tmp_path / "in.jsonl",
                 {"id": 1, "text": "good film", "lang": "fr", "n": 3, "tags": ["a", "b"]})
    options = ReaderOptions(template="Translate {{into}} {lang}: {text} ({n}, {tags}) {text}")
    rows, problems = read_all(path, options)
    assert problems == []
    assert rows[0].shape == "template"
    assert rows[0].prompt == 'Translate {into} fr: good film (3, ["a","b"]) good film'
    assert rows[0].columns["text"] == "good film"


def test_template_row_lacking_a_field_is_a_problem(tmp_path: Path) -> None:
    path = jsonl(tmp_path / "in.jsonl", {"id": 1, "text": "x", "lang": "de"},
                 {"id": 2, "text": "y"}, {"id": 3, "text": "z", "lang": None})
    rows, problems = read_all(path, ReaderOptions(template="{lang}: {text}"))
    assert [r.prompt for r in rows] == ["de: x"]
    assert [(p.line, p.field, p.message) for p in problems] == [
        (2, "lang", "missing (used by the template)"),
        (3, "lang", "is null (used by the template)")]


@pytest.mark.parametrize("template", ["{}", "{0}", "{a.b}", "{a[0]}", "{a!r}", "{a:>5}", "{a"])
def test_bad_templates_are_config_errors(tmp_path: Path, template: str) -> None:
    path = jsonl(tmp_path / "in.jsonl", {"id": 1, "a": "x"})
    with pytest.raises(ConfigError, match="template"):
        iter_batches(path, ReaderOptions(template=template))


def test_parquet_template_with_unknown_column_is_fatal(tmp_path: Path) -> None:
    path = parquet(tmp_path / "in.parquet", {"id": ["a"], "text": ["x"], "label": ["y"]})
    with pytest.raises(InputError) as info:
        iter_batches(path, ReaderOptions(template="{text} {lang}"))
    assert info.value.field == "lang"
    assert str(path) in str(info.value) and "id, text, label" in str(info.value)


def test_detect_shape() -> None:
    options = ReaderOptions()
    assert detect_shape({"prompt": "x"}, options) == "prompt"
    assert detect_shape({"messages": []}, options) == "messages"
    assert detect_shape({"custom_id": "a", "body": {}}, options) == "batch"
    assert detect_shape({"text": "x"}, options) is None
    assert detect_shape({"text": "x"}, ReaderOptions(template="{text}")) == "template"


def test_shape_is_taken_from_first_valid_row(tmp_path: Path) -> None:
    path = jsonl(tmp_path / "in.jsonl", "not json", {"id": "x", "text": "no shape"},
                 {"id": "a", "prompt": "p"},
                 {"id": "b", "messages": [{"role": "user", "content": "x"}]})
    rows, problems = read_all(path)
    assert [r.id for r in rows] == ["a"]
    assert [(p.line, p.field) for p in problems] == [(1, None), (2, "prompt"), (4, "prompt")]
    assert problems[2].message == "missing"


# --- per-row overrides ------------------------------------------------------------------


def test_row_model_and_params(tmp_path: Path) -> None:
    path = jsonl(tmp_path / "in.jsonl",
                 {"id": "a", "prompt": "x", "model": "gpt-4o", "temperature": 0.5,
                  "max_tokens": 10, "seed": None,
                  "params": {"temperature": 0.1, "top_k": 5}},
                 {"id": "b", "prompt": "y", "stop": ["\n"], "response_format": {"type": "json"}})
    rows, problems = read_all(path)
    assert problems == []
    assert rows[0].model == "gpt-4o"
    assert dict(rows[0].params) == {"temperature": 0.1, "max_tokens": 10, "top_k": 5}
    assert dict(rows[1].params) == {"stop": ["\n"], "response_format": {"type": "json"}}
    # The row's own fields are carried too (model renamed: it is an output column).
    assert rows[0].columns["input_model"] == "gpt-4o"
    assert rows[0].columns["temperature"] == 0.5
    assert "params" not in rows[0].columns
    assert rows[1].columns["stop"] == '["\\n"]'


def test_bad_row_model_or_params(tmp_path: Path) -> None:
    path = jsonl(tmp_path / "in.jsonl", {"id": "a", "prompt": "x", "model": 4},
                 {"id": "b", "prompt": "x", "params": [1]})
    _, problems = read_all(path)
    assert [(p.line, p.field, p.message) for p in problems] == [
        (1, "model", "must be a string, got number"),
        (2, "params", "must be an object, got array")]


# --- ids --------------------------------------------------------------------------------


def test_generated_ids_count_every_data_row(tmp_path: Path) -> None:
    path = jsonl(tmp_path / "in.jsonl", {"prompt": "a"}, "", "{broken", {"prompt": "b"},
                 {"id": None, "prompt": "c"}, {"prompt": "d"})
    rows, problems = read_all(path)
    assert [(r.id, r.line) for r in rows] == [("row-1", 1), ("row-3", 4), ("row-4", 5),
                                              ("row-5", 6)]
    assert [p.line for p in problems] == [3]
    again, _ = read_all(path)
    assert [r.id for r in again] == [r.id for r in rows]


def test_a_generated_id_never_takes_a_real_one(tmp_path: Path) -> None:
    # Issue 11: a null id on line 6 became row-6 and pushed out the real id row-6 on line 7.
    # Ids are all or nothing, decided by the first data row.
    given = jsonl(tmp_path / "given.jsonl", *[{"id": f"k{n}", "prompt": "p"} for n in range(5)],
                  {"id": None, "prompt": "null"}, {"id": "row-6", "prompt": "real"},
                  {"prompt": "no id field"})
    rows, problems = read_all(given)
    assert [r.id for r in rows] == ["k0", "k1", "k2", "k3", "k4", "row-6"]
    assert rows[-1].prompt == "real"
    assert [(p.line, p.field) for p in problems] == [(6, "id"), (8, "id")]
    assert problems[0].message == (
        f"missing id, but the input gives ids (first at {given}:1): give every row an id, "
        "or none and batcher numbers them row-N")

    generated = jsonl(tmp_path / "generated.jsonl", "{broken", {"prompt": "a"},
                      {"id": "row-3", "prompt": "real"}, {"id": 7, "prompt": "int"},
                      {"prompt": "b"})
    rows, problems = read_all(generated)
    assert [r.id for r in rows] == ["row-2", "row-5"]
    assert [(p.line, p.field) for p in problems] == [(1, None), (3, "id"), (4, "id")]
    assert problems[1].message == (
        f"an id, but the input's first row ({generated}:2) has none, so ids are generated "
        "(row-N): give every row an id, or none")


def test_on_resume_a_skipped_row_still_says_the_input_gives_ids(tmp_path: Path) -> None:
    path = jsonl(tmp_path / "in.jsonl", {"id": "a", "prompt": "1"}, {"prompt": "2"},
                 {"id": "b", "prompt": "3"})
    rows, problems = read_all(path, skip_ids={"a"})
    assert [r.id for r in rows] == ["b"]
    assert [(p.line, p.message.split(",")[0]) for p in problems] == [(2, "missing id")]


@pytest.mark.parametrize(("value", "message"), [
    ("", "empty id"), (1.5, "must be a string or an integer, got number"),
    (True, "must be a string or an integer, got boolean"),
    ({"a": 1}, "must be a string or an integer, got object"),
])
def test_bad_ids(tmp_path: Path, value: Any, message: str) -> None:
    path = jsonl(tmp_path / "in.jsonl", {"id": value, "prompt": "x"})
    problem = one_problem(path)
    assert (problem.line, problem.field, problem.message) == (1, "id", message)


def test_duplicate_ids_keep_the_first(tmp_path: Path) -> None:
    path = jsonl(tmp_path / "in.jsonl", {"id": "a", "prompt": "1"}, {"id": "b", "prompt": "2"},
                 {"id": "a", "prompt": "3"}, {"id": "row-5", "prompt": "4"},
                 {"id": "row-5", "prompt": "5"})
    rows, problems = read_all(path)
    assert [(r.id, r.prompt) for r in rows] == [("a", "1"), ("b", "2"), ("row-5", "4")]
    assert [str(p) for p in problems] == [
        f"{path}:3: field 'id': duplicate id 'a' (first seen at {path}:1)",
        f"{path}:5: field 'id': duplicate id 'row-5' (first seen at {path}:4)"]


def test_skip_ids_still_count_for_duplicates_and_progress(tmp_path: Path) -> None:
    path = jsonl(tmp_path / "in.jsonl", {"id": "a", "prompt": "1"}, {"id": "b", "prompt": "2"},
                 {"id": "a", "prompt": "3"}, {"id": "c", "prompt": "4"})
    batches = list(iter_batches(path, ReaderOptions(batch_size=2), skip_ids={"a"}))
    assert [[r.id for r in b.rows] for b in batches] == [["b"], ["c"]]
    assert [b.lines_read for b in batches] == [2, 2]
    assert [p.line for b in batches for p in b.problems] == [3]


def test_a_skipped_id_met_again_is_a_duplicate_of_a_done_row(tmp_path: Path) -> None:
    # String ids (the fast path) and an integer id (through the row builder).
    path = jsonl(tmp_path / "in.jsonl", {"id": "a", "prompt": "1"}, {"id": 7, "prompt": "2"},
                 {"id": "a", "prompt": "4"}, {"id": "7", "prompt": "5"},
                 {"id": "b", "prompt": "7"})
    skip = {"a", "7"}
    rows, problems = read_all(path, skip_ids=skip)
    assert [r.id for r in rows] == ["b"]
    done = "(an earlier row has it, and that row is done already)"
    assert [(p.line, p.field, p.message) for p in problems] == [
        (3, "id", f"duplicate id 'a' {done}"), (4, "id", f"duplicate id '7' {done}")]
    assert skip == {"a", "7"}  # the caller's set is left alone
    # A generated id (through the row builder).
    path = jsonl(tmp_path / "gen.jsonl", {"prompt": "1"}, {"prompt": "2"}, {"prompt": "3"})
    rows, problems = read_all(path, skip_ids={"row-2"})
    assert [r.id for r in rows] == ["row-1", "row-3"] and not problems


def test_skipping_by_custom_id_and_in_parquet(tmp_path: Path) -> None:
    line = {"method": "POST", "url": "/v1/chat/completions", "body": {"model": "m"}}
    path = jsonl(tmp_path / "batch.jsonl", {"custom_id": "x", **line},
                 {"custom_id": "y", **line}, {"custom_id": "x", **line})
    rows, problems = read_all(path, skip_ids={"x"})
    assert [r.id for r in rows] == ["y"] and [p.line for p in problems] == [3]
    folder = tmp_path / "parts"
    folder.mkdir()
    parquet(folder / "a.parquet", {"id": ["p", "q"], "prompt": ["1", "2"]})
    parquet(folder / "b.parquet", {"id": ["q", "p"], "prompt": ["3", "4"]})
    rows, problems = read_all(folder, skip_ids={"p"})
    assert [r.id for r in rows] == ["q"]
    assert [(Path(p.source).name, p.line, "done already" in p.message) for p in problems] == [
        ("b.parquet", 1, False), ("b.parquet", 2, True)]


def test_skipping_matches_reading_everything_and_dropping_the_done_ids(tmp_path: Path) -> None:
    # Resume is a fast path: it must give exactly the rows and problems a full read gives,
    # less each done id's first row (whose own problems are not looked for, as before).
    rng = random.Random(7)
    lines: list[Any] = []
    first_line: dict[str, int] = {}  # id -> the line of the first row that has it
    ordinal = 0
    for number in range(1, 601):
        kind = rng.random()
        if kind < 0.03:
            lines.append(b"   ")
            continue
        ordinal += 1
        if kind < 0.08:
            lines.append(b"{broken")
            continue
        if kind < 0.15:
            n = rng.randrange(40)
            row_id, line = str(n), {"id": n, "prompt": f"p{number}"}
        elif kind < 0.2:
            row_id = f"k{rng.randrange(300)}"
            line = {"id": row_id}  # no prompt: a bad row, but it owns its id
        elif kind < 0.25:
            row_id = f"k{rng.randrange(300)}"
            line = f'{{"id": "{row_id}", "prompt": "spaced {number}"}}'
        else:
            row_id = f"k{rng.randrange(300)}"
            line = {"id": row_id, "prompt": f"p{number}"}
        lines.append(line)
        first_line.setdefault(row_id, number)
    path = jsonl(tmp_path / "in.jsonl", *lines)
    options = ReaderOptions(batch_size=37)
    all_rows, all_problems = read_all(path, options)
    skip = set(rng.sample(sorted(first_line), len(first_line) // 2)) | {"never-seen"}
    rows, problems = read_all(path, options, skip_ids=skip)
    assert rows == [r for r in all_rows if r.id not in skip]
    skipped_lines = {first_line[i] for i in skip if i in first_line}
    assert [p.line for p in problems] == [
        p.line for p in all_problems if p.line not in skipped_lines]
    assert any(p.message.endswith("done already)") for p in problems)
    assert sum(b.lines_read for b in iter_batches(path, options, skip)) == count_rows(path)


def test_ids_across_parquet_directory(tmp_path: Path) -> None:
    folder = tmp_path / "parts"
    folder.mkdir()
    parquet(folder / "b.parquet", {"id": ["x", None, "y"], "prompt": ["3", "4", "5"]})
    parquet(folder / "a.parquet", {"id": ["w", "x"], "prompt": ["1", "2"]})
    parquet(folder / "_hidden.parquet", {"id": ["h"], "prompt": ["h"]})
    (folder / "notes.txt").write_text("ignored")
    rows, problems = read_all(folder)
    assert [(r.id, Path(r.source).name, r.line) for r in rows] == [
        ("w", "a.parquet", 1), ("x", "a.parquet", 2), ("y", "b.parquet", 3)]
    assert [str(p) for p in problems] == [
        f"{folder / 'b.parquet'}:1: field 'id': duplicate id 'x' "
        f"(first seen at {folder / 'a.parquet'}:2)",
        f"{folder / 'b.parquet'}:2: field 'id': missing id, but the input gives ids (first at "
        f"{folder / 'a.parquet'}:1): give every row an id, or none and batcher numbers them "
        "row-N"]
    assert count_rows(folder) == 5


def test_parquet_without_ids_numbers_rows_across_files(tmp_path: Path) -> None:
    folder = tmp_path / "parts"
    folder.mkdir()
    parquet(folder / "a.parquet", {"prompt": ["1", "2"]})
    parquet(folder / "b.parquet", {"id": [None, None], "prompt": ["3", "4"]})
    rows, problems = read_all(folder)
    assert [r.id for r in rows] == ["row-1", "row-2", "row-3", "row-4"] and not problems


# --- carried columns --------------------------------------------------------------------


def test_output_columns_match_the_result_row() -> None:
    # ``ordinal`` is kept in the state only (for resuming by ordinals), never in the output.
    result_fields = [f.name for f in dataclasses.fields(ResultRow)
                     if f.name not in ("columns", "ordinal")]
    assert list(OUTPUT_COLUMNS) == result_fields


def test_colliding_columns_are_renamed(tmp_path: Path) -> None:
    path = jsonl(tmp_path / "in.jsonl",
                 {"id": "a", "prompt": "x", "status": "draft", "error": 0, "output": "gold",
                  "model": "m", "input_model": "kept"})
    rows, _ = read_all(path)
    assert dict(rows[0].columns) == {
        "prompt": "x", "input_status": "draft", "input_error": 0, "input_output": "gold",
        "input_input_model": "m", "input_model": "kept"}


def test_parquet_values_become_parquet_friendly(tmp_path: Path) -> None:
    table = pa.table({
        "id": pa.array([1, 2], pa.int64()),
        "prompt": ["a", "b"],
        "when": pa.array([dt.date(2024, 5, 1), None], pa.date32()),
        "price": pa.array([decimal.Decimal("1.50"), decimal.Decimal("2.00")],
                          pa.decimal128(5, 2)),
        "blob": pa.array([b"\x00ab", b"cd"], pa.binary()),
        "tags": pa.array([["x", "y"], []], pa.list_(pa.string())),
        "meta": pa.array([{"k": 1}, {"k": None}], pa.struct([("k", pa.int64())])),
    })
    rows, problems = read_all(parquet(tmp_path / "in.parquet", table))
    assert problems == []
    assert [r.id for r in rows] == ["1", "2"]
    assert dict(rows[0].columns) == {"prompt": "a", "when": "2024-05-01", "price": "1.50",
                                     "blob": "\x00ab", "tags": '["x","y"]', "meta": '{"k":1}'}
    assert rows[1].columns["when"] is None and rows[1].columns["meta"] == '{"k":null}'


def test_parquet_messages_as_structs_or_json_text(tmp_path: Path) -> None:
    message = pa.struct([("role", pa.string()), ("content", pa.string()), ("name", pa.string())])
    table = pa.table({"id": ["a"], "messages": pa.array(
        [[{"role": "user", "content": "hi", "name": None}]], pa.list_(message))})
    rows, problems = read_all(parquet(tmp_path / "structs.parquet", table))
    assert problems == []
    assert rows[0].messages == [{"role": "user", "content": "hi"}]  # Arrow's null fill dropped

    text = orjson.dumps([{"role": "user", "content": "hey"}]).decode()
    rows, problems = read_all(parquet(tmp_path / "text.parquet",
                                      {"id": ["a", "b"], "messages": [text, "not json"]}))
    assert rows[0].messages == [{"role": "user", "content": "hey"}]
    assert [(p.line, p.field) for p in problems] == [(2, "messages")]


def test_parquet_template_and_batch_rows(tmp_path: Path) -> None:
    path = parquet(tmp_path / "t.parquet", {"id": [1, 2], "text": ["a", "b"], "n": [3, None]})
    rows, problems = read_all(path, ReaderOptions(template="{text}/{n}"))
    assert [(r.id, r.shape, r.prompt) for r in rows] == [("1", "template", "a/3")]
    assert [(p.line, p.field) for p in problems] == [(2, "n")]

    body = {"model": "m", "input": "hello"}
    path = parquet(tmp_path / "b.parquet", {
        "custom_id": ["x"], "method": ["POST"], "url": ["/v1/embeddings"],
        "body": [orjson.dumps(body).decode()], "gold": ["g"]})
    rows, problems = read_all(path)
    assert problems == []
    assert (rows[0].id, rows[0].shape, rows[0].body, rows[0].model, dict(rows[0].columns)) == (
        "x", "batch", body, "m", {"gold": "g"})


def test_parquet_shape_needs_a_known_column(tmp_path: Path) -> None:
    path = parquet(tmp_path / "in.parquet", {"id": ["a"], "text": ["x"]})
    with pytest.raises(InputError, match=r"cannot tell the row shape.*id, text"):
        iter_batches(path, ReaderOptions())
    with pytest.raises(InputError) as info:
        iter_batches(path, ReaderOptions(id_column="key", template="{text}"))
    assert info.value.field == "key"


def test_parquet_null_prompt_is_a_problem(tmp_path: Path) -> None:
    path = parquet(tmp_path / "in.parquet", {"id": ["a", "b"], "prompt": ["x", None]})
    problem = one_problem(path)
    assert str(problem) == f"{path}:2: field 'prompt': must be a string, got null"


# --- bad input --------------------------------------------------------------------------


def test_malformed_json_line(tmp_path: Path) -> None:
    path = jsonl(tmp_path / "in.jsonl", {"id": "a", "prompt": "x"}, '{"id": "b", "prompt": ',
                 {"id": "c", "prompt": "y"})
    rows, problems = read_all(path)
    assert [r.id for r in rows] == ["a", "c"]
    assert len(problems) == 1
    assert problems[0].line == 2 and problems[0].field is None
    assert problems[0].message.startswith("malformed JSON: ")
    assert str(problems[0]).startswith(f"{path}:2: malformed JSON: ")


def test_bytes_that_are_not_utf8(tmp_path: Path) -> None:
    path = jsonl(tmp_path / "in.jsonl", {"id": "a", "prompt": "x"},
                 b'{"id": "b", "prompt": "caf\xe9"}')
    problem = one_problem(path)
    assert (problem.line, problem.field, problem.message) == (
        2, None, "not valid UTF-8 (byte offset 26)")


def test_json_that_is_not_an_object(tmp_path: Path) -> None:
    path = jsonl(tmp_path / "in.jsonl", [1, 2], '"text"', {"id": "a", "prompt": "x"})
    _, problems = read_all(path)
    assert [(p.line, p.message) for p in problems] == [
        (1, "not a JSON object (got array)"), (2, "not a JSON object (got string)")]


def test_missing_prompt(tmp_path: Path) -> None:
    path = jsonl(tmp_path / "in.jsonl", {"id": "a", "prompt": "x"}, {"id": "b", "text": "y"},
                 {"id": "c", "prompt": ["not", "text"]})
    _, problems = read_all(path)
    assert [str(p) for p in problems] == [
        f"{path}:2: field 'prompt': missing",
        f"{path}:3: field 'prompt': must be a string, got array"]


def test_blank_lines_are_skipped_but_counted(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"id": "a", "prompt": "x"}\r\n\r\n   \n\t\n'
                     b'{"id": "b", "prompt": "y"}\r\n\n{"id": "c", "prompt": "z"}')
    batches = list(iter_batches(path, ReaderOptions()))
    assert [(r.id, r.line) for b in batches for r in b.rows] == [("a", 1), ("b", 5), ("c", 7)]
    assert [p for b in batches for p in b.problems] == []
    assert sum(b.lines_read for b in batches) == 3 == count_rows(path)


@pytest.mark.parametrize("content", [b"", b"\n\n  \n", b"\xef\xbb\xbf\n"])
def test_empty_jsonl_is_fatal(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(content)
    with pytest.raises(InputError, match="empty file") as info:
        iter_batches(path, ReaderOptions())
    assert info.value.source == str(path)


def test_empty_parquet_is_fatal(tmp_path: Path) -> None:
    path = parquet(tmp_path / "in.parquet", pa.table({"id": pa.array([], pa.string()),
                                                      "prompt": pa.array([], pa.string())}))
    with pytest.raises(InputError, match="empty input"):
        iter_batches(path, ReaderOptions())


def test_directory_without_parquet_is_fatal(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text('{"prompt": "x"}\n')
    with pytest.raises(InputError, match=r"no \.parquet files") as info:
        iter_batches(tmp_path, ReaderOptions())
    assert info.value.source == str(tmp_path)


def test_missing_file_is_fatal(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file") as info:
        iter_batches(tmp_path / "nope.jsonl", ReaderOptions())
    assert info.value.source == str(tmp_path / "nope.jsonl")
    with pytest.raises(InputError, match="no such file"):
        count_rows(tmp_path / "nope.parquet")


def test_unsupported_file_type_is_fatal(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_text("id,prompt\n1,x\n")
    with pytest.raises(InputError, match="unsupported input type") as info:
        iter_batches(path, ReaderOptions())
    assert info.value.source == str(path)


def test_random_bytes_parquet_is_fatal(tmp_path: Path) -> None:
    path = tmp_path / "in.parquet"
    path.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(InputError, match="cannot read Parquet") as info:
        iter_batches(path, ReaderOptions())
    assert info.value.source == str(path)
    with pytest.raises(InputError, match="cannot read Parquet"):
        count_rows(path)


def test_truncated_parquet_is_fatal(tmp_path: Path) -> None:
    folder = tmp_path / "parts"
    folder.mkdir()
    good = parquet(folder / "a.parquet", {"id": ["a"], "prompt": ["x"]})
    bad = folder / "b.parquet"
    bad.write_bytes(good.read_bytes()[:-20])
    with pytest.raises(InputError) as info:
        iter_batches(folder, ReaderOptions())
    assert info.value.source == str(bad)


def test_corrupt_gzip_is_fatal(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl.gz"
    data = gzip.compress(b"".join(orjson.dumps({"id": i, "prompt": f"p{i}" * 50}) + b"\n"
                                  for i in range(2000)))
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="cannot read") as info:
        read_all(path)
    assert info.value.source == str(path)
    path.write_bytes(b"this is not gzip at all")
    with pytest.raises(InputError, match="cannot read"):
        read_all(path)


# --- formats, batching and counting -----------------------------------------------------


@pytest.mark.parametrize("name", ["in.jsonl", "in.ndjson", "in.jsonl.gz", "IN.NDJSON.GZ"])
def test_jsonl_variants(tmp_path: Path, name: str) -> None:
    data = b"".join(orjson.dumps({"id": f"r{i}", "prompt": f"p{i}"}) + b"\n" for i in range(50))
    path = tmp_path / name
    path.write_bytes(gzip.compress(data) if name.lower().endswith(".gz") else data)
    rows, problems = read_all(path)
    assert problems == [] and [r.id for r in rows] == [f"r{i}" for i in range(50)]
    assert count_rows(path) == 50


def test_batches_respect_batch_size(tmp_path: Path) -> None:
    path = jsonl(tmp_path / "in.jsonl", *({"id": i, "prompt": "x"} for i in range(10)), "oops")
    batches = list(iter_batches(path, ReaderOptions(batch_size=4)))
    assert [b.lines_read for b in batches] == [4, 4, 3]
    assert [len(b.rows) for b in batches] == [4, 4, 2]
    assert [len(b.problems) for b in batches] == [0, 0, 1]
    assert all(isinstance(b, RowBatch) for b in batches)


def test_parquet_batches(tmp_path: Path) -> None:
    path = parquet(tmp_path / "in.parquet",
                   {"id": [f"r{i}" for i in range(10)], "prompt": ["x"] * 10})
    batches = list(iter_batches(path, ReaderOptions(batch_size=3)))
    assert sum(b.lines_read for b in batches) == 10 == count_rows(path)
    assert max(len(b.rows) for b in batches) <= 3
    assert [r.line for b in batches for r in b.rows] == list(range(1, 11))


def test_lines_across_chunk_boundaries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(readers, "_CHUNK_BYTES", 64)
    lines = [{"id": f"r{i}", "prompt": "y" * (i * 37 % 300)} for i in range(200)]
    path = jsonl(tmp_path / "in.jsonl", *lines[:100], "", "   ", *lines[100:])
    rows, problems = read_all(path)
    assert problems == []
    assert [(r.id, r.prompt) for r in rows] == [(d["id"], d["prompt"]) for d in lines]
    assert rows[100].line == 103
    assert count_rows(path) == 200


@pytest.mark.parametrize("content", [
    b"{}\n{}\n", b"{}\n{}", b"\n{}\n\n{}\n\n", b"  {}\n\t\n{}", b"[1]\n\r\n{}\n", b"\r\n",
    b"{}\n \n", b"x",
])
def test_count_rows_counts_non_blank_lines(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(content)
    expected = sum(1 for line in content.split(b"\n") if line.strip())
    assert count_rows(path) == expected


def test_memory_stays_flat(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(readers, "_CHUNK_BYTES", 1 << 20)
    path = tmp_path / "big.jsonl"
    padding = "z" * 20_000
    with path.open("wb") as out:
        for i in range(2_000):
            out.write(orjson.dumps({"id": i, "prompt": padding}) + b"\n")
    size = path.stat().st_size
    tracemalloc.start()
    try:
        seen = 0
        for batch in iter_batches(path, ReaderOptions(batch_size=50)):
            seen += len(batch.rows)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert seen == 2_000
    assert size > 40_000_000
    assert peak < size / 4, (peak, size)


def test_fast_row_constructor_matches_the_dataclass() -> None:
    fast = rows_module._make_request_row("a", "prompt", "f.jsonl", 3, "p", None, None, None, "m",
                                     {"t": 1}, {"c": 2}, 7)
    assert fast == RequestRow("a", "prompt", "f.jsonl", 3, "p", None, None, None, "m",
                              {"t": 1}, {"c": 2}, 7)
    assert type(fast) is RequestRow
    with pytest.raises(dataclasses.FrozenInstanceError):
        untyped: Any = fast
        untyped.id = "b"  # still frozen


def test_problem_text() -> None:
    assert str(InputProblem("data/in.jsonl", 17, "prompt", "missing")) == \
        "data/in.jsonl:17: field 'prompt': missing"
    assert str(InputProblem("data/in.jsonl", 3, None, "malformed JSON: x")) == \
        "data/in.jsonl:3: malformed JSON: x"


def test_batch_size_must_be_positive() -> None:
    with pytest.raises(ConfigError, match="batch_size"):
        ReaderOptions(batch_size=0)
