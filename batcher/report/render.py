"""The report's HTML: one self-contained page (inline CSS and SVG, no script, no external URL).

Every text that comes from an output or a summary (error messages, ids, the resume command) is
passed through the caller's redactor and HTML-escaped here; the finished page, SVG included,
goes through the redactor once more.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from batcher import __version__
from batcher.report import charts
from batcher.report.aggregate import OutputStats, model_order
from batcher.spend import Spend

Redact = Callable[[str], str]

MAX_ERROR_CHARS = 300


@dataclass(frozen=True, slots=True)
class Section:
    """One output to report on: where it is, its label, its summary JSON (None when there is
    none yet, e.g. mid-run) and its aggregated figures."""

    label: str
    output: str
    summary: Mapping[str, Any] | None
    stats: OutputStats


_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px auto;
max-width:980px;color:#222;padding:0 16px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:18px;margin:32px 0 8px;border-bottom:1px solid #ddd}
h3{font-size:15px;margin:20px 0 6px}
table{border-collapse:collapse;margin:6px 0 12px}td,th{padding:3px 10px;border-bottom:1px solid #eee;
text-align:left;vertical-align:top}th{background:#f6f6f6}td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
figure{margin:10px 0 18px}figcaption{color:#555;font-size:13px;margin-bottom:4px}
figure svg{max-width:100%;height:auto}
code,pre{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px;background:#f6f6f6}
pre{padding:6px 8px;white-space:pre-wrap;word-break:break-all}
.bad{color:#b00}.ok{color:#070}.muted{color:#777}
"""


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _int(n: int | None) -> str:
    return "unknown" if n is None else f"{n:,}"


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{x:.1%}"


def _ms(x: float | None) -> str:
    return "–" if x is None else f"{x:,.0f} ms"


def _usd(x: float | None) -> str:
    if x is None:
        return "unknown"
    return f"${x:,.4f}" if x >= 0.01 else f"${x:.6f}"


def cost_text(spend: Spend) -> str:
    """The total, or what is known of it: never a silent 0."""
    if spend.cost_usd is not None:
        return _usd(spend.cost_usd)
    return (f"unknown: {_usd(spend.cost_usd_known)} for {spend.rows_priced:,} priced rows, "
            f"{spend.rows_cost_unknown:,} rows without a price or usage")


def tokens_text(spend: Spend) -> str:
    if spend.prompt_tokens is not None and spend.completion_tokens is not None:
        return f"{spend.prompt_tokens:,} in / {spend.completion_tokens:,} out"
    return (f"unknown: {spend.prompt_tokens_known:,} in / {spend.completion_tokens_known:,} out "
            f"for {spend.rows_usage_reported:,} rows, {spend.rows_usage_unknown:,} without usage")


def _table(head: Sequence[str], rows: Sequence[Sequence[str]], numeric: Sequence[bool]) -> str:
    out = ["<table><tr>", *(f"<th>{_e(h)}</th>" for h in head), "</tr>"]
    for row in rows:
        out.append("<tr>")
        out.extend(f'<td class="n">{_e(v)}</td>' if num else f"<td>{_e(v)}</td>"
                   for v, num in zip(row, numeric, strict=True))
        out.append("</tr>")
    out.append("</table>")
    return "".join(out)


def _figure(chart: charts.Chart | None) -> str:
    if chart is None:
        return ""
    return (f'<figure class="chart" id="chart-{_e(chart.name)}"><figcaption>{_e(chart.title)}'
            f"</figcaption>{chart.svg}</figure>")


