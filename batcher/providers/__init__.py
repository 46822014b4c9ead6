"""Provider adapters, one per endpoint; importing this package registers them all."""

from batcher.providers.base import Provider, get_provider, provider_names, register

__all__ = ["Provider", "get_provider", "provider_names", "register"]
