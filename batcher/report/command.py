"""What ``batcher report`` does: which pages to write for the given outputs and job files.

Kept apart from :mod:`batcher.commands` so that reporting on a big output does not load the
runner, the HTTP client and the price tables (~25 MB of RSS it would not use).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from batcher.errors import ConfigError
from batcher.jobfile import is_job_file, job_outputs, load_job
from batcher.report import comparison_path, job_comparison_path, report_path, write_report
from batcher.report.aggregate import has_results
from batcher.secrets import redactor

REPORT_KEY_ENVS = ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "GEMINI_API_KEY")
"""Key variables whose values a report masks besides the job's own ``api_key_env``."""

Page = tuple[list[Path], Path]
"""The outputs one page reports on, and where it goes."""


def report_redactor(api_key_env: str | None) -> Callable[[str], str]:
    """Masks, in every text a report repeats, the keys held by the environment variables a
    job could have used. Errors in an output were already redacted when written (with the
    run's key and secret headers): this is the second line, for keys of the same names."""
    names = dict.fromkeys([*([api_key_env] if api_key_env else []), *REPORT_KEY_ENVS])
    masks = [redactor(os.environ.get(name, ""), {}) for name in names]

    def redact(text: str) -> str:
        for mask in masks:
            text = mask(text)
        return text

    return redact


def plan_pages(targets: list[Path], dest: Path | None) -> tuple[list[Page], str | None]:
    """The pages to write, and a job file's ``api_key_env`` (for redaction).

    One output: ``OUT.report.html`` beside it. Several outputs: one comparison page beside the
    first. A job file: each of its outputs that exists, and for a matrix also
    ``JOB.comparison.report.html``. ``dest`` replaces the path of the only page, or of one job
    file's comparison page. Raises :class:`ConfigError` (exit 2) for a missing output, a job
    none of whose outputs exists, or a ``dest`` that would name several pages."""
    pages: list[Page] = []
    api_key_env: str | None = None
    for target in targets:
        if not is_job_file(target):
            continue
        runs = load_job(target, {})
        api_key_env = runs[0].values.get("api_key_env")
        found = [o for o in job_outputs(target) if has_results(o)]
        if not found:
            raise ConfigError(f"{target}: none of its outputs exists yet (has it run?)")
        pages += [([o], report_path(o)) for o in found]
        if len(found) > 1:
            pages.append((found, job_comparison_path(str(runs[0].values["job"]), found)))
    outputs = [t for t in targets if not is_job_file(t)]
    for output in outputs:
        if not has_results(output):
            raise ConfigError(f"{output}: no such output, and no answers in its state folder")
    if len(outputs) == 1:
        pages.append((outputs, report_path(outputs[0])))
    elif outputs:
        pages.append((outputs, comparison_path(outputs)))
    if dest is not None:
        if len(pages) > 1 and not (len(targets) == 1 and len(pages[-1][0]) > 1):
            raise ConfigError("-o/--output names one page: give one output, several outputs "
                              "(one comparison page) or one job file")
        pages[-1] = (pages[-1][0], dest)
    return pages, api_key_env


def run_report(targets: list[Path], dest: Path | None, *,
               expected_column: str | None) -> list[Path]:
    """Write the pages :func:`plan_pages` names; returns their paths. Raises
    :class:`~batcher.errors.BatcherError` (exit 2: usage, not an output, the extra missing)."""
    pages, api_key_env = plan_pages(targets, dest)
    redact = report_redactor(api_key_env)
    return [write_report(sources, page, redact=redact, expected_column=expected_column)
            for sources, page in pages]
