"""structlog setup: readable console lines on a terminal, one JSON object per stderr line otherwise."""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from typing import Literal

import orjson
import structlog

LogFormat = Literal["console", "json"]


def _dumps(obj: object, **_: object) -> str:
    return orjson.dumps(obj, default=str).decode()


def configure_logging(fmt: LogFormat = "console", context: Mapping[str, object] | None = None,
                      *, level: int = logging.INFO) -> None:
    """Send every log line to stderr in ``fmt``; ``context`` (e.g. run_id, job) is bound to
    every line. JSON lines carry at least ``event``, ``level``, ``timestamp``, ``run_id``."""
    renderer: structlog.typing.Processor
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer(serializer=_dumps)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    structlog.reset_defaults()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(**(context or {}))


def bind_log_context(**context: object) -> None:
    """Add ``context`` (e.g. the job's name, once known) to every later log line."""
    structlog.contextvars.bind_contextvars(**context)


def get_logger() -> structlog.typing.FilteringBoundLogger:
    logger: structlog.typing.FilteringBoundLogger = structlog.get_logger("batcher")
    return logger
