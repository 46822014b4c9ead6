"""Job files (TOML): validate one file, merge the command line over it, expand a model matrix."""

from __future__ import annotations

import difflib
import glob
import math
import re
import string
import tomllib
import types
from collections.abc import Mapping
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from batcher.config import RunConfig, make_config
from batcher.errors import ConfigError
from batcher.io.location import is_url

JOB_ONLY_KEYS = ("input", "output", "models", "params", "prices", "headers", "name")
"""Keys a job file may hold beyond the ``run`` options (``input``/``output`` are both)."""

CLI_ONLY_KEYS = ("log_format", "no_progress", "no_report")
"""``run`` options that are not part of :class:`RunConfig`; passed through in ``values``."""

PRICE_KEYS = ("input", "output", "cached_input")
"""The keys of one ``[prices."MODEL"]`` entry, each USD per 1 M tokens."""

PLACEHOLDERS = ("job", "date", "datetime", "model")
"""What an output template may contain, as ``{name}``."""

DATE_FORMAT = "%Y-%m-%d"
DATETIME_FORMAT = "%Y-%m-%dT%H-%M-%S"  # no colons: the value lands in file names
_DATETIME_PATTERN = r"\d{4}-\d{2}-\d{2}T\d{2}-\d{2}-\d{2}"

# RunConfig fields a job file may not set: the job's name is the file's `name` or its stem;
# `cancelling` is set by `batcher cancel` alone.
_INTERNAL_KEYS = ("job", "cancelling")
_LOG_FORMATS = ("console", "json")
_SECRET_KEY_NAMES = frozenset({"api_key", "key", "openai_api_key", "authorization", "x_api_key",
                               "anthropic_api_key", "gemini_api_key", "google_api_key"})
# Prefixes of the keys of OpenAI (also sk-ant- of Anthropic), Google, Groq and xAI, and an
# Authorization header's value. A value that merely mentions one mid-sentence is not matched.
_SECRET_VALUE = re.compile(r"\s*(?:sk-|AIza|gsk_|xai-)\S|\s*Bearer\s+[\w.~+/=-]{8}")
# Key names are checked only where a key would sit: at the top, in [params] and [headers].
# Deeper down (a JSON schema in params.response_format) a property may well be called "key".
_SECRET_KEY_PARENTS = ("", "params", "headers")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_UNSAFE_IN_NAME = re.compile(r'[/\\:<>"|?*\s]')

Kind = Literal["string", "int", "number", "bool", "table", "any"]
_KIND_WORDS: dict[Kind, str] = {
    "string": "a string", "int": "an integer", "number": "a number", "bool": "true or false",
    "table": "a table", "any": "a value",
}


@dataclass(frozen=True)
class JobRun:
    """One run of a job: one model of a matrix, or the whole job when it has no matrix.

    ``values`` is ready for :func:`batcher.config.make_config` once the CLI-only keys
    (``log_format``, ``no_progress``, ``no_report``) are taken out: keys are RunConfig field names,
    ``input``/``output`` are absolute paths with the output template filled, ``job`` is the
    job's name, ``params`` and ``headers`` are the file's tables with the command line's on top.
    ``prices`` is the file's ``[prices]`` table: model → {input, output, cached_input} in USD
    per 1 M tokens, every rate a float >= 0.
    """

    model: str | None
    values: dict[str, Any]
    prices: dict[str, dict[str, float]]


def is_job_file(path: Path | str) -> bool:
    """True for a ``.toml`` path (whether or not it exists); never for a URL."""
    return not is_url(path) and Path(path).suffix.lower() == ".toml"


