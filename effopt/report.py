"""Compare runs: reads run directories (run.json) only; never loads a model.

One row per run and per eval point: perplexity and its ratio to the run's first eval, size,
parameters, bits per weight, sparsity, decode speed, cumulative time and peak memory so far.
Also: per-stage rows (time, memory), the Pareto front of a set of rows, and regression checks of
candidate runs against a baseline run (`perplexity>+2%`-style rules, the nightly-CI use).
HTML and plots live in report_html.py and plots.py.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
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
                     "peak_rss_mb": peak, "status": record["status"], "eval_source": m.get("eval_source"),
                     "eval_seq_len": m.get("eval_seq_len"), "eval_tokens": m.get("eval_tokens")})
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


def to_json(rows: list[dict], checks: list[dict] | None = None) -> str:
    """Rows (and regression checks, when given) as JSON."""
    data: dict = {"rows": rows}
    if checks is not None:
        data["checks"] = checks
    return json.dumps(data, indent=2) + "\n"


def to_rich_table(rows: list[dict]):
    """A rich Table for the terminal."""
    from rich.table import Table

    table = Table(title="effopt report")
    for key, title in COLUMNS:
        table.add_column(title, justify="left" if key in ("run", "point", "status") else "right")
    for r in rows:
        table.add_row(*(_cell(k, r.get(k)) for k, _ in COLUMNS))
    return table


def stage_rows(run_dir: Path) -> list[dict]:
    """One row per stage of a run: label, status, seconds and peak memory (for time/memory plots)."""
    record = read_run(run_dir)
    return [{"run": record["name"], "run_dir": str(run_dir), "index": s["index"], "stage": s["stage"],
             "label": s["label"], "status": s["status"], "seconds": s.get("seconds"),
             "peak_rss_mb": s.get("peak_rss_mb"), "peak_gpu_mb": s.get("peak_gpu_mb")} for s in record["stages"]]


def label_runs(rows: list[dict], baseline_dir: Path | None = None) -> list[dict]:
    """Rows with `run` made unique (the folder name is added when names repeat) and the baseline marked."""
    names: dict[str, set] = {}
    for r in rows:
        names.setdefault(r["run"], set()).add(r["run_dir"])
    out = []
    for r in rows:
        label = r["run"] if len(names[r["run"]]) == 1 else f"{r['run']} [{Path(r['run_dir']).name}]"
        if baseline_dir is not None and Path(r["run_dir"]) == Path(baseline_dir):
            label += " (baseline)"
        out.append({**r, "run": label})
    return out


def pareto_front(points: list[tuple[float, float]], maximize_x: bool = False) -> list[bool]:
    """For (x, y) points where lower y is better and lower x (or higher, `maximize_x`) is better:
    True for each point no other point dominates (at least as good in both, better in one)."""
    sign = -1.0 if maximize_x else 1.0
    keyed = [(sign * x, y) for x, y in points]
    return [not any(a <= x and b <= y and (a < x or b < y) for a, b in keyed) for x, y in keyed]


# ----------------------------------------------------------------------------------------------
# Regression checks: `METRIC>+2%` (relative to the baseline), `METRIC>+0.5` (absolute change),
# `METRIC>30` (a plain threshold, no baseline needed). OP is one of > >= < <=.

METRIC_ALIASES = {"perplexity": "perplexity", "ppl": "perplexity", "ppl_ratio": "ppl_ratio",
                  "bits_per_byte": "bits_per_byte", "bpb": "bits_per_byte", "size": "size_bytes",
                  "size_bytes": "size_bytes", "parameters": "parameters", "params": "parameters",
                  "bits_per_weight": "bits_per_weight", "sparsity": "sparsity", "speed": "tokens_per_s",
                  "tokens_per_s": "tokens_per_s", "time": "seconds", "seconds": "seconds",
                  "memory": "peak_rss_mb", "peak_rss_mb": "peak_rss_mb"}
QUALITY_METRICS = ("perplexity", "ppl_ratio", "bits_per_byte")
FINISHED = ("completed", "gate_failed")  # run statuses whose last eval is the final model
_RULE = re.compile(r"^\s*([a-z_]+)\s*(>=|<=|>|<)\s*([+-]?)(\d+(?:\.\d*)?|\.\d+)\s*(%?)\s*$")


@dataclass(frozen=True)
class Rule:
    """A parsed `--fail-on` rule: fail when `metric op limit`, the limit derived from the baseline."""

    text: str
    metric: str
    op: str
    value: float
    kind: str  # "relative" (percent change), "delta" (absolute change) or "absolute" (plain threshold)

    def limit(self, baseline: float | None) -> float:
        """The threshold the candidate's value is compared with."""
        if self.kind == "absolute":
            return self.value
        if baseline is None:
            raise ValueError(f"rule {self.text!r} needs a baseline value")
        return baseline * (1 + self.value / 100) if self.kind == "relative" else baseline + self.value

    def violated(self, value: float, baseline: float | None) -> bool:
        """True when `value` breaks the rule."""
        limit = self.limit(baseline)
        return {">": value > limit, ">=": value >= limit, "<": value < limit, "<=": value <= limit}[self.op]