def _header(section: Section, redact: Redact) -> str:
    s, st = section.summary, section.stats
    rows: list[tuple[str, str]] = [("output", section.output)]
    if s is None:
        rows.append(("summary", "none yet (the run is in progress, or stopped before writing "
                                "one): figures below are from the output alone"))
    else:
        outcome = f"{s.get('outcome')} (exit {s.get('exit_code')})"
        if s.get("message"):
            outcome += f": {s['message']}"
        rows += [("job", str(s.get("job") or "–")), ("input", str(s.get("input", "–"))),
                 ("started", str(s.get("started_at", "–"))),
                 ("finished", str(s.get("finished_at", "–"))),
                 ("duration", f"{float(s.get('duration_s') or 0):,.1f} s"),
                 ("outcome", outcome)]
    rows.append(("model(s)", ", ".join(model_order([st])) or "–"))
    skipped = f", {int(s.get('skipped') or 0):,} bad input rows skipped" if s else ""
    rows.append(("rows", f"{st.rows:,}: {st.ok:,} ok, {st.error:,} error{skipped}"))
    if s and s.get("resumed"):
        rows.append(("resumed", f"{int(s['resumed']):,} rows were done before the last run; "
                                f"{int(s.get('sent_this_run') or 0):,} sent by it"))
    if s and s.get("cache_hits"):
        rows.append(("cache", f"{int(s['cache_hits']):,} rows served from the response cache"))
    rows += [("retries", f"{st.retries:,} attempts past the first"),
             ("tokens", tokens_text(st.spend)), ("cost", cost_text(st.spend))]
    out = ["<table>"]
    for key, value in rows:
        out.append(f"<tr><th>{_e(key)}</th><td>{_e(redact(value))}</td></tr>")
    out.append("</table>")
    if s and s.get("outcome") != "finished" and s.get("resume_command"):
        out.append(f"<p>Resume with:</p><pre>{_e(redact(str(s['resume_command'])))}</pre>")
    return "".join(out)


def model_rows(sections: Sequence[Section], *, with_output: bool) -> tuple[list[str], list[list[str]],
                                                                            list[bool]]:
    """The side-by-side table: one row per (output, model)."""
    accuracy = any(s.stats.expected_column for s in sections)
    head = [*(["output"] if with_output else []), "model", "rows", "error rate", "tokens in",
            "tokens out", "cost", "p50", "p90", "p99", "length finishes"]
    if accuracy:
        head.append("exact match")
    body: list[list[str]] = []
    for section in sections:
        for name in model_order([section.stats]):
            m = section.stats.models[name]
            p = m.latency.percentiles()
            row = [*([section.label] if with_output else []), name, f"{m.rows:,}",
                   _pct(m.error_rate), _int(m.spend.prompt_tokens),
                   _int(m.spend.completion_tokens), cost_text(m.spend), _ms(p.p50), _ms(p.p90),
                   _ms(p.p99), _pct(m.length_share)]
            if accuracy:
                row.append(_pct(m.accuracy) + (f" of {m.expected_rows:,}" if m.expected_rows
                                               else ""))
            body.append(row)
    numeric = [h not in ("output", "model", "cost") for h in head]
    return head, body, numeric


def _errors(section: Section, redact: Redact) -> str:
    st = section.stats
    if not st.examples:
        return ""
    out = ["<h3>Example errors</h3><table><tr><th>id</th><th>type</th><th>HTTP</th>"
           "<th>message</th></tr>"]
    for ex in st.examples:
        message = redact(ex.message)
        if len(message) > MAX_ERROR_CHARS:
            message = message[:MAX_ERROR_CHARS] + "…"
        out.append(f"<tr><td><code>{_e(redact(ex.id))}</code></td><td>{_e(ex.error_type)}</td>"
                   f"<td>{_e(ex.http_status or '–')}</td><td>{_e(message)}</td></tr>")
    out.append("</table>")
    return "".join(out)


