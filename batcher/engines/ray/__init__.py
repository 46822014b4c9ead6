"""``--engine ray``: the live engine's sending on a Ray cluster, one rate limit for the cluster.

Importing this package imports Ray (``pip install 'batcher[ray]'``); :func:`batcher.engines.get_engine`
turns a missing Ray into a usage error that names the install command.
"""

from __future__ import annotations

from .data import RayScan
from .engine import RayEngine, connect
from .limiter import ClusterLimiter, LeasedSlots, lease_size
from .worker import Reply, SendWorker, WorkerSettings

__all__ = ["ClusterLimiter", "LeasedSlots", "RayEngine", "RayScan", "Reply", "SendWorker", "WorkerSettings",
           "connect", "lease_size"]
