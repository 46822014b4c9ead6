"""Token counts of requests, offline: exact for OpenAI models, a measured approximation otherwise.

OpenAI models are counted with the model's own byte-pair encoding (``o200k_base`` for GPT-4o,
GPT-4.1, GPT-5, o-series, gpt-oss; ``cl100k_base`` for GPT-4, GPT-3.5, text-embedding-3/ada-002)
through ``toktok`` (toktok-rs), whose vocabularies are compiled into its extension module:
nothing is read from disk or downloaded at run time. Its counts were checked equal to
tiktoken 0.14 (fed OpenAI's own ``.tiktoken`` files, sha256-verified) on 65,015 texts
(29.5 M characters: Python sources, random multi-script strings): no mismatch in either
encoding. Chosen over tiktoken + bundled vocab files (``bpe-openai``: 75 MB installed) because
it is ~8 MB, needs no data files, and counts 1 M short texts in under a second on 2 cores.

Chat requests follow OpenAI's published accounting: every message costs 3 tokens plus the
tokens of its role, content and other string fields (a ``name`` costs 1 more), and 3 tokens
prime the reply. Content given as a list of parts counts its text parts; images, audio and
files are not counted. Tool/function definitions and ``response_format`` schemas in the
request parameters are counted as their compact JSON text, an approximation (OpenAI renders
them in an undisclosed format).

Other vendors' models (Claude, Gemini, Llama, Qwen, Mistral, DeepSeek, …) are approximated as
``ceil(o200k_base count × APPROX_FACTOR)``. Claude's and Gemini's tokenizers are not available
offline, so the error was measured against the one non-OpenAI tokenizer we do have exactly,
Qwen3.5's (bundled in toktok), on one two-sentence text written in ten languages, a JSON
object, an emoji line and 20 chunks of Python source (error of the approximation vs Qwen3.5):
English +12 %, German +9 %, French +16 %, Spanish +10 %, Russian +10 %, Python code +4 % on
average (−1 % … +9 %), JSON −2 %, emoji −8 %, Arabic +20 %, Chinese +42 %, Japanese +57 %,
Korean +36 %, Hindi −55 % (Qwen splits Devanagari far more finely). ``chars/4`` was worse on
every script except Arabic (English +53 %, CJK −42 … −57 %, JSON −43 %). Treat approximate
counts as ±20 % for Latin-script text and code, and much looser for other scripts.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import lru_cache
from typing import Final, cast

import orjson
import toktok  # type: ignore[import-untyped]  # ships no py.typed

from batcher.schema import ANTHROPIC_TOOL_PROMPT_TOKENS
from batcher.types import JSON, RequestContext, RequestRow

DEFAULT_MAX_OUTPUT_TOKENS: Final = 4096
"""Output tokens assumed per request when neither the row nor the job sets ``max_tokens`` /
``max_completion_tokens``. A stated assumption, not a bound: a model may write more unless
the request caps it (embeddings write none)."""

APPROX_FACTOR: Final = 1.1
"""Scale applied to o200k_base counts for non-OpenAI models (measured; see module docstring)."""

APPROX: Final = "approx"
"""The tokenizer name reported for approximate counts."""

TOKENS_PER_MESSAGE: Final = 3
TOKENS_PER_NAME: Final = 1
TOKENS_REPLY_PRIMER: Final = 3

_O200K_RE = re.compile(
    r"(gpt-4o|chatgpt-4o|gpt-4\.1|gpt-4\.5|gpt-5|gpt-oss|o[1-9](-|$)|codex-|omni-moderation"
    r"|gpt-realtime|gpt-audio|computer-use)"
)
_CL100K_RE = re.compile(
    r"(gpt-4|gpt-3\.5|gpt-35|text-embedding-3|text-embedding-ada-002|davinci-002|babbage-002)"
)

_MAX_TOKEN_KEYS = ("max_completion_tokens", "max_tokens", "max_output_tokens")


@lru_cache(maxsize=4096)
def encoding_for(model: str | None) -> str | None:
    """The OpenAI encoding of ``model``: ``"o200k_base"``, ``"cl100k_base"``, or None when the
    model is not an OpenAI model (or not given): its counts are then approximate.

    A gateway prefix (``openai/gpt-4o``) and a fine-tune prefix (``ft:gpt-4o-mini:…``) are
    ignored. gpt-oss uses o200k_harmony, whose ranks are o200k_base's, so text counts the same.
    """
    if not model:
        return None
    name = model.strip().lower()
    if name.startswith("ft:"):
        name = name[3:]
    name = name.rsplit("/", 1)[-1]
    if name.startswith("ft:"):
        name = name[3:]
    if _O200K_RE.match(name):
        return "o200k_base"
    if _CL100K_RE.match(name):
        return "cl100k_base"
    return None


def tokenizer_name(model: str | None) -> str:
    """``"o200k_base"``, ``"cl100k_base"`` or ``"approx"``: what counts ``model``'s tokens."""
    return encoding_for(model) or APPROX


