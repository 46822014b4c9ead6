"""The local OpenAI-compatible simulator (``batcher simulate``); implemented in :mod:`batcher.simulator`."""

from batcher.simulator import *  # noqa: F403  (this module is the public name of the package)
from batcher.simulator import __all__ as __all__
