"""The engines a job can run on (see :mod:`batcher.engine` for the contract)."""

from __future__ import annotations

from batcher.config import RunConfig
from batcher.engine import Engine
from batcher.engines.live import LiveEngine


def get_engine(config: RunConfig) -> Engine:
    """The engine for ``config``: today always the live one (``--mode live``)."""
    return LiveEngine(config)


__all__ = ["LiveEngine", "get_engine"]