def _scale(count: int, encoding: str | None) -> int:
    return count if encoding is not None else math.ceil(count * APPROX_FACTOR)


@lru_cache(maxsize=1024)
def _count_cached(text: str, encoding: str) -> int:
    # Repeated pieces (the job's system prompt, role names, tool schemas) are counted once.
    return cast(int, toktok.batch_count([text], encoding, threads=1)[0])


def _raw_counts(texts: Sequence[str], encoding: str) -> list[int]:
    if not texts:
        return []
    if len(texts) < 64:
        # A thread pool costs more than it saves on a handful of short strings.
        return cast(list[int], toktok.batch_count(texts, encoding, threads=1))
    return cast(list[int], toktok.batch_count(texts, encoding))


def count_text(text: str, model: str | None) -> int:
    """Tokens of ``text`` for ``model``: exact for OpenAI models, approximate otherwise.
    Special-token strings such as ``<|endoftext|>`` count as the ordinary text they are."""
    encoding = encoding_for(model)
    return _scale(_raw_counts([text], encoding or "o200k_base")[0], encoding)


# --- the pieces of a request -------------------------------------------------------------
#
# A request's input is described as (fixed tokens, shared texts, unique texts): shared texts
# repeat across rows and go through a cache; unique texts are counted in one batch call per
# chunk of rows, which is ~50× faster than one call per row.


class _Pieces:
    __slots__ = ("fixed", "shared", "unique")

    def __init__(self) -> None:
        self.fixed = 0
        self.shared: list[str] = []
        self.unique: list[str] = []


def _json_text(value: JSON) -> str:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()


def _add_content(content: JSON, out: list[str]) -> None:
    if content is None:
        return
    if isinstance(content, str):
        out.append(content)
    elif isinstance(content, list):
        for part in content:
            if isinstance(part, str):
                out.append(part)
            elif isinstance(part, dict):
                text = part.get("text")
                if isinstance(text, str):
                    out.append(text)
                # images, audio and files: not counted (their cost depends on the media)
    else:
        out.append(_json_text(content))


def _add_messages(messages: Iterable[Mapping[str, JSON]], pieces: _Pieces) -> None:
    for message in messages:
        pieces.fixed += TOKENS_PER_MESSAGE
        if not isinstance(message, Mapping):
            continue
        for key, value in message.items():
            if key == "role" and isinstance(value, str):
                pieces.shared.append(value)
            elif key in ("content", "parts"):  # "parts": a Gemini-shaped message
                _add_content(value, pieces.unique)
            elif isinstance(value, str):
                pieces.unique.append(value)
                if key == "name":
                    pieces.fixed += TOKENS_PER_NAME
            elif value is not None:
                pieces.unique.append(_json_text(value))
    pieces.fixed += TOKENS_REPLY_PRIMER


def _add_param_schemas(params: Mapping[str, JSON], pieces: _Pieces) -> None:
    for key in ("tools", "functions", "response_format"):
        value = params.get(key)
        if value:
            pieces.shared.append(_json_text(value))


def _add_response_schema(ctx: RequestContext, endpoint: str, pieces: _Pieces) -> None:
    """``--response-format``'s schema, in the form the vendor gets it: each vendor counts it
    as input (OpenAI's ``response_format``; Anthropic's tool definition plus the system
    prompt it adds for a forced tool; Gemini's ``responseSchema``)."""
    schema = ctx.response_schema
    if schema is None:
        return
    if endpoint == "anthropic":
        pieces.shared.append(_json_text(schema.anthropic_tool()))
        pieces.fixed += ANTHROPIC_TOOL_PROMPT_TOKENS
    elif endpoint == "gemini":
        pieces.shared.append(_json_text(schema.gemini_schema()))
    elif endpoint == "chat":
        pieces.shared.append(_json_text(schema.openai_response_format()))


def _has_system(messages: Sequence[Mapping[str, JSON]]) -> bool:
    # As the chat provider decides: the job's system prompt is prepended unless the
    # messages already open with a system (or developer) message.
    return bool(messages) and isinstance(messages[0], Mapping) \
        and messages[0].get("role") in ("system", "developer")


def _text_inputs(value: JSON, out: list[str]) -> None:
    """Texts of a completions ``prompt`` or embeddings ``input`` (a string or a list of them)."""
    if isinstance(value, str):
        out.append(value)
    elif isinstance(value, list):
        for item in value:
            if isinstance(item, str):
                out.append(item)
            elif isinstance(item, dict):  # Responses-API style input items
                _add_content(item.get("content"), out)


def _row_pieces(row: RequestRow, ctx: RequestContext, endpoint: str) -> _Pieces:
    pieces = _Pieces()
    if row.body is not None:
        body = row.body
        body_messages = body.get("messages")
        if isinstance(body_messages, list):
            _add_messages(body_messages, pieces)
            _add_param_schemas(body, pieces)
            _add_response_schema(ctx, endpoint, pieces)
        else:
            _text_inputs(body.get("prompt"), pieces.unique)
            _text_inputs(body.get("input"), pieces.unique)
        return pieces
    params: Mapping[str, JSON] = {**ctx.params, **row.params} if row.params else ctx.params
    if endpoint in ("completions", "embeddings") and row.messages is None:
        if row.prompt is not None:
            if ctx.system and endpoint == "completions":  # sent as "{system}\n\n{prompt}"
                pieces.unique.append(f"{ctx.system}\n\n{row.prompt}")
            else:
                pieces.unique.append(row.prompt)
        return pieces
    if row.messages is not None:
        if ctx.system and not _has_system(row.messages):
            pieces.fixed += TOKENS_PER_MESSAGE
            pieces.shared += ["system", ctx.system]
        _add_messages(row.messages, pieces)
    else:
        if ctx.system:
            pieces.fixed += TOKENS_PER_MESSAGE
            pieces.shared += ["system", ctx.system]
        pieces.fixed += TOKENS_PER_MESSAGE + TOKENS_REPLY_PRIMER
        pieces.shared.append("user")
        if row.prompt is not None:
            pieces.unique.append(row.prompt)
    _add_param_schemas(params, pieces)
    _add_response_schema(ctx, endpoint, pieces)
    return pieces


def row_model(row: RequestRow, ctx: RequestContext) -> str | None:
    """The model a row asks for: a Batch line's ``body.model``, else the row's, else the job's."""
    if row.body is not None:
        model = row.body.get("model")
        if isinstance(model, str) and model:
            return model
    return row.model or ctx.model


def count_messages(messages: Sequence[Mapping[str, JSON]], model: str | None) -> int:
    """Prompt tokens of a chat request made of ``messages`` alone, by OpenAI's accounting:
    3 per message + its fields' tokens (+1 for a ``name``) + 3 priming the reply."""
    pieces = _Pieces()
    _add_messages(messages, pieces)
    return _finish([pieces], encoding_for(model))[0]


def _finish(all_pieces: Sequence[_Pieces], encoding: str | None) -> list[int]:
    enc = encoding or "o200k_base"
    unique: list[str] = []
    for pieces in all_pieces:
        unique.extend(pieces.unique)
    counts = _raw_counts(unique, enc)
    totals: list[int] = []
    pos = 0
    for pieces in all_pieces:
        n = len(pieces.unique)
        total = pieces.fixed + sum(counts[pos:pos + n])
        pos += n
        for text in pieces.shared:
            total += _count_cached(text, enc)
        totals.append(_scale(total, encoding))
    return totals


