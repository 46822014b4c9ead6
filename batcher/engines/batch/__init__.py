"""Batch mode (``--mode batch``): rows sent through provider Batch APIs (see :mod:`.engine`)."""

from batcher.engines.batch.engine import BATCH_ID_COLUMN, BatchEngine, wire_for
from batcher.engines.batch.ledger import Ledger

__all__ = ["BATCH_ID_COLUMN", "BatchEngine", "Ledger", "wire_for"]
