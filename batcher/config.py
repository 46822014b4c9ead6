"""The validated configuration of one run: CLI flags, job file and environment, merged once."""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from batcher.errors import ConfigError
from batcher.schema import SCHEMA_PARAMS, ResponseSchema
from batcher.types import JSON, RequestContext

if TYPE_CHECKING:
    from batcher.io.readers import ReaderOptions

DEFAULT_CONCURRENCY = 64
DEFAULT_MAX_ATTEMPTS = 6
DEFAULT_MAX_RATE_LIMIT_WAIT = 3600.0
DEFAULT_TIMEOUT = 600.0
DEFAULT_BASE_URL = "https://api.openai.com/v1"
DEFAULT_BATCH_SIZE = 16
ENDPOINTS = ("chat", "completions", "embeddings", "anthropic", "gemini")
MODES = ("live", "batch")
BATCH_ENDPOINTS = ("chat", "completions", "embeddings", "anthropic")
"""Endpoints ``--mode batch`` can send through a provider Batch API (Gemini's is not supported)."""
ENGINES = ("live", "ray")
ENGINE_ALIASES = {"local": "live"}
"""PRODUCT.md names the one-machine engine ``local``; the code and the seam call it ``live``."""


ORDERS = ("input", "completion")
"""The output row orders (``--order``)."""

@dataclass(frozen=True)
class RunConfig:
    """Everything that shapes one run. Built by :func:`make_config`; never mutated.

    Units: ``timeout`` seconds per request (connect + answer), ``rpm`` requests per minute,
    ``tpm`` tokens per minute, ``max_cost`` US dollars, ``grace`` seconds to wait for
    in-flight answers after SIGINT/SIGTERM, ``server_down_after`` seconds without a single
    success (while requests were being sent) before the job aborts.
    """

    input: Path | str
    """A local path, or an object-store URL (``s3://…``, ``gs://…``: a str)."""
    output: Path
    model: str | None = None
    base_url: str = DEFAULT_BASE_URL
    api_key_env: str = "OPENAI_API_KEY"
    endpoint: str = "chat"
    system: str | None = None
    template: str | None = None
    id_column: str | None = None
    prompt_column: str | None = None
    params: Mapping[str, JSON] = field(default_factory=dict)
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    """Extra headers as given; a value ``env:NAME`` is read from the environment at run time."""
    concurrency: int = DEFAULT_CONCURRENCY
    batch_size: int = DEFAULT_BATCH_SIZE
    """Embeddings only: rows sent together in one request's ``input`` array."""
    rpm: float | None = None
    tpm: float | None = None
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    """Sends per row that failed for a reason other than a rate-limit 429."""
    max_rate_limit_wait: float = DEFAULT_MAX_RATE_LIMIT_WAIT
    """Seconds a row may keep being answered 429 (from its first 429) before it is an error."""
    timeout: float = DEFAULT_TIMEOUT
    max_cost: float | None = None
    price_input: float | None = None
    price_output: float | None = None
    prices: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    """Per-model price overrides (a job file's ``[prices]``): model → input/output/cached_input."""
    retry_failed: bool = False
    restart: bool = False
    force_resume: bool = False
    strict: bool = False
    keep_raw: bool = False
    grace: float = 30.0
    server_down_after: float = 60.0
    cache: Path | None = None
    """The response cache folder (``--cache``); None: no cache."""
    cache_nondeterministic: bool = False
    """Also cache (and serve) requests whose temperature is not 0."""
    response_format: Path | None = None
    """``--response-format``: a JSON Schema file every answer must fit (structured output)."""
    flatten: bool = False
    """With ``response_format``: one typed output column per top-level schema property."""
    order: str = "input"
    """The final output's row order: ``input`` (the input's, then ids the input no longer
    has) or ``completion`` (as answered; skips the input pass at finalize)."""
    engine: str = "live"
    """How rows are sent: ``live`` (this process's async pool) or ``ray`` (a Ray cluster)."""
    ray_address: str | None = None
    """``--engine ray``: the cluster to join (``auto``, ``ray://…``, ``host:port``); None
    starts a local Ray on this machine."""
    ray_actors: int | None = None
    """``--engine ray``: sending actors, each at ``concurrency``; None: one per cluster CPU."""
    job: str | None = None
    mode: str = "live"
    """``live``: one request per row through the pool; ``batch``: the provider's Batch API."""
    batch_max_requests: int | None = None
    """Batch mode: most requests per provider batch (None: the provider's own cap)."""
    poll_interval: float | None = None
    """Batch mode: seconds between progress polls (None: 10 s backing off to 60 s)."""
    no_wait: bool = False
    """Batch mode: submit, collect what has ended, and exit 75 while anything is pending."""
    cancelling: bool = False
    """Batch mode, set by ``batcher cancel`` (never a flag): cancel the running batches, wait
    for them to end, write what they answered and every other row as ``cancelled``."""

    @functools.cached_property
    def response_schema(self) -> ResponseSchema | None:
        """The loaded ``response_format`` schema (None without one)."""
        return None if self.response_format is None else ResponseSchema.load(self.response_format)

    def api_key(self) -> str:
        """The key from the environment variable named by ``api_key_env`` ('' when unset)."""
        return os.environ.get(self.api_key_env, "")

    def reader_options(self) -> ReaderOptions:
        """How this job's input is read: its id and prompt columns, its template."""
        from batcher.io.readers import ReaderOptions

        return ReaderOptions(id_column=self.id_column, prompt_column=self.prompt_column,
                             template=self.template)

    def request_context(self, *, sending: bool = True) -> RequestContext:
        """What every request of this job shares. For sending, with the API key and the
        headers (``env:`` values resolved), refusing (ConfigError, exit 2) to go keyless to
        a server that is not on this machine; a dry run (``sending=False``) needs neither."""
        if not sending:
            return RequestContext(base_url=self.base_url, model=self.model, system=self.system,
                                  params=dict(self.params), response_schema=self.response_schema)
        from batcher.secrets import check_key, resolve_headers

        headers = resolve_headers(self.headers)
        api_key = self.api_key()
        check_key(self.base_url, api_key, headers, self.api_key_env)
        return RequestContext(base_url=self.base_url, model=self.model, api_key=api_key,
                              system=self.system, params=dict(self.params), headers=headers,
                              response_schema=self.response_schema)

    @property
    def state_dir(self) -> Path:
        """The state folder beside the output: ``results.parquet`` → ``results.parquet.state``."""
        return self.output.with_name(self.output.name + ".state")

    @property
    def summary_path(self) -> Path:
        """``results.parquet`` → ``results.summary.json``."""
        stem = self.output.name
        stem = stem[: -len(".parquet")] if stem.endswith(".parquet") else stem
        return self.output.with_name(stem + ".summary.json")


