"""Provider adapters, one per endpoint; importing this package registers them all."""

from urllib.parse import urlsplit

from batcher.errors import InputError
from batcher.providers import anthropic, gemini, openai  # noqa: F401  (registers adapters)
from batcher.providers.base import Provider, get_provider, provider_names, register
from batcher.types import RequestRow

BATCH_URLS = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completions",
    "/v1/embeddings": "embeddings",
}
"""The OpenAI Batch API ``url`` values we can send, and the endpoint that sends each."""


def provider_for_row(row: RequestRow, endpoint: str) -> Provider:
    """The adapter for one row: a Batch line's own ``url`` decides (``/v1/chat/completions``
    → chat, …; also accepted without ``/v1`` or as a full URL), any other row uses the job's
    ``endpoint``. An unknown Batch url raises InputError naming the row and field ``url``."""
    if row.shape != "batch":
        return get_provider(endpoint)
    path = urlsplit((row.url or "").strip()).path.rstrip("/")
    if not path.startswith("/v1/"):
        path = "/v1" + (path if path.startswith("/") else "/" + path)
    name = BATCH_URLS.get(path)
    if name is None:
        raise InputError(row.source, f"unsupported Batch url {row.url!r}; supported: "
                         f"{', '.join(BATCH_URLS)}", row.line, "url")
    return get_provider(name)


__all__ = ["BATCH_URLS", "Provider", "get_provider", "provider_for_row", "provider_names",
           "register"]