def batch_input_tokens(rows: Sequence[RequestRow], ctx: RequestContext,
                       endpoint: str) -> list[int]:
    """:func:`request_input_tokens` for many rows at once (one tokenizer call per encoding);
    the fast path for estimates. Same results, in order."""
    groups: dict[str | None, list[int]] = {}
    all_pieces: list[_Pieces] = []
    for i, row in enumerate(rows):
        all_pieces.append(_row_pieces(row, ctx, endpoint))
        groups.setdefault(encoding_for(row_model(row, ctx)), []).append(i)
    out = [0] * len(rows)
    for encoding, indexes in groups.items():
        for i, total in zip(indexes, _finish([all_pieces[i] for i in indexes], encoding),
                            strict=True):
            out[i] = total
    return out


_PROBE: Final = "\x00batcher-prompt\x00"


def prompt_counter(ctx: RequestContext,
                   endpoint: str) -> Callable[[Sequence[str]], list[int]] | None:
    """A counter for rows that are nothing but a prompt (no model, params or body of their
    own): ``counter(prompts)`` equals :func:`batch_input_tokens` of such rows, in order, but
    builds no row and counts what every such request shares (the system prompt, roles, chat
    overhead, schemas) once. None when the prompt does not enter the request as one text
    of its own (then count rows with :func:`batch_input_tokens`)."""
    probe = RequestRow(id="", shape="prompt", source="", line=0, prompt=_PROBE)
    pieces = _row_pieces(probe, ctx, endpoint)
    if len(pieces.unique) != 1:
        return None
    text = pieces.unique[0]
    if text.count(_PROBE) != 1 or not text.endswith(_PROBE):
        return None
    prefix = text[:-len(_PROBE)]  # completions send "{system}\n\n{prompt}" as one text
    encoding = encoding_for(row_model(probe, ctx))
    enc = encoding or "o200k_base"
    shared_base: list[int] = []  # counted at the first call: loading the vocabulary takes
    # most of a second, which a caller may rather spend on a worker thread

    def count(prompts: Sequence[str]) -> list[int]:
        if not shared_base:
            _raw_counts([""], enc)  # loads the vocabulary, if nothing shared did
            shared_base.append(pieces.fixed + sum(_count_cached(text, enc)
                                                  for text in pieces.shared))
        base = shared_base[0]
        texts = [prefix + p for p in prompts] if prefix else prompts
        counts = _raw_counts(texts, enc)
        if encoding is None:
            return [_scale(base + n, None) for n in counts]
        return [base + n for n in counts] if base else counts

    return count


def request_input_tokens(row: RequestRow, ctx: RequestContext, endpoint: str) -> int:
    """Prompt tokens of the request ``row`` makes on ``endpoint``: the job's system prompt
    plus the prompt or messages (chat accounting on chat-style endpoints), or a Batch line's
    body (``messages``, ``prompt`` or ``input``). Exact for OpenAI chat/completions/embeddings
    text; approximate for other vendors' models, media parts and tool schemas."""
    return batch_input_tokens([row], ctx, endpoint)[0]


def _as_token_limit(value: JSON) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int) and value >= 0:
        return value
    if isinstance(value, float) and value >= 0 and value.is_integer():
        return int(value)
    return None


def _limit_in(params: Mapping[str, JSON]) -> int | None:
    for key in _MAX_TOKEN_KEYS:
        if key in params:
            limit = _as_token_limit(params[key])
            if limit is not None:
                return limit
    gen = params.get("generationConfig")  # Gemini's native field
    if isinstance(gen, Mapping) and "maxOutputTokens" in gen:
        return _as_token_limit(gen["maxOutputTokens"])
    return None


def request_max_output_tokens(row: RequestRow, ctx: RequestContext, endpoint: str) -> int:
    """The most output tokens the row's request asks for: ``max_completion_tokens`` /
    ``max_tokens`` (/ ``max_output_tokens``, Gemini's ``maxOutputTokens``) from the row's
    params laid over the job's (a Batch line: from its body), else DEFAULT_MAX_OUTPUT_TOKENS
    (also when the value is null); 0 for embeddings."""
    if endpoint == "embeddings" or (row.url is not None and "embeddings" in row.url):
        return 0
    if row.body is not None:
        limit = _limit_in(row.body)
        return DEFAULT_MAX_OUTPUT_TOKENS if limit is None else limit
    # Merged key by key as the request is built: a row's ``max_tokens: null`` lifts the job's.
    params = {**ctx.params, **row.params} if row.params else ctx.params
    limit = _limit_in(params)
    return DEFAULT_MAX_OUTPUT_TOKENS if limit is None else limit
