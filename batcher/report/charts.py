"""The report's charts: Vega-Lite specs built with Altair from aggregated figures, rendered to SVG.

Rendering is done here, in-process, by vl-convert (Vega's own renderer, compiled into the
wheel): the page gets finished SVG, so it needs no JavaScript, no CDN and no network when
opened. Only this module imports the optional ``report`` extra.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

import altair as alt
import vl_convert as vlc

from batcher.report.aggregate import BUCKET_S, Bucket, Distribution, OutputStats

WIDTH = 720
MAX_POINTS = WIDTH // 2
"""Throughput bars drawn at most (two pixels each); a longer span is drawn in wider buckets (a
multiple of 10 s, stated in the chart's title): more bars than pixels would show nothing more
and cost the page size and the renderer's memory."""


@dataclass(frozen=True, slots=True)
class Chart:
    """One rendered chart: a stable name (the figure's id), a caption, its SVG."""

    name: str
    title: str
    svg: str


def render(name: str, title: str, chart: alt.TopLevelMixin) -> Chart:
    svg = vlc.vegalite_to_svg(chart.to_dict())
    return Chart(name=name, title=title, svg=svg)


def _data(values: Sequence[dict[str, Any]]) -> alt.Data:
    """Inline data (altair's ``Data`` constructor is untyped)."""
    data: alt.Data = cast(Any, alt.Data)(values=list(values))
    return data


def _iso(epoch_s: int) -> str:
    return datetime.fromtimestamp(epoch_s, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def throughput(stats: OutputStats, name: str = "throughput") -> Chart | None:
    """Rows/s per bucket of ``completed_at`` (gaps drawn as 0, so a stall shows), with the
    buckets that had retries or 429s marked."""
    if not stats.buckets:
        return None
    first, last = min(stats.buckets), max(stats.buckets)
    span = (last - first) // BUCKET_S + 1
    factor = max(1, -(-span // MAX_POINTS))
    width_s = BUCKET_S * factor
    coarse: dict[int, Bucket] = {}
    for when, b in stats.buckets.items():  # sparse: a long idle span costs nothing
        c = coarse.setdefault(first + (when - first) // width_s * width_s, Bucket())
        c.rows, c.errors = c.rows + b.rows, c.errors + b.errors
        c.retries, c.rate_limited = c.retries + b.retries, c.rate_limited + b.rate_limited
    points: list[dict[str, Any]] = []
    marks: list[dict[str, Any]] = []
    for start, c in sorted(coarse.items()):  # a bucket without rows is a gap: a stall shows
        at, rate = _iso(start), c.rows / width_s
        points.append({"start": at, "end": _iso(start + width_s), "rows_per_s": rate,
                       "errors_per_s": c.errors / width_s})
        if c.rate_limited or c.retries:
            marks.append({"start": at, "rows_per_s": rate,
                          "marker": "429" if c.rate_limited else "retries"})
    x = alt.X("start:T", title="completed at (UTC)", scale=alt.Scale(type="utc"),
              axis=alt.Axis(format="%H:%M:%S", labelOverlap=True))
    base = alt.Chart(_data(points))
    layers: list[Any] = [
        base.mark_bar(color="#4c78a8", orient="vertical").encode(x=x, x2="end:T",
                                              y=alt.Y("rows_per_s:Q", title="rows/s")),
        base.mark_bar(color="#d62728", orient="vertical").encode(x=x, x2="end:T", y="errors_per_s:Q"),
    ]
    if marks:
        layers.append(alt.Chart(_data(marks)).mark_point(filled=True, size=40, yOffset=-6).encode(
            x=x, y="rows_per_s:Q",
            color=alt.Color("marker:N", title="bucket had",
                            scale=alt.Scale(domain=["429", "retries"],
                                            range=["#9467bd", "#ff7f0e"]))))
    chart = alt.layer(*layers).properties(width=WIDTH, height=220)
    title = (f"Throughput: rows/s per {width_s} s of completed_at (red: errors/s; marked: "
             "buckets whose rows were retried or answered 429)")
    return render(name, title, chart)


def histogram(dist: Distribution, name: str, what: str) -> Chart | None:
    """A histogram of ``dist`` (ms) with p50/p90/p99 drawn as rules."""
    bins = dist.histogram()
    if not bins:
        return None
    p = dist.percentiles()
    bars = alt.Chart(_data([{"start": s, "end": e, "count": c} for s, e, c in bins]))
    chart_bars = bars.mark_bar().encode(
        x=alt.X("start:Q", bin="binned", title=f"{what} (ms)"), x2="end:Q",
        y=alt.Y("count:Q", title="rows"))
    rules = alt.Chart(_data([
        {"ms": v, "label": f"{label} {v:,.0f} ms"}
        for label, v in (("p50", p.p50), ("p90", p.p90), ("p99", p.p99)) if v is not None]))
    rule = rules.mark_rule(color="#d62728", strokeDash=[4, 3]).encode(x="ms:Q")
    text = rules.mark_text(align="left", dx=3, dy=-4, color="#d62728").encode(
        x="ms:Q", y=alt.value(10), text="label:N")
    chart = alt.layer(chart_bars, rule, text).properties(width=WIDTH, height=200)
    title = f"{what}: {p.count:,} rows; p50/p90/p99 past the last bin are shown at the edge"
    return render(name, title, chart)


def bars(name: str, title: str, values: Sequence[tuple[str, float]], *, x_title: str,
         color: str = "#4c78a8", fmt: str = ",.0f", x_max: float | None = None) -> Chart | None:
    """A horizontal bar per label, labelled with its value; ``x_max`` fixes the scale's end
    (shares: 1.0, so an all-zero chart still has an axis)."""
    if not values:
        return None
    data = _data([{"label": k, "value": v} for k, v in values])
    scale = alt.Scale(domain=[0, x_max]) if x_max is not None else alt.Scale()
    base = alt.Chart(data).encode(y=alt.Y("label:N", sort="-x", title=None),
                                  x=alt.X("value:Q", title=x_title, scale=scale))
    chart = alt.layer(base.mark_bar(color=color),
                      base.mark_text(align="left", dx=3).encode(text=alt.Text("value:Q",
                                                                              format=fmt)))
    height = max(40, 22 * len(values))
    return render(name, title, chart.properties(width=WIDTH - 200, height=height))


def grouped_bars(name: str, title: str, values: Sequence[tuple[str, str, float]], *,
                 x_title: str) -> Chart | None:
    """Horizontal bars per (label, series): one band per label, its series side by side in it."""
    if not values:
        return None
    data = _data([{"label": k, "series": s, "value": v} for k, s, v in values])
    chart = alt.Chart(data).mark_bar().encode(
        y=alt.Y("label:N", title=None, sort=None), yOffset=alt.YOffset("series:N"),
        x=alt.X("value:Q", title=x_title), color=alt.Color("series:N", title=None))
    height = max(40, 14 * len(values) + 8 * len({k for k, _, _ in values}))
    return render(name, title, chart.properties(width=WIDTH - 200, height=height))