def parse_rule(text: str) -> Rule:
    """Parse `perplexity>+2%`, `size>+0%`, `tokens_per_s<-10%`, `perplexity>+0.5`, `perplexity>30`.

    Raises:
        ValueError: with the accepted syntax and metric names.
    """
    match = _RULE.match(text.lower())
    names = ", ".join(sorted(METRIC_ALIASES))
    if not match:
        raise ValueError(f"--fail-on {text!r}: expected METRIC OP VALUE, e.g. 'perplexity>+2%', 'size>+0%', "
                         f"'tokens_per_s<-10%', 'perplexity>30' (OP one of > >= < <=; metrics: {names})")
    name, op, sign, number, percent = match.groups()
    if name not in METRIC_ALIASES:
        raise ValueError(f"--fail-on {text!r}: unknown metric {name!r}; expected one of {names}")
    if percent and not sign:
        raise ValueError(f"--fail-on {text!r}: a percentage is a change from the baseline; write it with a sign "
                         f"(e.g. '{name}{op}+{number}%')")
    value = float(number) * (-1 if sign == "-" else 1)
    kind = "relative" if percent else "delta" if sign else "absolute"
    return Rule(text.strip(), METRIC_ALIASES[name], op, value, kind)


def final_row(rows: list[dict]) -> dict:
    """The last eval point of one run's rows (the model the run ends with)."""
    return rows[-1]


WORDS = {">": "above", ">=": "at or above", "<": "below", "<=": "at or below"}


def _describe(rule: Rule, value: float, base: float | None, limit: float) -> str:
    """`perplexity 260.05 -> 273.05 (+5.00%); perplexity>+2% fails above 265.25`."""
    if base is None:
        shown = f"{rule.metric} = {value:.6g}"
    else:
        pct = f" ({(value / base - 1) * 100:+.2f}%)" if base else ""
        shown = f"{rule.metric} {base:.6g} -> {value:.6g}{pct}"
    return f"{shown}; {rule.text} fails {WORDS[rule.op]} {limit:.6g}"


