"""The one error hierarchy of batcher; retries and exit codes are decided by these types alone."""

from __future__ import annotations

import sys
from enum import IntEnum


class ExitCode(IntEnum):
    """Every exit code batcher gives (PRODUCT.md's list), in one place."""

    OK = 0
    FAILED_ROWS = 1
    """Finished, with rows written as errors or bad input rows skipped."""
    USAGE = 2
    """Usage, configuration or input error: nothing was sent."""
    ABORTED = 3
    """Stopped on purpose (auth, quota, budget, lock, server down, disk full): resumable."""
    PENDING = 75
    """Submitted and still pending (batch mode): run the same command later."""
    SIGINT = 130
    SIGTERM = 143


def fail(exc: BaseException, code: int) -> int:
    """Say ``exc`` as batcher's one-line error on stderr; return ``code``, the exit code."""
    print(f"batcher: error: {exc}", file=sys.stderr)
    return code


class BatcherError(Exception):
    """Base of every error batcher raises on purpose. ``exit_code`` is what the CLI exits with."""

    exit_code: ExitCode = ExitCode.USAGE


# --- usage, configuration and input (exit 2) -------------------------------------------


class ConfigError(BatcherError):
    """A bad option, job-file key or value; the message names the key."""

    exit_code: ExitCode = ExitCode.USAGE


class InputError(BatcherError):
    """Bad input: names the file, the line (JSONL) or row (Parquet), and the field.

    Raised for problems that stop the job (missing file, unreadable Parquet, ``--strict``);
    row-level problems are reported as :class:`InputProblem` values and the row is skipped.
    """

    exit_code: ExitCode = ExitCode.USAGE

    def __init__(self, source: str, message: str, line: int | None = None,
                 field: str | None = None) -> None:
        self.source = source
        self.line = line
        self.field = field
        self.detail = message
        where = source if line is None else f"{source}:{line}"
        what = f" field {field!r}:" if field else ""
        super().__init__(f"{where}:{what} {message}")


class StateMismatch(BatcherError):
    """The state beside an output belongs to a different job (input or request shape changed)."""

    exit_code: ExitCode = ExitCode.USAGE


# --- aborted runs (exit 3, resumable) ---------------------------------------------------


class Aborted(BatcherError):
    """The job stopped on purpose before finishing; state is kept, a rerun resumes."""

    exit_code: ExitCode = ExitCode.ABORTED


class LockHeld(Aborted):
    """Another live run holds the lock on this output."""


class BudgetExceeded(Aborted):
    """The next request would take spend past ``--max-cost``."""


class ServerDown(Aborted):
    """No request succeeded for the stated time while requests were being sent."""


class ServerRefuses(Aborted):
    """The same client error on many consecutive rows and no success: the server (or a
    gateway in front of it) refuses every request, whatever the row."""


# --- provider / transport errors --------------------------------------------------------


class ProviderError(BatcherError):
    """An answer (or the lack of one) that is not a usable result.

    ``status`` is the HTTP status when there was a response. Messages never contain the
    API key: they are built from the server's error text, which is truncated.
    """

    exit_code: ExitCode = ExitCode.ABORTED

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    @property
    def kind(self) -> str:
        """A short machine name for summaries, e.g. ``rate_limited``."""
        name = type(self).__name__
        return "".join("_" + c.lower() if c.isupper() else c for c in name).lstrip("_")


class Retryable(ProviderError):
    """Worth trying again after a wait. ``retry_after`` (seconds) is the server's advice."""

    def __init__(self, message: str, status: int | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message, status)
        self.retry_after = retry_after


class RateLimited(Retryable):
    """429 (or a vendor's rate-limit error body): the whole pool cools down for retry_after."""


class ServerError(Retryable):
    """5xx, 408, 409, Cloudflare 520–524, Anthropic 529/overloaded."""


class TransportError(Retryable):
    """Connection refused/reset, timeouts, a socket that never answered."""


class InvalidResponse(Retryable):
    """A 2xx whose body is not valid JSON or lacks the expected fields; a stream cut mid-way."""


class StreamCut(InvalidResponse):
    """A streamed answer that ended before its finish (no finish_reason / message_stop)."""


class SchemaError(Retryable):
    """A 2xx answer that is not valid JSON or does not fit ``--response-format``: sent again
    as a fresh request (it counts in ``attempts``). ``output`` is the answer's text and
    ``finish_reason`` its normalised finish, written on the error row once attempts run out."""

    def __init__(self, message: str, status: int | None = None, *, output: str | None = None,
                 finish_reason: str | None = None) -> None:
        super().__init__(message, status)
        self.output = output
        self.finish_reason = finish_reason

    @property
    def kind(self) -> str:
        return "schema"


class Fatal(ProviderError):
    """Never retried."""


class SchemaCut(Fatal):
    """The token limit (finish ``length``) cut the answer before its JSON was complete. Not
    retried: the same request gets the same limit, and every send is paid for. Written with
    ``error_type=schema`` and ``finish_reason=length``."""

    def __init__(self, message: str, status: int | None = None, *, output: str | None = None,
                 finish_reason: str | None = "length") -> None:
        super().__init__(message, status)
        self.output = output
        self.finish_reason = finish_reason

    @property
    def kind(self) -> str:
        return "schema"


class BadRequest(Fatal):
    """400, 404, 422 and other 4xx: this row fails, the job goes on."""


class Cancelled(Fatal):
    """The job was cancelled (``batcher cancel``) before this row was answered; written as an
    error (``error_type=cancelled``) that ``--retry-failed`` sends again."""


class JobFatal(Fatal):
    """An answer that means every further request would fail the same way: abort (exit 3)."""


class AuthError(JobFatal):
    """401/403: the key is wrong or lacks access."""


class QuotaExhausted(JobFatal):
    """429 with insufficient_quota / billing errors: credit is gone; waiting will not help."""
