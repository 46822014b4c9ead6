from __future__ import annotations

import importlib

from batcher.config import RunConfig
from batcher.engine import Engine
from batcher.engines.live import LiveEngine
from batcher.errors import ConfigError

RAY_INSTALL = "pip install 'batcher[ray]'"


def get_engine(config: RunConfig) -> Engine:
    """The engine for ``config``: ``--mode batch`` → the provider Batch APIs; else by
    ``config.engine``: ``live`` (this process) or ``ray`` (a Ray cluster; without Ray
    installed a ConfigError, exit 2, that names the install command)."""
    if config.mode == "batch":
        from batcher.engines.batch import BatchEngine

        return BatchEngine(config)
    if config.engine == "ray":
        try:
            module = importlib.import_module("batcher.engines.ray")
        except ImportError as exc:
            raise ConfigError(f"--engine ray needs Ray, which is not installed ({exc}); "
                              f"install it with: {RAY_INSTALL}") from None
        engine: Engine = module.RayEngine(config)
        return engine
    return LiveEngine(config)


__all__ = ["RAY_INSTALL", "LiveEngine", "get_engine"]