def load_job(path: Path, cli_values: Mapping[str, Any], *,
             now: datetime | None = None) -> list[JobRun]:
    """Read, validate and expand the job file at ``path``; one :class:`JobRun` per run.

    ``cli_values`` are the command line's values (None, or False for a flag, = not given); a
    given value overrides the file's. ``params`` and ``headers`` merge key by key, the command
    line's on top. CLI ``input``/``output`` paths are relative to the working directory, the
    file's to the file's folder; ``~`` is expanded and both come back absolute.

    The output template's ``{job}``, ``{date}`` (YYYY-MM-DD), ``{datetime}``
    (YYYY-MM-DDTHH-MM-SS) and ``{model}`` are filled from ``now`` (default: the current time)
    in UTC; ``{model}`` and ``{job}`` are made file-name safe (``/``, ``:`` … → ``_``).

    A matrix (``models = [...]``) gives one run per model, each with its own output, so the
    template must contain ``{model}``. A ``--model`` on the command line narrows a matrix to
    that one model (which need not be in the list).

    Raises :class:`ConfigError` naming the file and the key for: a TOML syntax error (with its
    line), a literal API key anywhere (the message never repeats it), an unknown key (with the
    closest valid one), a value of the wrong type or out of range, a missing input/output.
    """
    return _load(path, cli_values, now)[0]


def job_outputs(path: Path, *, now: datetime | None = None) -> list[Path]:
    """The outputs the job at ``path`` writes, one per run, for ``batcher status``.

    Templates are filled for ``now`` (default: the current time, UTC). For a template with
    ``{datetime}`` the newest run found on disk (its output or its state folder) is returned,
    else the path filled with ``now``. Raises :class:`ConfigError` like :func:`load_job`.
    """
    where = str(path)
    moment = _utc(now)
    runs, template = _load(path, {}, moment)
    outputs: list[Path] = []
    for run in runs:
        filled = Path(run.values["output"])
        if "datetime" in _placeholders(where, template):
            filled = _newest(where, template, str(run.values["job"]), run.model, moment) or filled
        outputs.append(filled)
    return outputs


def _load(path: Path, cli_values: Mapping[str, Any],
          now: datetime | None) -> tuple[list[JobRun], str]:
    """The runs of the job and its output template (absolute, unfilled)."""
    where = str(path)
    doc = _read_toml(path)
    _refuse_secrets(where, doc)
    raw = _normalise_keys(where, doc)
    file_values = {key: _check_value(where, key, written, value)
                   for key, (written, value) in raw.items()}

    models: list[str] | None = file_values.pop("models", None)
    prices: dict[str, dict[str, float]] = file_values.pop("prices", {})
    name = file_values.pop("name", None) or path.stem
    if models is not None and "model" in file_values:
        raise ConfigError(f"{where}: give either 'model' or 'models' (a matrix), not both")
    folder = path.expanduser().resolve().parent
    for key in ("input", "output", "cache", "response_format"):
        if key in file_values:
            file_values[key] = _absolute(folder, file_values[key])
    if models is not None and "output" in file_values:
        _require_model_placeholder(where, file_values["output"], "output")
    _check_with_config(where, file_values)

    values = _merge(file_values, cli_values)
    for key in ("input", "output"):
        if values.get(key) is None:
            raise ConfigError(f"{where}: missing {key!r} (a path relative to the job file, "
                              f"or -o/--output for the output)")
    if is_job_file(values["input"]):
        raise ConfigError(f"{where}: 'input' is a job file ({values['input']}); it must be the "
                          f"prompts (.jsonl or .parquet)")
    values["job"] = name

    run_models: list[str | None]
    if models is None or cli_values.get("model") is not None:
        run_models = [values.get("model")]
    else:
        run_models = list(models)
        _require_model_placeholder(where, values["output"], "output")

    moment = _utc(now)
    runs: list[JobRun] = []
    seen: dict[Path, str | None] = {}
    for model in run_models:
        output = Path(_fill(where, str(values["output"]), name, model, moment))
        if output in seen:
            raise ConfigError(f"{where}: models {seen[output]!r} and {model!r} would both write "
                              f"{output}; make 'output' tell them apart")
        seen[output] = model
        run_values = dict(values, output=output, model=model)
        if model is None:
            del run_values["model"]
        runs.append(JobRun(model=model, values=run_values, prices=prices))
    return runs, str(values["output"])


