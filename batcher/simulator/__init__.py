"""The local OpenAI-compatible simulator: a fake provider to rehearse jobs and to test against.

Public API (also importable from :mod:`batcher.simulate`): :class:`SimConfig`,
:func:`sim_config_from`, :data:`SIM_OPTIONS`, :func:`make_app`, :data:`STATS_KEY`,
:class:`Stats`, :class:`SimulatorThread` and :func:`serve`. Wire formats and the token rule
are described in :mod:`batcher.simulator.wire` (request checks in
:mod:`batcher.simulator.parse`), the order of checks and faults in
:mod:`batcher.simulator.app`, rate-limit slices in :mod:`batcher.simulator.limits`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from batcher.simulator.app import STATS_KEY, make_app
    from batcher.simulator.config import SIM_OPTIONS, SimConfig, SimOption, sim_config_from
    from batcher.simulator.run import SimulatorThread, serve
    from batcher.simulator.stats import Stats
    from batcher.simulator.wire import answer_text, count_tokens

# Loaded on first use, so that `batcher --help` (which lists the simulator's options from
# batcher.simulator.config) does not import the server and aiohttp.
_HOME = {"STATS_KEY": "app", "make_app": "app", "SIM_OPTIONS": "config", "SimConfig": "config",
         "SimOption": "config", "sim_config_from": "config", "SimulatorThread": "run",
         "serve": "run", "Stats": "stats", "answer_text": "wire", "count_tokens": "wire"}


def __getattr__(name: str) -> object:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module 'batcher.simulator' has no attribute {name!r}")
    return getattr(importlib.import_module(f"batcher.simulator.{home}"), name)


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
