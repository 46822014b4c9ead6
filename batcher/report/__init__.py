"""The run report: one self-contained HTML page per output (or a comparison of several).

``write_report([output], dest)`` aggregates each output (only the columns it needs, in
batches), reads its summary JSON when there is one, and writes one HTML page atomically. The
charts need the optional ``report`` extra (Altair and vl-convert); without it
:class:`ReportExtraMissing` (exit 2) names the install command.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import orjson

from batcher.errors import ConfigError

INSTALL_HINT = "pip install 'batcher[report]'"


class ReportExtraMissing(ConfigError):
    """The plotting libraries of the ``report`` extra are not installed."""


def require_extra() -> None:
    """Raise :class:`ReportExtraMissing` unless Altair and vl-convert are installed. Checked
    without importing them (they are loaded only to render, after the outputs are read, so
    their memory does not add to the reading's)."""
    for module in ("altair", "vl_convert"):
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # ValueError: a module set to None in sys.modules
            found = False
        if not found:
            raise ReportExtraMissing(f"the run report needs Altair and vl-convert ({module} "
                                     f"is not installed): {INSTALL_HINT}")


def _stem(output: Path) -> str:
    name = output.name
    return name[: -len(".parquet")] if name.endswith(".parquet") else name


def report_path(output: Path) -> Path:
    """``results.parquet`` → ``results.report.html`` (beside ``results.summary.json``)."""
    return output.with_name(_stem(output) + ".report.html")


def comparison_path(outputs: Sequence[Path]) -> Path:
    """Where a comparison of several outputs goes by default: beside the first one."""
    return outputs[0].with_name(_stem(outputs[0]) + ".comparison.report.html")


def job_comparison_path(job: str, outputs: Sequence[Path]) -> Path:
    """A job matrix's comparison page: ``JOB.comparison.report.html`` beside its first output."""
    return outputs[0].with_name(f"{job}.comparison.report.html")


def read_summary(output: Path) -> dict[str, Any] | None:
    """The output's ``*.summary.json`` as a dict; None when missing or unreadable."""
    path = output.with_name(_stem(output) + ".summary.json")
    try:
        doc = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None
    return doc if isinstance(doc, dict) else None


def write_report(outputs: Sequence[Path], dest: Path, *, redact: Callable[[str], str],
                 expected_column: str | None = None, title: str | None = None) -> Path:
    """Write one HTML report on ``outputs`` (side by side when several) to ``dest``,
    atomically (tmp + rename). Raises :class:`ReportExtraMissing`, or
    :class:`~batcher.errors.InputError` for an output that is missing or not a batcher output.
    """
    require_extra()
    from batcher.report.aggregate import aggregate_output

    found = []
    for output in outputs:
        summary = read_summary(output)
        label = _stem(output)
        found.append((label, str(output), summary, aggregate_output(output, expected_column)))
    from batcher.report.render import Section, page

    sections = [Section(label=label, output=where, summary=summary, stats=stats)
                for label, where, summary, stats in found]
    if title is None:
        job = next((s.summary.get("job") for s in sections if s.summary and
                    s.summary.get("job")), None)
        names = ", ".join(s.label for s in sections)
        title = f"Run report: {job}" if job else f"Run report: {names}"
    text = page(sections, title=title, redact=redact)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest
