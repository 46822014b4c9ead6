"""Token and cost totals over result rows, with how many rows each total covers: never a silent 0."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from batcher.types import JSON

SPEND_KEYS = ("prompt_tokens_known", "completion_tokens_known", "cost_usd_known",
              "rows_priced", "rows_cost_unknown", "rows_usage_reported", "rows_usage_unknown")
"""The fields of :class:`Spend`, as stored (e.g. in a state's ``finalized_totals``)."""


@dataclass(slots=True)
class Spend:
    """Tokens and cost (US dollars) summed over results, and the rows each sum covers.

    A sum is only called a total when it covers every answered row: :attr:`cost_usd` is None
    when some ``ok`` row's cost is unknown (no price for its model, or no usage reported), and
    :attr:`prompt_tokens` / :attr:`completion_tokens` are None when some ``ok`` row's usage was
    not reported (a stream without a usage chunk). The ``*_known`` sums cover the rows counted
    in ``rows_priced`` / ``rows_usage_reported``, so a partial figure always says how many rows
    it is for. Error rows carry no usage or cost and count in neither.
    """

    prompt_tokens_known: int = 0
    completion_tokens_known: int = 0
    cost_usd_known: float = 0.0
    rows_priced: int = 0
    """rows whose ``cost_usd`` is known (and summed in ``cost_usd_known``)."""
    rows_cost_unknown: int = 0
    """``ok`` rows whose ``cost_usd`` is null."""
    rows_usage_reported: int = 0
    """rows with token counts (summed in ``*_tokens_known``)."""
    rows_usage_unknown: int = 0
    """``ok`` rows with neither ``prompt_tokens`` nor ``completion_tokens``."""

    def add_result(self, ok: bool, prompt_tokens: int | None, completion_tokens: int | None,
                   cost_usd: float | None) -> None:
        """Count one result row (its status and its token and cost columns)."""
        if prompt_tokens is not None or completion_tokens is not None:
            self.prompt_tokens_known += prompt_tokens or 0
            self.completion_tokens_known += completion_tokens or 0
            self.rows_usage_reported += 1
        elif ok:
            self.rows_usage_unknown += 1
        if cost_usd is not None:
            self.cost_usd_known += cost_usd
            self.rows_priced += 1
        elif ok:
            self.rows_cost_unknown += 1

    def add(self, other: Spend) -> None:
        for key in SPEND_KEYS:
            setattr(self, key, getattr(self, key) + getattr(other, key))

    @property
    def cost_usd(self) -> float | None:
        """The total cost, or None when some answered row's cost is unknown."""
        return None if self.rows_cost_unknown else self.cost_usd_known

    @property
    def prompt_tokens(self) -> int | None:
        """The total prompt tokens, or None when some answered row reported no usage."""
        return None if self.rows_usage_unknown else self.prompt_tokens_known

    @property
    def completion_tokens(self) -> int | None:
        """The total completion tokens, or None when some answered row reported no usage."""
        return None if self.rows_usage_unknown else self.completion_tokens_known

    def totals(self) -> dict[str, JSON]:
        """The totals (None when partial) beside the partial sums and their row counts, for
        summaries and ``batcher status``; dollar figures rounded to 6 decimals."""
        cost = self.cost_usd
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cost_usd": round(cost, 6) if cost is not None else None,
            "prompt_tokens_known": self.prompt_tokens_known,
            "completion_tokens_known": self.completion_tokens_known,
            "cost_usd_known": round(self.cost_usd_known, 6),
            "rows_priced": self.rows_priced,
            "rows_cost_unknown": self.rows_cost_unknown,
            "rows_usage_reported": self.rows_usage_reported,
            "rows_usage_unknown": self.rows_usage_unknown,
        }

    def to_json(self) -> dict[str, JSON]:
        """Every field, unrounded (what :meth:`from_json` reads back)."""
        return {key: getattr(self, key) for key in SPEND_KEYS}

    @classmethod
    def from_json(cls, data: Mapping[str, JSON]) -> Spend | None:
        """Read :meth:`to_json`'s output back; None when ``data`` lacks the row counts (written
        before they existed: the caller counts rows elsewhere). Values of the wrong type read
        as 0."""
        if not all(key in data for key in SPEND_KEYS):
            return None
        spend = cls()
        for key in SPEND_KEYS:
            value = data[key]
            number = value if isinstance(value, int | float) and not isinstance(value, bool) \
                else 0
            setattr(spend, key, float(number) if key == "cost_usd_known" else int(number))
        return spend
