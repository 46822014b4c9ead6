"""Pure wire formats of the simulator: deterministic answers, token counts, answer and error bodies.

Token counting (the one rule, used for usage, limits and truncation): a text of ``n``
characters (Unicode code points) is ``ceil(n / 4)`` tokens; a request's prompt is the
concatenation of every text it carries (system and message texts; images and other parts
are ignored). Answers are built of whole words, so a text cut to ``k`` tokens is its first
``4 k`` characters with trailing spaces removed.

Answers are deterministic: ``answer_text(prompt, n)`` starts with
``"Simulated answer #<first 8 hex of sha1(prompt)>:"`` followed by words chosen by that
hash, about ``n`` tokens long (within ±25 %, never more than 1.25 n + 1; whole words only,
except that a very short answer is a cut prefix). ``prompt`` is the last user turn.
"""

from __future__ import annotations

import base64
import hashlib
import struct
from collections.abc import Iterable
from functools import lru_cache

import orjson

from batcher.types import JSON

CHARS_PER_TOKEN = 4

Dialect = str
"""``"openai"``, ``"anthropic"`` or ``"gemini"``: whose error and event shapes to answer in."""

_VOCAB = (
    "alpha", "bravo", "cedar", "delta", "ember", "fable", "grove", "harbor", "island", "jade",
    "kettle", "lantern", "meadow", "nectar", "orbit", "pebble", "quartz", "river", "saddle",
    "timber", "umber", "velvet", "willow", "xenon", "yarrow", "zephyr", "amber", "basalt",
    "canyon", "dune", "echo", "fjord", "glacier", "hollow", "indigo", "juniper", "kelp",
    "lagoon", "marble", "nimbus", "opal", "prairie", "quiver", "ridge", "summit", "tundra",
    "upland", "valley", "wander", "yonder", "zenith", "acorn", "breeze", "cobalt", "drift",
    "fennel", "flint", "garnet", "heron", "ivory", "jasper", "kestrel", "linden", "maple",
)


def count_tokens(text: str) -> int:
    """``ceil(len(text) / 4)``: the simulator's token count of a text (0 for '')."""
    return -(-len(text) // CHARS_PER_TOKEN)


def truncate(text: str, max_tokens: int) -> str:
    """``text`` cut to at most ``max_tokens`` tokens."""
    return text[: max_tokens * CHARS_PER_TOKEN].rstrip()


@lru_cache(maxsize=4096)
def answer_text(prompt: str, target_tokens: int) -> str:
    """The deterministic answer to ``prompt``: about ``target_tokens`` tokens (±25 %)."""
    digest = hashlib.sha1(prompt.encode("utf-8", "surrogatepass")).digest()
    spread = target_tokens // 4
    length = max(1, target_tokens - spread + digest[0] % (2 * spread + 1))
    words = [f"Simulated answer #{digest.hex()[:8]}:"]
    budget = length * CHARS_PER_TOKEN
    size = len(words[0])
    stream = hashlib.shake_256(digest).digest(budget)
    for byte in stream:
        word = _VOCAB[byte % len(_VOCAB)]
        if size + 1 + len(word) > budget:
            break
        words.append(word)
        size += 1 + len(word)
    return truncate(" ".join(words), length)


def embedding_vector(text: str, dimensions: int) -> list[float]:
    """A deterministic unit vector for ``text`` (the same text always gives the same vector)."""
    raw = hashlib.shake_256(text.encode("utf-8", "surrogatepass")).digest(4 * dimensions)
    values = [v / 2147483648.0 - 1.0 for v in struct.unpack(f"<{dimensions}I", raw)]
    norm = sum(v * v for v in values) ** 0.5 or 1.0
    return [round(v / norm, 6) for v in values]


def embedding_base64(vector: list[float]) -> str:
    """OpenAI's ``encoding_format=base64``: little-endian float32 bytes, base64-encoded."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


def content_text(content: JSON) -> str:
    """The text of an OpenAI/Anthropic message content: a string or a list of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part["text"] for part in content
                       if isinstance(part, dict) and isinstance(part.get("text"), str))
    return ""


def parts_text(parts: JSON) -> str:
    """The text of a Gemini ``parts`` list."""
    if not isinstance(parts, list):
        return ""
    return "".join(p["text"] for p in parts if isinstance(p, dict) and isinstance(p.get("text"), str))


# --- answer bodies ----------------------------------------------------------------------