# --- reading and checking ---------------------------------------------------------------


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such job file") from None
    except tomllib.TOMLDecodeError as exc:
        # tomllib's message ends with "(at line N, column M)"; it never echoes the value.
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not valid TOML: the file is not UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the job file: {exc.strerror}") from None


def _refuse_secrets(where: str, doc: Mapping[str, Any]) -> None:
    """Refuse a job file that holds a key: job files get committed and shared.

    Runs before every other check so that no later message can quote the secret.
    """
    for parent, dotted, key, value in _walk(doc, ""):
        named = (key is not None and parent.replace("-", "_") in _SECRET_KEY_PARENTS
                 and key.strip().lower().replace("-", "_") in _SECRET_KEY_NAMES)
        if named or (isinstance(value, str) and _SECRET_VALUE.match(value)):
            raise ConfigError(
                f"{where}: holds a literal API key in {dotted!r}; put the key in an environment "
                f'variable and name it with api_key_env = "..."')


def _walk(value: object, dotted: str) -> list[tuple[str, str, str | None, object]]:
    """Every (parent, dotted key, own key, value) in a TOML document, arrays included."""
    found: list[tuple[str, str, str | None, object]] = []
    if isinstance(value, dict):
        for key, item in value.items():
            path = f"{dotted}.{key}" if dotted else str(key)
            found.append((dotted, path, str(key), item))
            found.extend(_walk(item, path))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            path = f"{dotted}[{index}]"
            found.append((dotted, path, None, item))
            found.extend(_walk(item, path))
    return found


def _allowed_keys() -> list[str]:
    config = [f.name for f in fields(RunConfig) if f.name not in _INTERNAL_KEYS]
    extra = [k for k in (*JOB_ONLY_KEYS, *CLI_ONLY_KEYS) if k not in config]
    return config + extra


def _normalise_keys(where: str, doc: Mapping[str, Any]) -> dict[str, tuple[str, Any]]:
    """Top-level key (dashes read as underscores) → (key as written, value); unknown keys
    refused with a suggestion."""
    allowed = _allowed_keys()
    out: dict[str, tuple[str, Any]] = {}
    for written, value in doc.items():
        key = written.replace("-", "_")
        if key not in allowed:
            raise ConfigError(f"{where}: unknown key {written!r}{_suggest(key, allowed)}")
        if key in out:
            raise ConfigError(f"{where}: key {key!r} is given twice (dashes and underscores "
                              f"are the same)")
        out[key] = (written, value)
    return out


def _suggest(key: str, allowed: list[str]) -> str:
    if key == "job":
        return " (did you mean 'name'?)"
    close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _config_kinds() -> dict[str, Kind]:
    """Each RunConfig field's expected TOML kind, read from its annotation so new fields
    are checked without a second list to keep in step."""
    kinds: dict[str, Kind] = {}
    for name, hint in get_type_hints(RunConfig).items():
        args = [a for a in get_args(hint) if a is not type(None)]
        if len(args) > 1 and all(a in (str, Path) for a in args):
            hint = str     # a path or a URL
        if get_origin(hint) in (Union, types.UnionType) and len(args) == 1:
            hint = args[0]
        kinds[name] = _kind_of(hint)
    return kinds


def _kind_of(hint: Any) -> Kind:
    if hint is bool:
        return "bool"
    if hint is int:
        return "int"
    if hint is float:
        return "number"
    if hint is str or hint is Path:
        return "string"
    if get_origin(hint) in (Mapping, dict):
        return "table"
    return "any"


