"""The HTML report: one self-contained file (inline CSS, plots as base64 PNG, no scripts, no network).

Sections: regression checks (when rules were given), the comparison table (Pareto-front rows in
bold, dominated ones grey), the plots, and a per-stage time/memory table.
"""

from __future__ import annotations

import base64
import datetime as dt
import html

from effopt.report import COLUMNS, _cell, finite, pareto_front

CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 24px; color: #1d1d1f; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 17px; margin-top: 28px; }
h3 { font-size: 14px; margin: 14px 0 4px; }
.meta { color: #666; font-size: 12px; }
table { border-collapse: collapse; font-size: 12px; margin: 8px 0; }
th, td { border: 1px solid #d0d0d0; padding: 4px 8px; text-align: right; }
th { background: #f2f2f2; } td.text { text-align: left; }
tr.dominated td { color: #9a9a9a; } tr.front td { font-weight: 600; }
.fail { color: #b00020; font-weight: 600; } .pass { color: #1b7f3b; }
.plot { margin: 8px 0 18px; } .plot img { max-width: 100%; border: 1px solid #e0e0e0; }
.none { color: #888; font-style: italic; }
"""


def _esc(value) -> str:
    return html.escape(str(value))


def _front_flags(rows: list[dict]) -> list[bool | None]:
    """Per row: on the size/perplexity Pareto front (True), dominated (False), not plottable (None)."""
    idx = [i for i, r in enumerate(rows) if finite(r.get("size_bytes")) and finite(r.get("perplexity"))]
    flags = pareto_front([(rows[i]["size_bytes"], rows[i]["perplexity"]) for i in idx])
    out: list[bool | None] = [None] * len(rows)
    for i, flag in zip(idx, flags):
        out[i] = flag
    return out


def comparison_table(rows: list[dict]) -> str:
    """The report table; rows on the size/perplexity front bold, dominated rows grey."""
    head = "".join(f"<th>{_esc(title)}</th>" for _, title in COLUMNS)
    body = []
    for row, flag in zip(rows, _front_flags(rows)):
        cls = {True: "front", False: "dominated", None: ""}[flag]
        cells = "".join(f'<td class="{"text" if k in ("run", "point", "status") else ""}">{_esc(_cell(k, row.get(k)))}'
                        "</td>" for k, _ in COLUMNS)
        body.append(f'<tr class="{cls}">{cells}</tr>')
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def checks_section(checks: list[dict] | None) -> str:
    """Regression checks, failures first; empty when no rules were given."""
    if checks is None:
        return ""
    failed = sum(1 for c in checks if not c["passed"])
    status = f'<span class="fail">{failed} failed</span>' if failed else '<span class="pass">all passed</span>'
    rows = "".join(
        f'<tr><td class="text {"pass" if c["passed"] else "fail"}">{"pass" if c["passed"] else "FAIL"}</td>'
        f'<td class="text">{_esc(c["run"])}</td><td class="text">{_esc(c["rule"])}</td>'
        f'<td class="text">{_esc(c["message"])}</td></tr>'
        for c in sorted(checks, key=lambda c: c["passed"]))
    return (f"<h2>Regression checks: {status} ({len(checks)} checks)</h2><table><thead><tr><th>result</th><th>run</th>"
            f"<th>rule</th><th>detail</th></tr></thead><tbody>{rows}</tbody></table>")


def stage_table(stages: list[dict]) -> str:
    """Per-stage status, seconds and peak memory."""
    body = "".join(
        f'<tr><td class="text">{_esc(s["run"])}</td><td>{s["index"]}</td><td class="text">{_esc(s["label"])}</td>'
        f'<td class="text">{_esc(s["status"])}</td><td>{_esc(_cell("seconds", s.get("seconds")))}</td>'
        f'<td>{_esc(_cell("peak_rss_mb", s.get("peak_rss_mb")))}</td></tr>' for s in stages)
    return ("<table><thead><tr><th>run</th><th>#</th><th>stage</th><th>status</th><th>time s</th>"
            f"<th>peak RSS MB</th></tr></thead><tbody>{body}</tbody></table>")


def _plot(title: str, png: bytes | None, alt: str) -> str:
    if png is None:
        return f'<div class="plot"><h3>{_esc(title)}</h3><p class="none">no run measured this</p></div>'
    data = base64.b64encode(png).decode("ascii")
    return f'<div class="plot"><h3>{_esc(title)}</h3><img alt="{_esc(alt)}" src="data:image/png;base64,{data}"></div>'


def to_html(rows: list[dict], stages: list[dict], checks: list[dict] | None = None,
            plots: dict[str, bytes | None] | None = None) -> str:
    """The whole report as one HTML document.

    Args:
        rows, stages: from effopt.report (eval_rows / stage_rows).
        checks: regression check results (effopt.report.check_runs), or None when none were asked.
        plots: PNG bytes by name (effopt.plots.all_plots); computed when not given.
    """
    if plots is None:
        from effopt.plots import all_plots

        plots = all_plots(rows, stages)
    runs = sorted({r["run_dir"] for r in rows})
    stamp = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>effopt report</title><style>{CSS}</style></head><body>",
        "<h1>effopt report</h1>",
        f'<p class="meta">{len(runs)} run(s): {_esc(", ".join(runs))}<br>generated {stamp}</p>',
        checks_section(checks),
        "<h2>Comparison</h2>", comparison_table(rows),
        '<p class="meta">Bold: on the size/perplexity Pareto front; grey: dominated by a smaller, better run.</p>',
        "<h2>Plots</h2>",
        _plot("Perplexity vs size", plots.get("ppl_vs_size"), "perplexity against size, Pareto front"),
        _plot("Perplexity vs decode speed", plots.get("ppl_vs_speed"), "perplexity against decode speed"),
        _plot("Time and memory per stage", plots.get("stage_time_memory"), "per-stage time and peak memory"),
        "<h2>Stages</h2>", stage_table(stages),
        "</body></html>",
    ]
    return "\n".join(p for p in parts if p) + "\n"
