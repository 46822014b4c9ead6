"""The local OpenAI-compatible simulator (``batcher simulate``); implemented in :mod:`batcher.simulator`."""

from batcher.simulator import (
    SIM_OPTIONS,
    STATS_KEY,
    SimConfig,
    SimOption,
    SimulatorThread,
    Stats,
    answer_text,
    count_tokens,
    make_app,
    serve,
    sim_config_from,
)

__all__ = [
    "SIM_OPTIONS",
    "STATS_KEY",
    "SimConfig",
    "SimOption",
    "SimulatorThread",
    "Stats",
    "answer_text",
    "count_tokens",
    "make_app",
    "serve",
    "sim_config_from",
]
