"""``python -m batcher``: the same as the ``batcher`` command."""

from batcher.cli import main

main()
