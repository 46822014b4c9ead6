"""The simulator's one validated configuration value, its scripted-fault grammar and CLI options."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Any, NamedTuple

RATE_FIELDS = (
    "fail_rate", "rate_429", "rate_429_bare", "rate_524", "rate_invalid_json",
    "rate_drop", "rate_hang", "rate_cut_stream",
)
"""The random-fault probabilities, in the order one uniform draw is tested against them."""

SCRIPT_WORDS = frozenset({"ok", "drop", "hang", "invalid-json", "cut-stream", "quota"})


class ScriptItem(NamedTuple):
    """One parsed scripted answer.

    ``kind`` is ``"ok"``, ``"status"`` (an error answer with ``status``), ``"drop"``,
    ``"hang"``, ``"invalid-json"``, ``"cut-stream"`` or ``"quota"``. ``retry_after`` (seconds)
    and ``retry_after_ms`` (milliseconds) are the retry headers to send with a status answer,
    None when not asked for.
    """

    kind: str
    status: int = 0
    retry_after: float | None = None
    retry_after_ms: float | None = None


def parse_script_item(text: str) -> ScriptItem:
    """Parse one script item; ValueError (naming ``--script``) when it is not valid.

    Grammar: ``ok | drop | hang | invalid-json | cut-stream | quota | STATUS(:OPT)*`` with
    STATUS a number in 400..599 and OPT ``retry-after=SECONDS`` or ``retry-after-ms=MS``
    (e.g. ``429:retry-after=2:retry-after-ms=2000``).
    A bare ``429`` carries no retry header (like ``rate_429_bare``); 520..524 answer
    Cloudflare-style HTML, every other status an error JSON in the endpoint's own shape.
    """
    item = text.strip().lower()
    if item in SCRIPT_WORDS:
        return ScriptItem(item)
    head, _, opts = item.partition(":")
    if not (head.isdigit() and 400 <= int(head) <= 599):
        raise ValueError(
            f"--script: unknown item {text!r} (expected ok, drop, hang, invalid-json, "
            f"cut-stream, quota or an HTTP status 400-599 such as 429:retry-after=2)")
    retry_after: float | None = None
    retry_after_ms: float | None = None
    for opt in filter(None, (o.strip() for o in opts.split(":"))):
        name, eq, value = opt.partition("=")
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not eq or not math.isfinite(number) or number < 0:
            raise ValueError(f"--script: bad option {opt!r} in {text!r} (need a number >= 0)")
        if name == "retry-after":
            retry_after = number
        elif name == "retry-after-ms":
            retry_after_ms = number
        else:
            raise ValueError(f"--script: unknown option {name!r} in {text!r} "
                             "(expected retry-after or retry-after-ms)")
    return ScriptItem("status", int(head), retry_after, retry_after_ms)


@dataclass(frozen=True)
class SimConfig:
    """How the simulator behaves. Validated on construction (ValueError names the option).

    Units: ``latency_ms``/``jitter_ms`` milliseconds (each answer waits latency ± a uniform
    jitter, never below 0); ``rpm`` requests and ``tpm`` tokens per minute, enforced in
    one-second slices (see :mod:`batcher.simulator.limits`); ``rate_*``/``fail_rate``
    probabilities in [0, 1] whose sum is at most 1 (one draw per request, so a request gets
    at most one fault); ``retry_after_s`` the Retry-After, in seconds, of random 429s;
    ``answer_tokens`` the typical answer length in tokens (1 token = 4 characters).
    ``omit_stream_usage``: OpenAI-shape streams (chat, completions) never carry a usage chunk,
    even when ``stream_options.include_usage`` asks for one, as some servers and gateways do.
    ``strict_rpm`` requests per minute admitted as a gateway's nginx ``limit_req`` with no
    burst does: one per ``60 / strict_rpm`` seconds since the last admitted request (see
    :class:`batcher.simulator.limits.IntervalLimiter`); refused requests get a 429 that
    carries a Retry-After of ``strict_retry_after`` seconds only when that is set (nginx
    sends none).
    ``rate_bad_schema``: the probability that a request asking for structured output (a JSON
    Schema) gets a 200 answer that breaks it (see :mod:`batcher.simulator.structured`); drawn
    apart from the fault rates, from its own seeded stream.
    ``script`` items (see :func:`parse_script_item`) are consumed one per API request, in
    arrival order, before anything else is decided; after the script, behaviour is normal.
    """

    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    rpm: float | None = None
    tpm: float | None = None
    fail_rate: float = 0.0
    rate_429: float = 0.0
    rate_429_bare: float = 0.0
    rate_524: float = 0.0
    rate_invalid_json: float = 0.0
    rate_drop: float = 0.0
    rate_hang: float = 0.0
    rate_cut_stream: float = 0.0
    require_key: str | None = None
    quota_exhausted: bool = False
    script: tuple[str, ...] = ()
    seed: int = 0
    answer_tokens: int = 16
    retry_after_s: float = 1.0
    omit_stream_usage: bool = False
    strict_rpm: float | None = None
    strict_retry_after: float | None = None
    rate_bad_schema: float = 0.0
    batch_seconds: float = 0.0
    batch_fail_rate: float = 0.0
    batch_expire_rate: float = 0.0
    batch_cancel_rate: float = 0.0
    batch_api: bool = True

    def __post_init__(self) -> None:
        for name in ("latency_ms", "jitter_ms", "retry_after_s", "batch_seconds"):
            _check_number(name, getattr(self, name), low=0.0)
        for name in ("rpm", "tpm", "strict_rpm"):
            value = getattr(self, name)
            if value is not None:
                _check_number(name, value, low=0.0)
                if value <= 0:
                    raise ValueError(f"{_flag(name)} must be > 0 (got {value!r})")
        if self.strict_retry_after is not None:
            _check_number("strict_retry_after", self.strict_retry_after, low=0.0)
            if self.strict_rpm is None:
                raise ValueError("--strict-retry-after needs --strict-rpm")
        batch_rates = ("batch_fail_rate", "batch_expire_rate", "batch_cancel_rate")
        if sum(getattr(self, name) for name in batch_rates) > 1.0 + 1e-9:
            raise ValueError("--batch-fail-rate, --batch-expire-rate and --batch-cancel-rate "
                             "must add up to at most 1")
        for name in (*RATE_FIELDS, "rate_bad_schema", *batch_rates):
            _check_number(name, getattr(self, name), low=0.0, high=1.0)
        total = sum(getattr(self, name) for name in RATE_FIELDS)
        if total > 1.0 + 1e-9:
            raise ValueError(f"the fault rates ({', '.join(_flag(n) for n in RATE_FIELDS)}) "
                             f"add up to {total:g}; their sum must be at most 1")
        if not isinstance(self.answer_tokens, int) or self.answer_tokens < 1:
            raise ValueError(f"--answer-tokens must be an integer >= 1 "
                             f"(got {self.answer_tokens!r})")
        if not isinstance(self.seed, int):
            raise ValueError(f"--seed must be an integer (got {self.seed!r})")
        if self.require_key is not None and not self.require_key:
            raise ValueError("--require-key must not be empty")
        if isinstance(self.script, str) or not isinstance(self.script, tuple):
            raise ValueError("--script must be a tuple of items")
        for item in self.script:
            parse_script_item(item)

    @property
    def fault_rate(self) -> float:
        """The probability that a request gets a random fault."""
        return float(sum(getattr(self, name) for name in RATE_FIELDS))

    def parsed_script(self) -> tuple[ScriptItem, ...]:
        return tuple(parse_script_item(item) for item in self.script)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check_number(name: str, value: object, low: float, high: float | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{_flag(name)} must be a number (got {value!r})")
    if value < low or (high is not None and value > high):
        bounds = f"between {low:g} and {high:g}" if high is not None else f">= {low:g}"
        raise ValueError(f"{_flag(name)} must be {bounds} (got {value!r})")


class SimOption(NamedTuple):
    """One ``batcher simulate`` option: the SimConfig field, its flag, value type and help."""

    name: str
    flag: str
    type: type
    help: str


SIM_OPTIONS: tuple[SimOption, ...] = (
    SimOption("latency_ms", "--latency-ms", float, "Mean added latency per answer (ms)."),
    SimOption("jitter_ms", "--jitter-ms", float, "Uniform +- jitter on the latency (ms)."),
    SimOption("rpm", "--rpm", float,
              "Enforce requests/minute in one-second slices; over the limit answers 429."),
    SimOption("tpm", "--tpm", float,
              "Enforce tokens/minute (prompt + max_tokens) in one-second slices."),
    SimOption("strict_rpm", "--strict-rpm", float,
              "Admit one request per 60/N s since the last admitted one, as nginx limit_req "
              "with no burst; the others answer 429 (no Retry-After unless asked)."),
    SimOption("strict_retry_after", "--strict-retry-after", float,
              "Retry-After (seconds) sent with --strict-rpm's 429s (default: none)."),
    SimOption("fail_rate", "--fail-rate", float, "Probability of a 500 (Anthropic path: 529)."),
    SimOption("rate_429", "--rate-429", float, "Probability of a random 429 with Retry-After."),
    SimOption("rate_429_bare", "--rate-429-bare", float,
              "Probability of a random 429 without any retry header."),
    SimOption("rate_524", "--rate-524", float, "Probability of a Cloudflare 524 HTML page."),
    SimOption("rate_invalid_json", "--rate-invalid-json", float,
              "Probability of a 200 whose body is not JSON."),
    SimOption("rate_drop", "--rate-drop", float,
              "Probability of closing the connection without an answer."),
    SimOption("rate_hang", "--rate-hang", float,
              "Probability of never answering (until the client gives up)."),
    SimOption("rate_cut_stream", "--rate-cut-stream", float,
              "Probability of cutting an answer mid-way (no [DONE] on streams)."),
    SimOption("require_key", "--require-key", str,
              "Answer 401 unless the request carries this API key."),
    SimOption("quota_exhausted", "--quota-exhausted", bool,
              "Answer every request 429 insufficient_quota."),
    SimOption("script", "--script", str,
              "Scripted answers for successive requests, e.g. 429:retry-after=1,500,ok "
              "(comma-separated; repeatable)."),
    SimOption("seed", "--seed", int, "Seed of the fault and jitter draws."),
    SimOption("answer_tokens", "--answer-tokens", int, "Typical answer length in tokens."),
    SimOption("retry_after_s", "--retry-after", float,
              "Retry-After (seconds) sent with random 429s."),
    SimOption("rate_bad_schema", "--rate-bad-schema", float,
              "Probability that an answer to a JSON-Schema request breaks the schema (not "
              "JSON, or a required property missing); the others fit it."),
    SimOption("omit_stream_usage", "--omit-stream-usage", bool,
              "Streams (chat, completions) carry no usage, even when include_usage asks."),
    SimOption("batch_seconds", "--batch-seconds", float,
              "Batch APIs: seconds a batch takes to end (its counts grow meanwhile)."),
    SimOption("batch_fail_rate", "--batch-fail-rate", float,
              "Batch APIs: share of lines answered 500, the first time a custom_id is seen."),
    SimOption("batch_expire_rate", "--batch-expire-rate", float,
              "Batch APIs: share of lines left unanswered (the batch expires), first time."),
    SimOption("batch_cancel_rate", "--batch-cancel-rate", float,
              "Batch APIs: share of lines left unanswered (the batch is cancelled), first "
              "time."),
    SimOption("batch_api", "--no-batch-api", bool,
              "Serve no Batch API (its routes answer 404, as a live-only server)."),
)


def sim_config_from(**options: Any) -> SimConfig:
    """A SimConfig from CLI-style keyword options (field names, e.g. ``rate_429=0.1``).

    ``None`` means "not given" (the default is kept). ``script`` may be a string of
    comma/space separated items or an iterable of such strings (click's ``multiple=True``).
    Raises ValueError naming the option for unknown names and out-of-range values.
    """
    known = {f.name for f in fields(SimConfig)}
    values: dict[str, Any] = {}
    for name, value in options.items():
        if name not in known:
            raise ValueError(f"unknown simulator option {_flag(name)}")
        if value is None:
            continue
        if name == "script":
            value = _script_tuple(value)
        values[name] = value
    return SimConfig(**values)


def _script_tuple(value: str | Iterable[str]) -> tuple[str, ...]:
    parts = [value] if isinstance(value, str) else list(value)
    items: list[str] = []
    for part in parts:
        if not isinstance(part, str):
            raise ValueError(f"--script: items must be strings (got {part!r})")
        items.extend(p for p in part.replace(",", " ").split() if p)
    for item in items:
        parse_script_item(item)
    return tuple(items)
