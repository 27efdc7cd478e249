"""Compare runs: reads run directories (run.json) only; never loads a model.

One row per run and per eval point: perplexity and its ratio to the run's first eval, size,
parameters, bits per weight, sparsity, decode speed, cumulative time and peak memory so far.
"""

from __future__ import annotations

import json
from pathlib import Path

from effopt.rundir import read_run

COLUMNS = [("run", "run"), ("point", "eval point"), ("perplexity", "ppl"), ("ppl_ratio", "ppl ratio"),
           ("size_bytes", "size MB"), ("parameters", "params M"), ("bits_per_weight", "bits/w"),
           ("sparsity", "sparsity"), ("tokens_per_s", "tok/s"), ("seconds", "time s"), ("peak_rss_mb", "peak RSS MB"),
           ("status", "status")]


def eval_rows(run_dir: Path) -> list[dict]:
    """Rows of one run directory: one per completed eval stage (one status row if there is none)."""
    record = read_run(run_dir)
    rows, first_ppl, elapsed, peak = [], None, 0.0, 0.0
    for entry in record["stages"]:
        elapsed += entry.get("seconds") or 0.0
        peak = max(peak, entry.get("peak_rss_mb") or 0.0)
        if entry["stage"] != "eval" or entry["status"] != "completed":
            continue
        m = entry["metrics"]
        ppl = m.get("perplexity")
        if first_ppl is None and ppl is not None:
            first_ppl = ppl
        prior = [s["label"] for s in record["stages"][: entry["index"]] if s["stage"] not in ("eval", "load", "export")]
        rows.append({"run": record["name"], "run_dir": str(run_dir), "point": f"{entry['index']}: after "
                     + (prior[-1] if prior else "load"), "stage_index": entry["index"], "perplexity": ppl,
                     "ppl_ratio": ppl / first_ppl if ppl is not None and first_ppl else None,
                     "bits_per_byte": m.get("bits_per_byte"), "size_bytes": m.get("size_bytes"),
                     "parameters": m.get("parameters"), "bits_per_weight": m.get("bits_per_weight"),
                     "sparsity": m.get("sparsity"), "tokens_per_s": m.get("tokens_per_s"), "seconds": elapsed,
                     "peak_rss_mb": peak, "status": record["status"]})
    if not rows:
        rows.append({"run": record["name"], "run_dir": str(run_dir), "point": "(no eval)", "status": record["status"],
                     "seconds": elapsed, "peak_rss_mb": peak})
    return rows


def collect(run_dirs: list[Path]) -> list[dict]:
    """All rows of all runs, in the order given."""
    rows = []
    for run_dir in run_dirs:
        rows.extend(eval_rows(Path(run_dir)))
    return rows


def _cell(key: str, value) -> str:
    if value is None:
        return "-"
    if key == "size_bytes":
        return f"{value / 1e6:.1f}"
    if key == "parameters":
        return f"{value / 1e6:.2f}"
    if key in ("perplexity",):
        return f"{value:.4f}"
    if key in ("ppl_ratio", "bits_per_weight", "sparsity"):
        return f"{value:.3f}"
    if key in ("tokens_per_s", "seconds", "peak_rss_mb"):
        return f"{value:.1f}"
    return str(value)


def to_markdown(rows: list[dict]) -> str:
    """A Markdown table (for CI comments and results files)."""
    head = "| " + " | ".join(title for _, title in COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in COLUMNS) + "|"
    body = ["| " + " | ".join(_cell(k, r.get(k)) for k, _ in COLUMNS) + " |" for r in rows]
    return "\n".join([head, rule, *body]) + "\n"


def to_json(rows: list[dict]) -> str:
    """Rows as JSON."""
    return json.dumps({"rows": rows}, indent=2) + "\n"


def to_rich_table(rows: list[dict]):
    """A rich Table for the terminal."""
    from rich.table import Table

    table = Table(title="effopt report")
    for key, title in COLUMNS:
        table.add_column(title, justify="left" if key in ("run", "point", "status") else "right")
    for r in rows:
        table.add_row(*(_cell(k, r.get(k)) for k, _ in COLUMNS))
    return table