def _section(section: Section, index: int, redact: Redact) -> str:
    st = section.stats
    key = f"{index}-"
    lat, ttft = st.latency, st.ttft
    p = lat.percentiles()
    parts = [f"<h2>{_e(section.label)}</h2>", _header(section, redact)]
    parts.append(_figure(charts.throughput(st, key + "throughput")))
    parts.append(f"<p>Latency (the answering send, on the wire): p50 {_ms(p.p50)}, p90 "
                 f"{_ms(p.p90)}, p99 {_ms(p.p99)} over {p.count:,} rows.</p>")
    parts.append(_figure(charts.histogram(lat, key + "latency", "Latency")))
    t = ttft.percentiles()
    if t.count:
        parts.append(f"<p>Time to first token (streamed): p50 {_ms(t.p50)}, p90 {_ms(t.p90)}, "
                     f"p99 {_ms(t.p99)} over {t.count:,} rows.</p>")
        parts.append(_figure(charts.histogram(ttft, key + "ttft", "Time to first token")))
    head, body, numeric = model_rows([section], with_output=False)
    parts += ["<h3>By model</h3>", _table(head, body, numeric)]
    models = model_order([st])
    tokens = [(m, kind, float(v)) for m in models
              for kind, v in (("in", st.models[m].spend.prompt_tokens_known),
                              ("out", st.models[m].spend.completion_tokens_known))]
    if any(v for _, _, v in tokens):
        parts.append(_figure(charts.grouped_bars(key + "tokens", "Tokens by model (known usage)",
                                                 tokens, x_title="tokens")))
    costs = [(m, st.models[m].spend.cost_usd_known) for m in models
             if st.models[m].spend.rows_priced]
    parts.append(_figure(charts.bars(key + "cost", "Cost by model, USD (priced rows)", costs,
                                     x_title="USD", fmt="$,.4f")))
    parts.append(_figure(charts.bars(key + "finish", "finish_reason of ok rows",
                                     st.finish_reasons.most_common(), x_title="rows")))
    parts.append(_figure(charts.bars(key + "errors", "error_type of error rows",
                                     st.error_types.most_common(), x_title="rows",
                                     color="#d62728")))
    parts.append(_errors(section, redact))
    return "".join(parts)


def _comparison(sections: Sequence[Section]) -> str:
    rows = [(s, m) for s in sections for m in model_order([s.stats])]
    if len(rows) < 2:
        return ""
    several = len(sections) > 1
    unique = len({m for _, m in rows}) == len(rows)  # a matrix: each output one model

    def label(s: Section, model: str) -> str:
        return model if unique else f"{s.label} · {model}"

    head, body, numeric = model_rows(sections, with_output=several)
    parts = ["<h2>Side by side</h2>", _table(head, body, numeric)]
    latency = [(label(s, m), q, v) for s, m in rows
               for q, v in zip(("p50", "p90"), _p50_p90(s, m), strict=True) if v is not None]
    parts.append(_figure(charts.grouped_bars("compare-latency", "Latency by model, ms", latency,
                                             x_title="ms")))
    errors = [(label(s, m), s.stats.models[m].error_rate or 0.0) for s, m in rows]
    parts.append(_figure(charts.bars("compare-errors", "Error rate by model", errors,
                                     x_title="share of rows", color="#d62728", fmt=".1%",
                                     x_max=max(0.01, *(v for _, v in errors)))))
    accuracy = [(label(s, m), acc) for s, m in rows
                if (acc := s.stats.models[m].accuracy) is not None]
    if accuracy:
        column = next(s.stats.expected_column for s in sections if s.stats.expected_column)
        parts.append(_figure(charts.bars("compare-accuracy",
                                         f"Exact match with '{column}' (whitespace trimmed)",
                                         accuracy, x_title="share of rows", color="#2ca02c",
                                         fmt=".1%", x_max=1.0)))
    return "".join(parts)


def _p50_p90(section: Section, model: str) -> tuple[float | None, float | None]:
    p = section.stats.models[model].latency.percentiles()
    return p.p50, p.p90


def page(sections: Sequence[Section], *, title: str, redact: Redact) -> str:
    """The whole report page for ``sections`` (one output, or several side by side)."""
    body = [f"<h1>{_e(redact(title))}</h1>",
            f'<p class="muted">batcher {_e(__version__)} run report · '
            f"{len(sections)} output{'s' if len(sections) != 1 else ''}</p>",
            _comparison(sections)]
    body += [_section(s, i, redact) for i, s in enumerate(sections)]
    text = ("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            # An empty inline icon: otherwise a browser fetches /favicon.ico beside the page.
            "<link rel=\"icon\" href=\"data:,\">"
            f"<title>{_e(redact(title))}</title><style>{_CSS}</style></head><body>"
            + "".join(body) + "</body></html>\n")
    # Once more over the whole page: chart labels (model names, error types) are drawn into
    # the SVG by the renderer, not by this module.
    return redact(text)
