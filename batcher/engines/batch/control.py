"""``batcher status`` and ``batcher cancel`` for batch-mode outputs: the ledger's batches,
refreshed from the provider when its key is in the environment."""

from __future__ import annotations

import asyncio
import os
import time
from datetime import datetime
from pathlib import Path

from batcher.engines.batch.anthropic import AnthropicBatches
from batcher.engines.batch.client import BatchClient
from batcher.engines.batch.engine import ENDED_STATES, _auth_headers
from batcher.engines.batch.ledger import Ledger, PartRecord
from batcher.engines.batch.openai import OpenAIBatches
from batcher.engines.batch.wire import BatchWire
from batcher.errors import BatcherError, ConfigError
from batcher.pool import Transport
from batcher.providers.anthropic import anthropic_error
from batcher.providers.base import openai_error
from batcher.state.record import state_dir_for
from batcher.types import JSON

REFRESH_TIMEOUT = 15.0
"""Seconds per provider call when ``status``/``cancel`` ask the provider."""


def _wire(ledger: Ledger) -> BatchWire:
    return AnthropicBatches() if ledger.job.get("wire") == "anthropic" else OpenAIBatches()


def _client(ledger: Ledger, transport: Transport, *, attempts: int) -> BatchClient:
    env = str(ledger.job.get("api_key_env") or "OPENAI_API_KEY")
    wire = str(ledger.job.get("wire"))
    return BatchClient(transport, base_url=str(ledger.job.get("base_url")),
                       headers=_auth_headers(wire, os.environ.get(env, ""), {}),
                       to_error=anthropic_error if wire == "anthropic" else openai_error,
                       stop=asyncio.Event(), first_wait=0.5, attempts=attempts)


def _row(record: PartRecord) -> dict[str, JSON]:
    age: float | None = None
    if record.created_at:
        created = datetime.fromisoformat(record.created_at.replace("Z", "+00:00"))
        age = round(time.time() - created.timestamp(), 1)
    return {"part": record.part, "batch_id": record.batch_id, "state": record.state
            or ("submitting" if record.batch_id is None else "submitted"),
            "requests": record.requests, "counts": dict(record.counts), "age_s": age,
            "endpoint": record.endpoint}


async def _refresh(ledger: Ledger) -> str | None:
    """Poll every batch not known to have ended (the listing shows the answers; the ledger
    on disk is not changed). Returns a note when the provider could not be asked (the
    listing is then the last known)."""
    wire = _wire(ledger)
    try:
        async with Transport(concurrency=4, timeout=REFRESH_TIMEOUT) as transport:
            client = _client(ledger, transport, attempts=1)   # a status answers at once
            for record in ledger.parts.values():
                if record.batch_id is None or record.state in ENDED_STATES:
                    continue
                batch = await wire.get(client, record.batch_id)
                record.state, record.counts = batch.state, dict(batch.counts)
    except BatcherError as exc:
        return f"states as last seen: the provider could not be asked ({exc})"
    finally:
        ledger.close()
    return None


async def batch_listing(output: Path, *, refresh: bool = True) -> dict[str, JSON] | None:
    """The output's provider batches (None: not a batch-mode output): ``batches`` (part,
    batch id, state, counts, age in seconds) and a ``note`` when they are as last seen."""
    ledger = Ledger.read(state_dir_for(output))
    if ledger is None:
        return None
    note = None
    if refresh and ledger.parts:
        note = await _refresh(ledger)
    rows: list[JSON] = [_row(r) for r in sorted(ledger.parts.values(), key=lambda r: r.part)]
    return {"batches": rows, "note": note}


async def _cancel(ledger: Ledger) -> list[str]:
    wire = _wire(ledger)
    cancelled: list[str] = []
    try:
        async with Transport(concurrency=4, timeout=REFRESH_TIMEOUT) as transport:
            client = _client(ledger, transport, attempts=3)
            for record in ledger.parts.values():
                if record.batch_id is None or record.state in ENDED_STATES:
                    continue
                batch = await wire.cancel(client, record.batch_id)
                ledger.record_cancel(record.part)
                ledger.record_state(record.part, batch.state, dict(batch.counts))
                cancelled.append(batch.id)
    finally:
        ledger.close()
    return cancelled


async def cancel_batches(output: Path) -> list[str]:
    """Cancel the output's batches still running; returns their ids. ConfigError when the
    output has no batches."""
    ledger = Ledger.read(state_dir_for(output))
    if ledger is None:
        raise ConfigError(f"{output}: no provider batches recorded (was it run with "
                          "--mode batch?)")
    return await _cancel(ledger)
