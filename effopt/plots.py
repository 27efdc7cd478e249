"""Report plots as PNG bytes (matplotlib, Agg backend: no display needed, safe in CI).

Each function takes report rows (effopt.report) and returns PNG bytes, or None when the rows hold
nothing to plot (e.g. no run measured speed). Nothing here reads files or loads models.
"""

from __future__ import annotations

import io

from effopt.report import finite, pareto_front

FRONT_COLOR, DOMINATED_COLOR = "#1f77b4", "#b0b0b0"
RUN_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return buf.getvalue()


def _label(row: dict) -> str:
    return f"{row['run']}: {row['point']}"


def front_plot(rows: list[dict], x_key: str, x_label: str, maximize_x: bool, title: str,
               x_scale: float = 1.0) -> bytes | None:
    """Perplexity against `x_key`: the Pareto front in colour joined by a step line, dominated points grey."""
    pts = [r for r in rows if finite(r.get(x_key)) and finite(r.get("perplexity"))]
    if not pts:
        return None
    xy = [(r[x_key] / x_scale, r["perplexity"]) for r in pts]
    on_front = pareto_front(xy, maximize_x=maximize_x)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    labels: dict[tuple[float, float, bool], list[str]] = {}
    for (x, y), row, front in zip(xy, pts, on_front):
        ax.scatter([x], [y], s=46 if front else 30, color=FRONT_COLOR if front else DOMINATED_COLOR, zorder=3,
                   edgecolors="black" if front else "none", linewidths=0.6)
        labels.setdefault((x, y, front), []).append(_label(row))
    for (x, y, front), texts in labels.items():  # coincident points share one label
        ax.annotate("\n".join(texts), (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7,
                    color="#222222" if front else "#8a8a8a")
    front_pts = sorted((p for p, f in zip(xy, on_front) if f), reverse=maximize_x)
    if len(front_pts) > 1:
        ax.step([p[0] for p in front_pts], [p[1] for p in front_pts], where="post", color=FRONT_COLOR, lw=1.2,
                alpha=0.8, label="Pareto front")
        ax.legend(loc="best", fontsize=8)
    ax.set_xlabel(x_label)
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_title(title + "  (grey: dominated)", fontsize=10)
    ax.grid(alpha=0.3)
    return _png(fig)


def ppl_vs_size(rows: list[dict]) -> bytes | None:
    """Perplexity against model size in MB (smaller and lower is better)."""
    return front_plot(rows, "size_bytes", "size (MB, smaller is better)", False, "Perplexity vs size", 1e6)


def ppl_vs_speed(rows: list[dict]) -> bytes | None:
    """Perplexity against decode speed (faster and lower is better)."""
    return front_plot(rows, "tokens_per_s", "decode speed (tokens/s, higher is better)", True,
                      "Perplexity vs decode speed")


def stage_time_memory(stages: list[dict]) -> bytes | None:
    """Two panels of horizontal bars, one bar per run and stage: seconds, and peak RSS in MB."""
    rows = [s for s in stages if finite(s.get("seconds"))]
    if not rows:
        return None
    plt = _pyplot()
    runs = list(dict.fromkeys(s["run"] for s in rows))
    height = max(2.5, 0.28 * len(rows) + 1.2)
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, height), sharey=True)
    labels = [f"{s['run']} · {s['index']}: {s['label']}" for s in rows]
    colors = [RUN_COLORS[runs.index(s["run"]) % len(RUN_COLORS)] for s in rows]
    ypos = list(range(len(rows)))[::-1]
    ax_t.barh(ypos, [s["seconds"] for s in rows], color=colors)
    ax_m.barh(ypos, [s["peak_rss_mb"] if finite(s.get("peak_rss_mb")) else 0 for s in rows], color=colors)
    ax_t.set_yticks(ypos, labels, fontsize=7)
    ax_t.set_xlabel("seconds")
    ax_m.set_xlabel("peak RSS (MB)")
    ax_t.set_title("Time per stage", fontsize=10)
    ax_m.set_title("Peak memory per stage", fontsize=10)
    for ax in (ax_t, ax_m):
        ax.grid(axis="x", alpha=0.3)
    return _png(fig)


PLOTS = {"ppl_vs_size": ppl_vs_size, "ppl_vs_speed": ppl_vs_speed}


def all_plots(rows: list[dict], stages: list[dict]) -> dict[str, bytes | None]:
    """Every report plot by file stem: ppl_vs_size, ppl_vs_speed, stage_time_memory."""
    out = {name: fn(rows) for name, fn in PLOTS.items()}
    out["stage_time_memory"] = stage_time_memory(stages)
    return out
