"""The one-pass dry run (batcher.io.scan + estimate.estimate_jsonl) gives exactly the report of
the straightforward one: every row read by the reader (iter_batches, with its id pre-pass),
counted and priced row by row by estimate()."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import batcher.io.readers as readers
import batcher.io.scan as scan
from batcher.estimate import EstimateReport, estimate, estimate_jsonl
from batcher.io.readers import iter_batches
from batcher.io.rows import InputProblem, ReaderOptions
from batcher.tokens import request_input_tokens, request_max_output_tokens
from batcher.types import RequestContext, RequestRow
from tests.conftest import run_cli

WORDS = ["the", "quick", "brown", "fox", "néanmoins", "价格", "合理", "🙂", "jumps", "over",
         "lazy", "dog", "review"]


def _text(i: int, n: int = 12) -> str:
    return " ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(n))


def _prompt_lines() -> list[str]:
    """Plain rows among every other kind: own models and params, carried columns, integer
    ids, bad rows of each kind, blank lines, duplicates (of good and of bad rows, near and
    far), rows over a context window."""
    out: list[str] = []
    for i in range(60):
        row: dict[str, Any] = {"id": f"r{i}", "prompt": _text(i)}
        kind = i % 12
        if kind == 1:
            row["model"] = "claude-3-5-haiku-latest"
        elif kind == 2:
            row["params"] = {"max_tokens": 7 + i}
        elif kind == 3:
            row["temperature"] = 0.5
            row["max_tokens"] = None  # lifts the job's bound: the default is assumed
        elif kind == 4:
            row["meta"] = {"source": "x", "n": i}  # carried, not sent: still a plain row
        elif kind == 5:
            row["model"] = "gpt-3.5-turbo"
            row["prompt"] = "word " * 17_000  # over gpt-3.5-turbo's window
        elif kind == 6:
            row["prompt"] = "hi " * 130_000  # over gpt-4o-mini's window
        elif kind == 7:
            row["model"] = "gemini-1.5-pro"  # tiered prices: summed row by row
            row["prompt"] = "tok " * (30_000 if i > 40 else 10)
        if i in (4, 14):  # over the window: a plain row, then one of its own, same model
            row["prompt"] = "hi " * 130_000
        out.append(json.dumps(row, ensure_ascii=i % 2 == 0))
        if i == 10:
            out += ["", "   ", "{not json", "[1, 2]", "null", '{"id": "r3", "prompt": "dup"}',
                    '{"id": "", "prompt": "empty id"}', '{"id": "bad1", "prompt": 5}',
                    '{"id": "bad2", "prompt": "x", "model": 3}',
                    '{"id": "bad3", "prompt": "x", "params": [1]}',
                    '{"id": 4.5, "prompt": "float id"}', '{"id": true, "prompt": "bool"}']
        if i == 20:
            out += ['{"id": 77, "prompt": "an integer id"}', '{"id": 77, "prompt": "again"}',
                    '{"id": "bad1", "prompt": "the id of a bad row is taken"}',
                    '{"prompt": "no id among rows with ids"}']
        if i == 59:
            out += ['{"id": "r1", "prompt": "a duplicate far from its first row"}',
                    '{"id": "r6", "prompt": "' + "hi " * 130_000 + '"}',
                    '{"id": "last", "prompt": "\\u00e9t\\u00e9 \\ud83d\\ude42"}']
    return out


def _write(path: Path, lines: list[str], *, bom: bool = False) -> Path:
    data = ("\n".join(lines) + "\n").encode()
    if bom:
        data = b"\xef\xbb\xbf" + data
    if path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def _reference(path: Path, options: ReaderOptions, ctx: RequestContext, endpoint: str,
               **kw: Any) -> tuple[EstimateReport, list[InputProblem]]:
    problems: list[InputProblem] = []

    def rows() -> Iterator[RequestRow]:
        for batch in iter_batches(path, options):
            problems.extend(batch.problems)
            yield from batch.rows

    report = estimate(rows(), ctx, endpoint, **kw)
    report.bad_rows = len(problems)
    return report, problems


def _same(path: Path, ctx: RequestContext, endpoint: str = "chat", **opts: Any) -> EstimateReport:
    options = ReaderOptions(carry_columns=False, **opts)
    kw: dict[str, Any] = {"rpm": 500.0, "tpm": 2e6, "concurrency": 16}
    expected, problems = _reference(path, options, ctx, endpoint, **kw)
    got, kept = estimate_jsonl(path, options, ctx, endpoint, problems_kept=1000, **kw)
    assert got.to_json() == expected.to_json()
    assert kept == problems
    few = estimate_jsonl(path, options, ctx, endpoint, problems_kept=3, **kw)[1]
    assert few == problems[:3]
    return got


CTXS = {
    "chat+system+bound": RequestContext(base_url="http://127.0.0.1:1/v1", model="gpt-4o-mini",
                                        system="Answer in one word.",
                                        params={"max_tokens": 40}),
    "no system, tools": RequestContext(
        base_url="http://127.0.0.1:1/v1", model="gpt-4o",
        params={"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}),
    "approximate job model": RequestContext(base_url="http://127.0.0.1:1/v1",
                                            model="claude-3-5-haiku-latest", system="Be brief."),
    "no model": RequestContext(base_url="http://127.0.0.1:1/v1", model=None),
}


@pytest.mark.parametrize("name", list(CTXS))
@pytest.mark.parametrize(("chunk", "block"), [(8192, 1 << 20), (5, 1 << 20), (7, 300)])
def test_prompt_rows_of_every_kind_give_the_straightforward_report(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, chunk: int,
        block: int) -> None:
    monkeypatch.setattr(scan, "CHUNK_ROWS", chunk)  # chunks mixing plain and other rows
    # Small read blocks: whole blocks of plain rows take the block-at-once path, the others
    # (a bad row, a row with its own model...) the row-by-row one.
    monkeypatch.setattr(readers, "_CHUNK_BYTES", block)
    src = _write(tmp_path / "in.jsonl", _prompt_lines(), bom=True)
    report = _same(src, CTXS[name])
    assert report.bad_rows >= 15 and report.rows > 50
    notes = " ".join(report.notes)
    if name == "chat+system+bound":
        assert "gpt-4o-mini's context window" in notes and "gpt-3.5-turbo's" in notes


@pytest.mark.parametrize("endpoint", ["completions", "embeddings", "responses"])
def test_other_endpoints(tmp_path: Path, endpoint: str) -> None:
    src = _write(tmp_path / "in.jsonl.gz", _prompt_lines())
    _same(src, CTXS["chat+system+bound"], endpoint)


def test_plain_blocks_with_and_without_ids(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(readers, "_CHUNK_BYTES", 2000)
    ctx = CTXS["chat+system+bound"]
    with_ids = [json.dumps({"id": f"r{i % 250}", "prompt": _text(i, 3 + i % 30)})
                for i in range(300)]
    report = _same(_write(tmp_path / "ids.jsonl", with_ids), ctx)
    assert report.rows == 250 and report.bad_rows == 50
    without = [json.dumps({"prompt": _text(i, 3 + i % 30), "note": i}) for i in range(300)]
    without[150] = json.dumps({"prompt": "an id among rows without", "id": "x"})
    report = _same(_write(tmp_path / "no-ids.jsonl", without), ctx)
    assert report.rows == 299 and report.bad_rows == 1


def test_templates_and_prompt_columns(tmp_path: Path) -> None:
    lines = [json.dumps({"id": i, "text": _text(i), "stars": i % 5, "tags": ["a", i]})
             for i in range(40)]
    lines[5] = json.dumps({"id": 5, "text": None, "stars": 1})
    lines[9] = json.dumps({"id": 9, "stars": 1})
    lines[12] = json.dumps({"id": 12, "text": "own bound", "stars": 2, "max_tokens": 3})
    lines.append(json.dumps({"id": 3, "text": "duplicate", "stars": 0}))
    src = _write(tmp_path / "in.jsonl", lines)
    ctx = CTXS["chat+system+bound"]
    _same(src, ctx, template="Review ({stars} stars, {tags}): {text}")
    _same(src, ctx, prompt_column="text")
    _same(src, ctx, prompt_column="text", id_column="stars")  # most rows are duplicates


def test_rows_without_ids(tmp_path: Path) -> None:
    lines = [json.dumps({"prompt": _text(i)}) for i in range(30)]
    lines[7] = json.dumps({"prompt": "an id where none are", "id": "x"})
    lines[8] = json.dumps({"prompt": _text(8), "model": "gpt-4.1"})
    _same(_write(tmp_path / "in.jsonl", lines), CTXS["chat+system+bound"])


def test_messages_and_batch_lines(tmp_path: Path) -> None:
    messages = [json.dumps({"id": f"m{i}", "messages": [
        {"role": "system", "content": "Be terse."} if i % 2 else {"role": "user", "content": "x"},
        {"role": "user", "content": [{"type": "text", "text": _text(i)}], "name": "bob"}]})
        for i in range(20)]
    messages += ['{"id": "m3", "messages": [{"role": "user", "content": "dup"}]}',
                 '{"id": "bad", "messages": []}']
    ctx = CTXS["chat+system+bound"]
    _same(_write(tmp_path / "messages.jsonl", messages), ctx)
    batch = [json.dumps({"custom_id": f"b{i}", "method": "POST", "url": "/v1/chat/completions",
                         "body": {"model": "gpt-4o" if i % 3 else "gpt-4.1-mini",
                                  "messages": [{"role": "user", "content": _text(i)}],
                                  "max_tokens": i}}) for i in range(20)]
    batch += [json.dumps({"custom_id": "e", "method": "POST", "url": "/v1/embeddings",
                          "body": {"model": "text-embedding-3-small", "input": ["a", "b c"]}}),
              json.dumps({"custom_id": "b4", "method": "GET", "url": "/x", "body": {}})]
    _same(_write(tmp_path / "batch.jsonl", batch), ctx)


def test_the_totals_are_the_rows_counted_one_by_one(tmp_path: Path) -> None:
    # Independent of estimate(): each good row's own count and bound, summed.
    src = _write(tmp_path / "in.jsonl", _prompt_lines())
    ctx = CTXS["chat+system+bound"]
    options = ReaderOptions(carry_columns=False)
    rows = [r for b in iter_batches(src, options) for r in b.rows]
    report, _ = estimate_jsonl(src, options, ctx, "chat", rpm=None, tpm=None, concurrency=1)
    assert report.rows == len(rows)
    assert report.input_tokens == sum(request_input_tokens(r, ctx, "chat") for r in rows)
    assert report.output_tokens_max == sum(request_max_output_tokens(r, ctx, "chat")
                                           for r in rows)


def test_the_command_reports_duplicates_and_bad_rows_as_before(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"id": f"r{i % 900}", "prompt": _text(i)}) + "\n"
                           for i in range(1000)) + "{oops\n")
    result = run_cli("estimate", src, "--model", "gpt-4o-mini", "--json")
    assert result.exit_code == 1, result.stderr
    data = json.loads(result.stdout)
    assert data["rows"] == 900 and data["bad_rows"] == 101
    assert f"duplicate id 'r0' (first seen at {src}:1)" in result.stderr
    assert f"{src}:1001" not in result.stderr  # 20 bad rows are named, in input order
    assert result.stderr.count("bad_row_skipped") == 20
    dry = run_cli("run", src, "-o", tmp_path / "out.parquet", "--model", "gpt-4o-mini",
                  "--dry-run", "--json")
    assert dry.exit_code == 1 and json.loads(dry.stdout) == data
