"""batcher: run large numbers of LLM requests from a file, resumably, at the provider's limit."""

__version__ = "0.1.0"
