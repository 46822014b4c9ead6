"""The engines a job can run on (see :mod:`batcher.engine` for the contract)."""

from __future__ import annotations

from batcher.config import RunConfig
from batcher.engine import Engine
from batcher.engines.live import LiveEngine


def get_engine(config: RunConfig) -> Engine:
    """The engine for ``config``: ``--mode batch`` → the provider Batch APIs, else live."""
    if config.mode == "batch":
        from batcher.engines.batch import BatchEngine

        return BatchEngine(config)
    return LiveEngine(config)


__all__ = ["LiveEngine", "get_engine"]