def chat_completion(rid: str, created: int, model: str, content: str, finish: str,
                    prompt_tokens: int, completion_tokens: int) -> dict[str, JSON]:
    return {
        "id": rid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": content, "refusal": None},
            "logprobs": None,
            "finish_reason": finish,
        }],
        "usage": openai_usage(prompt_tokens, completion_tokens),
        "system_fingerprint": "fp_sim",
    }


def openai_usage(prompt_tokens: int, completion_tokens: int) -> dict[str, JSON]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }


def chat_stream_frames(rid: str, created: int, model: str, content: str, finish: str,
                       prompt_tokens: int, completion_tokens: int,
                       include_usage: bool) -> list[bytes]:
    """SSE frames of a streamed chat answer: a role chunk, one chunk per word, the finish
    chunk, the usage chunk (``choices: []``) when ``include_usage``, then ``[DONE]``."""
    base: dict[str, JSON] = {"id": rid, "object": "chat.completion.chunk", "created": created,
                             "model": model, "system_fingerprint": "fp_sim"}
    extra: dict[str, JSON] = {"usage": None} if include_usage else {}

    def chunk(delta: dict[str, JSON], finish_reason: str | None) -> bytes:
        choice: dict[str, JSON] = {"index": 0, "delta": delta, "logprobs": None,
                                   "finish_reason": finish_reason}
        return sse({**base, "choices": [choice], **extra})

    frames = [chunk({"role": "assistant", "content": "", "refusal": None}, None)]
    frames.extend(chunk({"content": piece}, None) for piece in pieces(content))
    frames.append(chunk({}, finish))
    if include_usage:
        frames.append(sse({**base, "choices": [],
                           "usage": openai_usage(prompt_tokens, completion_tokens)}))
    frames.append(b"data: [DONE]\n\n")
    return frames


def text_completion(rid: str, created: int, model: str, texts: list[tuple[str, str]],
                    prompt_tokens: int, completion_tokens: int) -> dict[str, JSON]:
    """A legacy completion; ``texts`` holds (text, finish_reason) per prompt."""
    return {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"text": text, "index": i, "logprobs": None, "finish_reason": finish}
                    for i, (text, finish) in enumerate(texts)],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }


def completion_stream_frames(rid: str, created: int, model: str, texts: list[tuple[str, str]],
                             prompt_tokens: int, completion_tokens: int,
                             include_usage: bool) -> list[bytes]:
    base: dict[str, JSON] = {"id": rid, "object": "text_completion", "created": created,
                             "model": model}
    frames: list[bytes] = []
    for index, (text, finish) in enumerate(texts):
        for piece in pieces(text):
            choice: dict[str, JSON] = {"text": piece, "index": index, "logprobs": None, "finish_reason": None}
            frames.append(sse({**base, "choices": [choice]}))
        frames.append(sse({**base, "choices": [
            {"text": "", "index": index, "logprobs": None, "finish_reason": finish}]}))
    if include_usage:
        frames.append(sse({**base, "choices": [], "usage": {
            "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}}))
    frames.append(b"data: [DONE]\n\n")
    return frames


def embeddings_response(model: str, vectors: Iterable[list[float] | str],
                        prompt_tokens: int) -> dict[str, JSON]:
    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": v}
                 for i, v in enumerate(vectors)],
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }


def anthropic_message(rid: str, model: str, text: str, stop_reason: str,
                      input_tokens: int, output_tokens: int) -> dict[str, JSON]:
    return {
        "id": rid,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": text}],
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": anthropic_usage(input_tokens, output_tokens),
    }


def anthropic_usage(input_tokens: int, output_tokens: int) -> dict[str, JSON]:
    return {"input_tokens": input_tokens, "output_tokens": output_tokens,
            "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}


def anthropic_stream_frames(rid: str, model: str, text: str, stop_reason: str,
                            input_tokens: int, output_tokens: int) -> list[bytes]:
    """Anthropic's event stream: message_start, content_block_start, ping, one
    content_block_delta per word, content_block_stop, message_delta, message_stop."""
    start = anthropic_message(rid, model, "", stop_reason, input_tokens, 1)
    start.update(content=[], stop_reason=None)
    frames = [
        event("message_start", {"type": "message_start", "message": start}),
        event("content_block_start", {"type": "content_block_start", "index": 0,
                                      "content_block": {"type": "text", "text": ""}}),
        event("ping", {"type": "ping"}),
    ]
    frames.extend(
        event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                      "delta": {"type": "text_delta", "text": piece}})
        for piece in pieces(text))
    frames += [
        event("content_block_stop", {"type": "content_block_stop", "index": 0}),
        event("message_delta", {"type": "message_delta",
                                "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                                "usage": {"output_tokens": output_tokens}}),
        event("message_stop", {"type": "message_stop"}),
    ]
    return frames


def anthropic_tool_frames(rid: str, model: str, block: dict[str, JSON], text: str,
                          stop_reason: str, input_tokens: int,
                          output_tokens: int) -> list[bytes]:
    """Anthropic's event stream of one tool_use ``block``: its ``input`` sent as
    ``input_json_delta`` pieces of ``text`` (the input's JSON, cut when the answer was)."""
    start = anthropic_message(rid, model, "", stop_reason, input_tokens, 1)
    start.update(content=[], stop_reason=None)
    frames = [
        event("message_start", {"type": "message_start", "message": start}),
        event("content_block_start", {"type": "content_block_start", "index": 0,
                                      "content_block": {**block, "input": {}}}),
    ]
    frames.extend(
        event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                      "delta": {"type": "input_json_delta",
                                                "partial_json": text[i:i + 16]}})
        for i in range(0, len(text), 16))
    frames += [
        event("content_block_stop", {"type": "content_block_stop", "index": 0}),
        event("message_delta", {"type": "message_delta",
                                "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                                "usage": {"output_tokens": output_tokens}}),
        event("message_stop", {"type": "message_stop"}),
    ]
    return frames


def gemini_response(rid: str, model: str, text: str, finish: str | None,
                    prompt_tokens: int, output_tokens: int) -> dict[str, JSON]:
    candidate: dict[str, JSON] = {"content": {"role": "model", "parts": [{"text": text}]},
                                 "index": 0}
    if finish is not None:
        candidate["finishReason"] = finish
    return {
        "candidates": [candidate],
        "usageMetadata": gemini_usage(prompt_tokens, output_tokens),
        "modelVersion": model,
        "responseId": rid,
    }


def gemini_usage(prompt_tokens: int, output_tokens: int) -> dict[str, JSON]:
    return {"promptTokenCount": prompt_tokens, "candidatesTokenCount": output_tokens,
            "totalTokenCount": prompt_tokens + output_tokens}


def gemini_stream_chunks(rid: str, model: str, text: str, finish: str,
                         prompt_tokens: int, output_tokens: int) -> list[dict[str, JSON]]:
    """streamGenerateContent chunks: one per word, the last with finishReason and usage."""
    words = pieces(text) or [""]
    chunks = []
    done = ""
    for i, piece in enumerate(words):
        done += piece
        last = i == len(words) - 1
        chunks.append(gemini_response(rid, model, piece, finish if last else None,
                                      prompt_tokens, count_tokens(done)))
    chunks[-1]["usageMetadata"] = gemini_usage(prompt_tokens, output_tokens)
    return chunks


def pieces(text: str) -> list[str]:
    """``text`` split into stream deltas of one word each (spaces kept, so they re-join)."""
    words = text.split(" ")
    return [words[0], *(" " + w for w in words[1:])] if text else []


def sse(data: JSON) -> bytes:
    return b"data: " + orjson.dumps(data) + b"\n\n"


def event(name: str, data: JSON) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


# --- errors -----------------------------------------------------------------------------

# status -> (OpenAI type, OpenAI code, Anthropic type, Gemini status, message)
_ERRORS: dict[int, tuple[str, str | None, str, str, str]] = {
    400: ("invalid_request_error", None, "invalid_request_error", "INVALID_ARGUMENT",
          "Invalid request (simulated)."),
    401: ("invalid_request_error", "invalid_api_key", "authentication_error", "UNAUTHENTICATED",
          "Incorrect API key provided. You can find your API key in your account settings."),
    402: ("insufficient_quota", "insufficient_quota", "billing_error", "FAILED_PRECONDITION",
          "Payment required (simulated)."),
    403: ("permission_error", "unsupported_country_region_territory", "permission_error",
          "PERMISSION_DENIED", "You do not have access to this resource (simulated)."),
    404: ("invalid_request_error", "model_not_found", "not_found_error", "NOT_FOUND",
          "The model does not exist or you do not have access to it (simulated)."),
    408: ("timeout", None, "timeout_error", "DEADLINE_EXCEEDED", "Request timed out (simulated)."),
    409: ("conflict", None, "api_error", "ABORTED", "Conflict, please retry (simulated)."),
    413: ("invalid_request_error", None, "request_too_large", "INVALID_ARGUMENT",
          "Request too large (simulated)."),
    422: ("invalid_request_error", None, "invalid_request_error", "INVALID_ARGUMENT",
          "Unprocessable request (simulated)."),
    429: ("requests", "rate_limit_exceeded", "rate_limit_error", "RESOURCE_EXHAUSTED",
          "Rate limit reached (simulated). Please try again later."),
    500: ("server_error", None, "api_error", "INTERNAL",
          "The server had an error while processing your request (simulated)."),
    502: ("server_error", None, "api_error", "UNAVAILABLE", "Bad gateway (simulated)."),
    503: ("server_error", None, "overloaded_error", "UNAVAILABLE",
          "The service is temporarily overloaded (simulated)."),
    504: ("server_error", None, "api_error", "DEADLINE_EXCEEDED",
          "Gateway timeout (simulated)."),
    529: ("server_error", None, "overloaded_error", "UNAVAILABLE", "Overloaded (simulated)."),
}


def error_body(dialect: Dialect, status: int, message: str | None = None, *,
               type_: str | None = None, code: str | None = None, param: str | None = None,
               retry_delay: float | None = None) -> bytes:
    """An error body in ``dialect``'s shape for ``status``.

    OpenAI ``{"error": {message, type, param, code}}``; Anthropic
    ``{"type": "error", "error": {type, message}}``; Gemini
    ``{"error": {code, message, status[, details]}}`` where a ``retry_delay`` (seconds)
    becomes a ``google.rpc.RetryInfo`` detail. ``type_`` overrides the OpenAI/Anthropic type.
    """
    default = _ERRORS.get(status) or (
        ("server_error", None, "api_error", "UNAVAILABLE", f"HTTP {status} (simulated).")
        if status >= 500 else
        ("invalid_request_error", None, "invalid_request_error", "FAILED_PRECONDITION",
         f"HTTP {status} (simulated)."))
    oa_type, oa_code, an_type, g_status, default_message = default
    text = message or default_message
    data: dict[str, JSON]
    if dialect == "anthropic":
        data = {"type": "error", "error": {"type": type_ or an_type, "message": text}}
    elif dialect == "gemini":
        err: dict[str, JSON] = {"code": status, "message": text, "status": g_status}
        if retry_delay is not None:
            err["details"] = [{"@type": "type.googleapis.com/google.rpc.RetryInfo",
                               "retryDelay": google_duration(retry_delay)}]
        data = {"error": err}
    else:
        data = {"error": {"message": text, "type": type_ or oa_type, "param": param,
                          "code": code if code is not None else oa_code}}
    return orjson.dumps(data)


def quota_body(dialect: Dialect) -> bytes:
    """The "credit is gone" answer (sent with 429): OpenAI ``insufficient_quota``,
    Anthropic ``billing_error``, Gemini RESOURCE_EXHAUSTED with a QuotaFailure detail."""
    message = ("You exceeded your current quota, please check your plan and billing details "
               "(simulated).")
    if dialect == "gemini":
        return orjson.dumps({"error": {
            "code": 429, "message": message, "status": "RESOURCE_EXHAUSTED",
            "details": [{"@type": "type.googleapis.com/google.rpc.QuotaFailure",
                         "violations": [{"quotaId": "GenerateRequestsPerDayPerProjectPerModel",
                                         "quotaMetric": "generate_requests_per_day"}]}],
        }})
    if dialect == "anthropic":
        return error_body("anthropic", 429, "Your credit balance is too low to access the API "
                          "(simulated).", type_="billing_error")
    return error_body("openai", 429, message, type_="insufficient_quota",
                      code="insufficient_quota")


def google_duration(seconds: float) -> str:
    """A protobuf Duration in JSON form: ``2s``, ``0.35s``."""
    text = f"{seconds:.3f}".rstrip("0").rstrip(".")
    return f"{text}s"


def cloudflare_page(status: int) -> bytes:
    """A small Cloudflare-like HTML error page (520–524)."""
    titles = {520: "Web server is returning an unknown error", 521: "Web server is down",
              522: "Connection timed out", 523: "Origin is unreachable",
              524: "A timeout occurred"}
    title = titles.get(status, "Origin error")
    return (
        "<!DOCTYPE html>\n<html lang=\"en-US\"><head><meta charset=\"UTF-8\" />"
        f"<title>simulator.local | {status}: {title}</title></head>\n<body>"
        f"<div id=\"cf-error-details\"><h1>{title}</h1><span>Error code {status}</span>"
        "<p>The origin web server did not answer in time (simulated).</p>"
        "<p>Cloudflare Ray ID: 0000000000000000 &bull; Performance &amp; security by "
        "Cloudflare</p></div></body></html>\n"
    ).encode()


INVALID_JSON_BODY = b'{"id": "chatcmpl-sim", "object": "chat.completion", "choices": [{"ind'
"""A 200 body that is not valid JSON (a truncated answer, as flaky gateways send)."""