def default_base_url() -> str:
    """``BATCHER_BASE_URL``, then ``OPENAI_BASE_URL``, then OpenAI's."""
    return (os.environ.get("BATCHER_BASE_URL") or os.environ.get("OPENAI_BASE_URL")
            or DEFAULT_BASE_URL)


_BOUNDS: dict[str, tuple[float, float]] = {
    "concurrency": (1, 100_000),
    "batch_size": (1, 2048),
    "rpm": (0.001, 1e9),
    "tpm": (1, 1e12),
    "max_attempts": (1, 100),
    "max_rate_limit_wait": (0, 7 * 86_400),
    "timeout": (0.001, 86_400),
    "max_cost": (0, 1e9),
    "price_input": (0, 1e6),
    "price_output": (0, 1e6),
    "grace": (0, 86_400),
    "server_down_after": (0.01, 86_400),
    "batch_max_requests": (1, 100_000),
    "poll_interval": (0.001, 86_400),
    "ray_actors": (1, 10_000),
}


_NO_FLAG = frozenset({"grace", "server_down_after", "prices", "job", "cancelling"})
"""Keys only a job file can set; every other key is also a ``--flag``."""


def option_name(key: str) -> str:
    """How a message names a setting: the flag and the job-file key, e.g. ``rpm (--rpm)``."""
    return key if key in _NO_FLAG else f"{key} (--{key.replace('_', '-')})"


def config_keys() -> list[str]:
    return [f.name for f in fields(RunConfig)]