def _check_value(where: str, key: str, written: str, value: Any) -> Any:
    """The value of top-level ``key`` checked for type; tables and lists checked inside.
    Messages name the key as ``written`` in the file."""
    if key == "models":
        return _check_models(where, value)
    if key == "prices":
        return _check_prices(where, value)
    if key == "params":
        _expect(where, written, value, "table")
        for name, item in value.items():
            _check_json(where, f"{written}.{name}", item)
        return dict(value)
    if key == "headers":
        _expect(where, written, value, "table")
        for name, item in value.items():
            _expect(where, f"{written}.{name}", item, "string")
        return dict(value)
    if key == "log_format":
        _expect(where, written, value, "string")
        if value not in _LOG_FORMATS:
            raise ConfigError(f"{where}: 'log_format' must be one of {', '.join(_LOG_FORMATS)}, "
                              f"got {value!r}")
        return value
    if key in ("no_progress", "no_report"):
        return _expect(where, written, value, "bool")
    if key == "name":
        _expect(where, written, value, "string")
        if not value.strip():
            raise ConfigError(f"{where}: 'name' must not be empty")
        return value
    value = _expect(where, written, value, _config_kinds().get(key, "any"))
    if key == "api_key_env" and not _ENV_NAME.fullmatch(value):
        raise ConfigError(f"{where}: 'api_key_env' must be the name of an environment variable "
                          f"(letters, digits, _), not the key itself")
    return value


def _expect(where: str, key: str, value: Any, kind: Kind) -> Any:
    ok = {
        "string": isinstance(value, str),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "number": isinstance(value, int | float) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
        "table": isinstance(value, dict),
        "any": True,
    }[kind]
    if not ok:
        raise ConfigError(f"{where}: {key!r} must be {_KIND_WORDS[kind]}, got "
                          f"{_describe(value)}")
    return value


def _describe(value: object) -> str:
    kind = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "an array", dict: "a table"}.get(type(value), "a date/time")
    shown = repr(value)
    return f"{kind} {shown}" if len(shown) <= 40 and not isinstance(value, dict | list) else kind


def _check_json(where: str, key: str, value: object) -> None:
    """Request parameters are sent as JSON: TOML dates and times have no JSON form."""
    if isinstance(value, dict):
        for name, item in value.items():
            _check_json(where, f"{key}.{name}", item)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_json(where, f"{key}[{index}]", item)
    elif not isinstance(value, str | int | float | bool):
        raise ConfigError(f"{where}: {key!r} is a TOML date/time, which JSON cannot carry; "
                          f"quote it as a string")


def _check_models(where: str, value: object) -> list[str]:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{where}: 'models' must be a non-empty array of model names, got "
                          f"{_describe(value)}")
    for index, item in enumerate(value):
        if not isinstance(item, str) or not item.strip():
            raise ConfigError(f"{where}: 'models[{index}]' must be a model name, got "
                              f"{_describe(item)}")
    duplicates = sorted({m for m in value if value.count(m) > 1})
    if duplicates:
        raise ConfigError(f"{where}: 'models' lists {duplicates[0]!r} twice")
    return list(value)


def _check_prices(where: str, value: Any) -> dict[str, dict[str, float]]:
    _expect(where, "prices", value, "table")
    table: dict[str, dict[str, float]] = {}
    for model, entry in value.items():
        key = f"prices.{model}"
        if not isinstance(entry, dict):
            raise ConfigError(f'{where}: {key!r} must be a table like [prices."{model}"] '
                              f"with input/output/cached_input, got {_describe(entry)}")
        rates: dict[str, float] = {}
        for written, rate in entry.items():
            name = written.replace("-", "_")
            if name not in PRICE_KEYS:
                raise ConfigError(f"{where}: unknown key {f'{key}.{written}'!r}"
                                  f"{_suggest(name, list(PRICE_KEYS))}")
            _expect(where, f"{key}.{written}", rate, "number")
            if not math.isfinite(rate) or rate < 0:
                raise ConfigError(f"{where}: {f'{key}.{written}'!r} must be a price >= 0 "
                                  f"(USD per 1M tokens), got {rate!r}")
            rates[name] = float(rate)
        table[model] = rates
    return table