def check_rule(rule: Rule, candidate: dict, baseline: dict | None) -> dict:
    """Check one rule on one candidate row; returns {rule, run, metric, value, baseline, passed, message}."""
    value = candidate.get(rule.metric)
    base = baseline.get(rule.metric) if baseline is not None else None
    result = {"rule": rule.text, "run": candidate["run"], "run_dir": candidate.get("run_dir"), "metric": rule.metric,
              "value": value, "baseline": base, "passed": False}
    if candidate.get("point") == "(no eval)" or candidate.get("status") not in FINISHED:
        return {**result, "message": f"{candidate['run']}: the run did not finish with a completed eval "
                                     f"(run status {candidate.get('status')}, last eval point {candidate.get('point')})"}
    if value is None or (rule.kind != "absolute" and base is None):
        missing = "the candidate" if value is None else "the baseline"
        return {**result, "message": f"{rule.metric} was not measured in {missing}; cannot check {rule.text!r}"}
    if rule.metric in QUALITY_METRICS and baseline is not None and rule.kind != "absolute":
        for key in ("eval_source", "eval_seq_len", "eval_tokens"):
            if candidate.get(key) != baseline.get(key):
                return {**result, "message": f"{rule.metric} is not comparable: {key} differs "
                                             f"({baseline.get(key)} in the baseline, {candidate.get(key)} here)"}
    limit = rule.limit(base)
    return {**result, "passed": not rule.violated(value, base), "limit": limit,
            "message": _describe(rule, value, base, limit)}


def check_runs(rules: list[Rule], candidates: list[list[dict]], baseline: list[dict] | None) -> list[dict]:
    """Every rule on the final eval of every candidate run (each a list of its rows)."""
    base = final_row(baseline) if baseline else None
    if base is not None and (base.get("point") == "(no eval)" or base.get("status") not in FINISHED):
        raise ValueError(f"baseline {base.get('run_dir')} has no completed eval of its final model "
                         f"(status {base.get('status')})")
    return [check_rule(rule, final_row(rows), base) for rows in candidates for rule in rules]


def checks_markdown(checks: list[dict]) -> str:
    """The checks as a Markdown list: failures first, then a one-line pass count."""
    failed = [c for c in checks if not c["passed"]]
    lines = [f"### Regression checks: {len(failed)} failed, {len(checks) - len(failed)} passed", ""]
    lines += [f"- **FAIL** {c['run']}: {c['message']}" for c in failed]
    lines += [f"- pass {c['run']}: {c['message']}" for c in checks if c["passed"]]
    return "\n".join(lines) + "\n"


def finite(value) -> bool:
    """A real number that can be plotted."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def compare(run_dirs: list[Path], baseline: Path | None = None, rules: list[Rule] | tuple = ()) -> dict:
    """Everything a report shows: rows and stage rows of the baseline (first) and the runs, with
    unique run labels, and the checks of `rules` on each run's final eval (None without rules).

    Raises:
        ValueError: the baseline has no completed eval to compare with, or nothing to check.
    """
    dirs = list(dict.fromkeys(Path(d) for d in ([baseline] if baseline is not None else []) + list(run_dirs)))
    rows = label_runs([r for d in dirs for r in eval_rows(d)], baseline)
    stages = label_runs([s for d in dirs for s in stage_rows(d)], baseline)
    checks = None
    if rules:
        by_dir = {d: [r for r in rows if Path(r["run_dir"]) == d] for d in dirs}
        candidates = [by_dir[d] for d in dirs if baseline is None or d != Path(baseline)]
        if not candidates:
            raise ValueError("--fail-on: no run to check besides the baseline")
        checks = check_runs(list(rules), candidates, by_dir[Path(baseline)] if baseline is not None else None)
    return {"rows": rows, "stages": stages, "checks": checks}


def render(result: dict, format: str) -> str:
    """`compare`'s result as md (table + checks), json or html text."""
    rows, checks = result["rows"], result["checks"]
    if format == "html":
        from effopt.report_html import to_html

        return to_html(rows, result["stages"], checks)
    if format == "json":
        return to_json(rows, checks)
    return to_markdown(rows) + ("\n" + checks_markdown(checks) if checks is not None else "")


def write_plots(result: dict, folder: Path) -> dict[str, Path | None]:
    """Write each plot of `compare`'s result as folder/<name>.png; None for plots without data."""
    from effopt.plots import all_plots

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path | None] = {}
    for name, png in all_plots(result["rows"], result["stages"]).items():
        written[name] = None
        if png is not None:
            written[name] = folder / f"{name}.png"
            written[name].write_bytes(png)
    return written