def make_config(values: Mapping[str, Any]) -> RunConfig:
    """Validate and build a RunConfig from already-merged values (None means 'not given').

    Rejects unknown keys and out-of-range values with a message naming the key.
    """
    known = set(config_keys())
    unknown = [k for k in values if k not in known]
    if unknown:
        raise ConfigError(f"unknown option {unknown[0]!r}")
    given = {k: v for k, v in values.items() if v is not None}
    for key in ("input", "output"):
        if key not in given:
            raise ConfigError(f"missing {key!r}")
    from batcher.io.location import as_input, names_a_url

    if names_a_url(given["output"]):
        raise ConfigError(f"output: {given['output']} is a URL; the output (and its state "
                          "folder) must be a local path, on shared storage for a cluster")
    given["input"] = as_input(given["input"])
    given["output"] = Path(given["output"])
    if "cache" in given:
        given["cache"] = Path(given["cache"]).expanduser()
    given.setdefault("base_url", default_base_url())
    if given.get("endpoint", "chat") not in ENDPOINTS:
        raise ConfigError(
            f"endpoint: {given['endpoint']!r} is not one of {', '.join(ENDPOINTS)}")
    engine = ENGINE_ALIASES.get(given.get("engine", "live"), given.get("engine", "live"))
    if engine not in ENGINES:
        raise ConfigError(f"engine (--engine): {engine!r} is not one of {', '.join(ENGINES)}")
    given["engine"] = engine
    for key in ("ray_address", "ray_actors"):
        if key in given and engine != "ray":
            raise ConfigError(f"{option_name(key)} needs engine ray (--engine ray)")
    for key, (low, high) in _BOUNDS.items():
        if key in given:
            value = given[key]
            name = option_name(key)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"{name}: expected a number, got {value!r}")
            if key == "max_cost" and value <= 0:
                raise ConfigError(f"{name}: the spending cap must be more than 0 USD, got "
                                  f"{value:g}; leave it out for no cap")
            if not low <= value <= high:
                raise ConfigError(f"{name}: {value:g} is out of range [{low:g}, {high:g}]")
    if given.get("order", "input") not in ORDERS:
        raise ConfigError(f"order: {given['order']!r} is not one of {', '.join(ORDERS)}")
    _check_mode(given)
    if given.get("restart") and given.get("force_resume"):
        raise ConfigError("restart and force_resume contradict each other; give one")
    base = str(given["base_url"])
    if not base.startswith(("http://", "https://")):
        raise ConfigError(f"base_url: {base!r} must start with http:// or https://")
    if "response_format" in given:
        given["response_format"] = Path(given["response_format"]).expanduser()
    config = RunConfig(**given)
    _check_response_format(config)
    return config


def _check_mode(given: Mapping[str, Any]) -> None:
    """``mode`` is live or batch; batch mode needs an endpoint with a Batch API we speak."""
    mode = given.get("mode", "live")
    if mode not in MODES:
        raise ConfigError(f"mode (--mode): {mode!r} is not one of {', '.join(MODES)}")
    endpoint = given.get("endpoint", "chat")
    if mode == "batch" and endpoint not in BATCH_ENDPOINTS:
        raise ConfigError(f"mode (--mode) batch is not supported for the {endpoint} endpoint "
                          f"(batch mode speaks the OpenAI Batch API and Anthropic Message "
                          f"Batches: {', '.join(BATCH_ENDPOINTS)}); use --mode live")
    if mode == "batch" and given.get("engine", "live") not in ("live", "local"):
        raise ConfigError("mode (--mode) batch sends through the provider's Batch API from "
                          "this machine; --engine ray is for live mode: give one of them")
    if mode != "batch":
        for key in ("batch_max_requests", "poll_interval", "no_wait", "cancelling"):
            if given.get(key):
                raise ConfigError(f"{option_name(key)} needs --mode batch")


def _check_response_format(config: RunConfig) -> None:
    """Load the schema now (a bad file is exit 2 before anything is read or sent) and refuse
    what cannot work: an endpoint without structured output, a parameter the schema would
    overwrite, a schema Gemini cannot take, ``flatten`` without a schema."""
    schema = config.response_schema
    if schema is None:
        if config.flatten:
            raise ConfigError("flatten (--flatten) needs response_format (--response-format): "
                              "the columns come from the schema's properties")
        return
    if config.endpoint not in SCHEMA_PARAMS:
        raise ConfigError(f"response_format (--response-format): the {config.endpoint} endpoint "
                          f"takes no schema; use one of {', '.join(SCHEMA_PARAMS)}")
    config_block = config.params.get("generationConfig") or config.params.get("generation_config")
    given = set(config.params) | (set(config_block) if isinstance(config_block, Mapping) else set())
    for name in SCHEMA_PARAMS[config.endpoint]:
        if name in given:
            raise ConfigError(f"response_format (--response-format) sets {name!r}, and the job "
                              f"gives it as a parameter too (-p {name}=…); give one of them")
    if config.endpoint == "gemini":
        schema.gemini_schema()
