"""The state beside an output, in parts: its record (fingerprint, scan and repair, meta),
its lock, and its status. The store itself is :mod:`batcher.checkpoint`."""
