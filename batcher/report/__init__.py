"""The run report: one self-contained HTML page per output (or a comparison of several)."""