def _check_with_config(where: str, file_values: Mapping[str, Any]) -> None:
    """Run the file's own values through make_config, which owns ranges and allowed values,
    so that a bad value is blamed on the file rather than on a flag or the environment."""
    probe = {k: v for k, v in file_values.items() if k in _config_kinds()}
    probe.setdefault("input", Path("input"))
    probe.setdefault("output", Path("output"))
    probe.setdefault("base_url", "http://localhost")  # the environment's is not the file's fault
    try:
        make_config(probe)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


# --- merging and filling ---------------------------------------------------------------


def _merge(file_values: Mapping[str, Any], cli_values: Mapping[str, Any]) -> dict[str, Any]:
    values = dict(file_values)
    for key in ("params", "headers"):
        values[key] = {**file_values.get(key, {}), **(cli_values.get(key) or {})}
    for key, value in cli_values.items():
        # A click flag cannot be switched off, so False only ever means "not given".
        if key in ("params", "headers") or value is None or value is False:
            continue
        if key in ("input", "output", "cache", "response_format"):
            value = _absolute(Path.cwd(), value)
        values[key] = value
    return values


def _absolute(folder: Path, value: str | Path) -> Path | str:
    """A path made absolute against ``folder``; a URL (an input's ``s3://…``) as it is."""
    if is_url(value):
        return value
    path = Path(value).expanduser()
    return path if path.is_absolute() else (folder / path).resolve()


def _utc(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(UTC)
    # A naive time is taken to be UTC already.
    return now.replace(tzinfo=UTC) if now.tzinfo is None else now.astimezone(UTC)


def _safe_name(text: str) -> str:
    return _UNSAFE_IN_NAME.sub("_", text)


def _placeholders(where: str, template: str) -> list[str]:
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ConfigError(f"{where}: 'output' template {template!r}: {exc} "
                          f"(write {{{{ and }}}} for literal braces)") from None
    names: list[str] = []
    for _, field_name, spec, conversion in parsed:
        if field_name is None:
            continue
        if field_name not in PLACEHOLDERS or spec or conversion:
            raise ConfigError(f"{where}: 'output' template has {{{field_name}}}; it may use "
                              + ", ".join("{" + p + "}" for p in PLACEHOLDERS))
        names.append(field_name)
    return names


def _require_model_placeholder(where: str, output: str | Path, key: str) -> None:
    if "model" not in _placeholders(where, str(output)):
        raise ConfigError(f"{where}: {key!r} must contain {{model}} when 'models' is given, "
                          f"so that each model writes its own output")


def _fill(where: str, template: str, job: str, model: str | None, moment: datetime,
          datetime_value: str | None = None) -> str:
    names = _placeholders(where, template)
    if "model" in names and model is None:
        raise ConfigError(f"{where}: 'output' uses {{model}} but no model is set "
                          f"(give 'model', 'models' or --model)")
    return template.format(
        job=_safe_name(job),
        date=moment.strftime(DATE_FORMAT),
        datetime=datetime_value if datetime_value is not None
        else moment.strftime(DATETIME_FORMAT),
        model=_safe_name(model) if model is not None else "",
    )


def _newest(where: str, template: str, job: str, model: str | None,
            moment: datetime) -> Path | None:
    """The newest output (or state folder of one) on disk matching a ``{datetime}`` template."""
    marker = "\0datetime\0"
    filled = _fill(where, template, job, model, moment, datetime_value=marker)
    pattern = glob.escape(filled).replace(glob.escape(marker), "*")
    parts = [re.escape(p) for p in filled.split(marker)]
    exact = re.compile(f"({_DATETIME_PATTERN})".join(parts) + r"(?:\.state)?")
    best: tuple[tuple[str, ...], Path] | None = None
    for found in glob.glob(pattern) + glob.glob(pattern + ".state"):
        match = exact.fullmatch(found)
        if match is None:
            continue
        stamp = tuple(group or "" for group in match.groups())
        output = Path(found[: -len(".state")] if found.endswith(".state") else found)
        if best is None or stamp > best[0]:
            best = (stamp, output)
    return best[1] if best is not None else None
