"""The dry run's one pass over a JSONL input: the rows :func:`batcher.io.readers.iter_batches`
would give, good and bad alike, but a row that is only an id and a prompt comes as its prompt
text, with no :class:`~batcher.types.RequestRow` built, and the ids are gathered for the
duplicate check in the same pass.

Every row that is not that plain case (a row with its own model or params, messages, a Batch
API line, any row that is bad or whose id decides the input's id rule) is decided by the
reader's own row builder (:class:`batcher.io.rows._RowBuilder`), so the rules live in one
place. The fast case is only taken where the builder would do nothing but copy the prompt.

Duplicates: the reader finds them by a pre-pass over the ids before the first row
(:func:`batcher.io.idindex.build_plan`). Here the ids go to that plan while the rows are read,
and the plan is told at the end of the pass; if it finds duplicates, the caller reads the input
once more with the plan (:class:`JsonlScan` with ``plan``), as the reader would have from the
start. An input without duplicates (the usual case) is thus read once, not twice.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import orjson

from batcher.errors import InputError
from batcher.io.idindex import NEW, RowPlan, build_plan
from batcher.io.location import InputLocation
from batcher.io.readers import _has_data, _IdPass, count_rows, read_blocks
from batcher.io.rows import (
    _BOM,
    _PLAN_CACHE_LIMIT,
    InputProblem,
    ReaderOptions,
    _json_problem,
    _KeyPlan,
    _kind,
    _RowBuilder,
    _Template,
    detect_shape,
)
from batcher.types import RequestRow, RowShape

_UNREADABLE = object()

CHUNK_ROWS = 8192
"""Data rows per :class:`ScanChunk`: big enough to amortise a tokenizer call, small enough to
keep memory flat."""


@dataclass
class ScanChunk:
    """Up to :data:`CHUNK_ROWS` data rows of ``source``, the good ones in two lists: the
    plain rows as their ``prompts`` (at ``lines``), every other good row as a RequestRow in
    ``rows``; ``row_at[i]`` is the place of ``rows[i]`` among all the chunk's good rows, so
    that input order can be restored. ``ids``: the rows' ids for the plan (as
    :func:`batcher.io.readers.iter_row_ids` gives them), None when the scan was given one."""

    source: str
    prompts: list[str]
    lines: list[int]
    rows: list[RequestRow]
    row_at: list[int]
    ids: tuple[list[str], list[int], list[int]] | None


def is_jsonl(path: Path | str) -> bool:
    """Whether ``path`` (a local path or a URL) is a JSONL input (plain or gzipped), not
    Parquet. Raises :class:`InputError` as the reader does for a missing or unsupported
    input."""
    return InputLocation(path).resolve()[0] != "parquet"


class JsonlScan:
    """One pass over a JSONL input (see the module docstring). ``prompts``: whether plain
    rows may come as prompt texts (False: every good row is a RequestRow). ``plan``: the
    input's duplicates, from an earlier pass (None: gather the ids, see :meth:`run`).
    ``bad`` counts the bad rows (duplicates included) and ``problems`` keeps the first
    ``problems_kept`` of them, in input order.

    Raises, at once, what :func:`~batcher.io.readers.iter_batches` raises for a missing,
    unsupported or empty input and a bad template; a read error midway from :meth:`run`.
    """

    def __init__(self, path: Path | str, options: ReaderOptions, *, prompts: bool,
                 plan: RowPlan | None = None, problems_kept: int = 0) -> None:
        self.location = InputLocation(path)
        kind, files = self.location.resolve()
        if kind == "parquet":
            raise ValueError(f"{path}: not a JSONL input")
        self.file, self.source, self.gz = files[0], files[0].source, kind == "jsonl.gz"
        self.options = options
        self.template = (_Template.parse(options.template) if options.template is not None
                         else None)
        if not _has_data(self.location, self.file, self.gz):
            raise InputError(self.source, "empty file: no non-blank lines")
        self.prompts = prompts
        self.given_plan = plan
        self.problems_kept = problems_kept
        self.bad = 0
        self.problems: list[InputProblem] = []

    def run(self, consume: Callable[[ScanChunk], None]) -> RowPlan | None:
        """Read the input, handing each chunk to ``consume`` in order. Without a given plan,
        returns the plan of the ids read (its ``duplicates`` say whether to read again with
        it); with one, None."""
        # Every row parsed is a dict or two, freed by reference counting; the cycle
        # collector, which runs every few hundred of them, would only walk them in vain
        # (~12% of the pass). It is off during the pass and as it was after.
        collecting = gc.isenabled()
        gc.disable()
        try:
            if self.given_plan is not None:
                for chunk in self._chunks():
                    consume(chunk)
                return None

            def id_batches() -> Iterator[tuple[list[str], list[int], list[int]]]:
                for chunk in self._chunks():
                    consume(chunk)
                    assert chunk.ids is not None
                    yield chunk.ids

            return build_plan(id_batches(), rows_hint=self._rows_hint())
        finally:
            if collecting:
                gc.enable()

    def _rows_hint(self) -> int:
        # The plan's spill is sized by the number of rows; a guess from the first block's
        # lines is enough for that, without a pass of its own (unless that block holds too
        # few lines to tell, or the file is compressed).
        if not self.gz:
            for block in self._blocks():
                lines = block.count(b"\n")
                if lines >= 100:
                    return int(self.file.size * lines / len(block)) + 1
                break
        return count_rows(self.location)

    def _blocks(self) -> Iterator[bytes]:
        return read_blocks(self.location.open_binary(self.file, self.gz), self.source)

    def _problem(self, problem: InputProblem) -> None:
        self.bad += 1
        if len(self.problems) < self.problems_kept:
            self.problems.append(problem)

    def _chunks(self) -> Iterator[ScanChunk]:
        options, source, template = self.options, self.source, self.template
        plan = self.given_plan
        plan_state = plan.state if plan is not None and (plan.done or plan.duplicates) else None
        builder = _RowBuilder(options, template, plan, [source])
        id_rule = builder.ids  # the builder's: decided by the first data row
        gather = _IdPass(options) if plan is None else None
        shape: RowShape | None = None
        if template is not None or options.prompt_column is not None:
            shape = "template" if template is not None else "prompt"
        build = builder.row_function(shape, source, 0) if shape is not None else None
        id_column = builder.id_column(shape) if shape is not None else ""
        fast = self.prompts and shape in ("prompt", "template")
        is_template = shape == "template"
        prompt_column = builder.prompt_column
        plain_keys: dict[tuple[str, ...], bool] = {}

        def is_plain(keys: tuple[str, ...]) -> bool:
            # Whether rows with these keys carry nothing the request takes but the prompt
            # (remembered for a bounded number of key tuples, as the builder does).
            plain = plain_keys.get(keys)
            if plain is None:
                plain = not _KeyPlan.make(keys, shape or "prompt", id_column).overrides and (
                    shape == "template" or prompt_column in keys)
                if len(plain_keys) < _PLAN_CACHE_LIMIT:
                    plain_keys[keys] = plain
            return plain
        loads, decode_error = orjson.loads, orjson.JSONDecodeError

        prompts: list[str] = []
        lines: list[int] = []
        rows: list[RequestRow] = []
        row_at: list[int] = []
        id_lists = _IdPass(options)  # a stand-in that only holds the lists
        if gather is not None:
            gather.start()  # the common case is appended here inline, the rest by add()
            id_lists = gather
        ids, ordinals, positions = id_lists.take()
        consumed = line = ordinal = 0
        first_block = True
        for block in self._blocks():
            if first_block and block.startswith(_BOM):
                block = block[len(_BOM):]
            first_block = False
            pieces = block.split(b"\n")
            if block.endswith(b"\n"):
                pieces.pop()  # the empty piece after the final newline
            parsed: list[object] | None = None
            if fast and not is_template and build is not None and plan_state is None \
                    and (gather is None or gather.given is id_rule.given) \
                    and id_rule.given is not None:
                # A whole block at C speed when every line parses (so none is blank: a blank
                # line does not) as an object and every row is plain: same keys as ever, ids
                # as the rule wants, text prompts. Otherwise row by row, as below.
                n = len(pieces)
                try:
                    parsed = list(map(loads, pieces))
                except decode_error:
                    parsed = None
                if parsed is not None and set(map(type, parsed)) == {dict}:
                    objs = cast("list[dict[str, object]]", parsed)
                    keysets = set(map(tuple, objs))
                    if all(plain_keys.get(keys) or is_plain(keys) for keys in keysets):
                        raw_ids = [obj.get(id_column) for obj in objs]
                        id_types = set(map(type, raw_ids))
                        if id_rule.given:
                            ids_follow = id_types == {str} and "" not in raw_ids
                        else:
                            ids_follow = id_types == {type(None)}
                        texts = [obj[prompt_column] for obj in objs]
                        if ids_follow and set(map(type, texts)) == {str}:
                            first_line, first_ordinal = line + 1, ordinal + 1
                            if gather is not None:
                                if id_rule.given:
                                    ids.extend(cast("list[str]", raw_ids))
                                else:
                                    ids.extend([f"row-{o}" for o in
                                                range(first_ordinal, first_ordinal + n)])
                                ordinals.extend(range(first_ordinal, first_ordinal + n))
                                positions.extend(range(first_line, first_line + n))
                            prompts.extend(cast("list[str]", texts))
                            lines.extend(range(first_line, first_line + n))
                            line += n
                            ordinal += n
                            consumed += n
                            if consumed >= CHUNK_ROWS:
                                yield ScanChunk(source, prompts, lines, rows, row_at,
                                                id_lists.take() if gather is not None else None)
                                prompts, lines, rows, row_at = [], [], [], []
                                id_lists.start()
                                ids, ordinals, positions = id_lists.take()
                                consumed = 0
                            continue
            for index, raw in enumerate(pieces):
                line += 1
                try:
                    obj = loads(raw) if parsed is None else parsed[index]
                except decode_error as exc:
                    if not raw.strip():
                        continue  # blank lines are ignored but keep their line number
                    consumed += 1
                    ordinal += 1
                    self._problem(_json_problem(source, line, raw, exc))
                    obj = _UNREADABLE
                else:
                    consumed += 1
                    ordinal += 1
                if obj is _UNREADABLE:
                    pass
                elif type(obj) is not dict:
                    self._problem(InputProblem(source, line, None,
                                               f"not a JSON object (got {_kind(obj)})"))
                elif build is None and (shape := detect_shape(obj, options)) is None:
                    self._problem(InputProblem(
                        source, line, prompt_column,
                        "missing (rows need 'prompt', 'messages', or the Batch API fields "
                        "'custom_id', 'method', 'url', 'body')"))
                else:
                    if build is None:
                        assert shape is not None
                        build = builder.row_function(shape, source, 0)
                        id_column = builder.id_column(shape)
                        fast = self.prompts and shape in ("prompt", "template")
                        is_template = shape == "template"
                    raw_id = obj.get(id_column)
                    if gather is not None:
                        if type(raw_id) is str and raw_id and gather.given:  # the common case
                            ids.append(raw_id)
                            ordinals.append(ordinal)
                            positions.append(line)
                        else:
                            gather.add(raw_id, ordinal, line)
                    prompt: str | None = None
                    # The fast case: the id rule is decided and this row follows it, the plan
                    # has nothing to say about it, and its keys carry nothing but the prompt
                    # (the builder would copy the prompt and nothing else that counts).
                    if id_rule.given:
                        follows = (type(raw_id) is str and raw_id != "") or type(raw_id) is int
                    else:
                        follows = raw_id is None and id_rule.given is False
                    if fast and follows and (plan_state is None or plan_state(ordinal) == NEW):
                        keys = tuple(obj)
                        if plain_keys.get(keys) or is_plain(keys):
                            if is_template:
                                assert template is not None
                                rendered = template.render(obj)
                                if type(rendered) is str:
                                    prompt = rendered
                            else:
                                value = obj.get(prompt_column)
                                if type(value) is str:
                                    prompt = value
                    if prompt is not None:
                        prompts.append(prompt)
                        lines.append(line)
                    else:
                        result = build(obj, line, ordinal)
                        if type(result) is RequestRow:
                            row_at.append(len(prompts) + len(rows))
                            rows.append(result)
                        elif isinstance(result, InputProblem):
                            self._problem(result)
                if consumed >= CHUNK_ROWS:
                    yield ScanChunk(source, prompts, lines, rows, row_at,
                                    (ids, ordinals, positions) if gather is not None else None)
                    prompts, lines, rows, row_at = [], [], [], []
                    id_lists.start()
                    ids, ordinals, positions = id_lists.take()
                    consumed = 0
        if consumed or gather is not None:
            yield ScanChunk(source, prompts, lines, rows, row_at,
                            (ids, ordinals, positions) if gather is not None else None)
