"""Quality benchmark: run the compression recipes of issue 3 and write results/quality.md.

Each recipe in recipes/ runs through `python -m effopt run` into runs/quality/<name> (a completed
run is reused; an unfinished one is resumed; --rerun starts afresh). Missing recipes are skipped
with a note. The report reads every run.json under runs/quality (never a model), so a partial
re-run (--only) still reports the whole table. Every verdict in the targets section is computed
from the measured numbers.

    .venv/bin/python scripts/bench_quality.py            # all recipes that exist
    .venv/bin/python scripts/bench_quality.py --only baseline lowrank-svd-20
    .venv/bin/python scripts/bench_quality.py --list
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GROUPS: list[tuple[str, list[str]]] = [
    ("Baseline", ["baseline"]),
    ("Weight quantization, 4 bits, group 128", ["quantize-rtn-w4g128", "quantize-gptq-w4g128", "quantize-awq-w4g128"]),
    ("Like for like with llm-compressor: GPTQ W4 g64 symmetric", ["quantize-gptq-w4g64-sym"]),
    ("Weight quantization, 3 bits, group 128", ["quantize-rtn-w3g128", "quantize-gptq-w3g128", "quantize-awq-w3g128"]),
    ("W8A8 and NF4", ["quantize-smoothquant-w8a8", "quantize-nf4", "quantize-awq-nf4"]),
    ("Unstructured pruning, 50%", ["prune-magnitude-50", "prune-wanda-50", "prune-sparsegpt-50", "prune-taylor-50"]),
    ("2:4 pruning", ["prune-magnitude-2of4", "prune-wanda-2of4", "prune-sparsegpt-2of4", "prune-taylor-2of4"]),
    ("Structured pruning, 20%", ["prune-heads-20", "prune-channels-20", "prune-heads-20-taylor",
                                 "prune-channels-20-taylor"]),
    ("Low rank, 20% fewer parameters in the targeted layers", ["lowrank-svd-20", "lowrank-asvd-20"]),
]
ALL = [name for _, names in GROUPS for name in names]
NOT_COMPRESSION = ("load", "eval", "export")
# The issue's llm-compressor 0.14 / bitsandbytes figures on this machine (ratio to its baseline 33.53).
# Our W4 g128 (harder: larger groups) and our W4 g64 symmetric (the same configuration) are both held
# to its GPTQ figure.
REFERENCE = [("quantize-gptq-w4g128", "llm-compressor GPTQ W4 g64 symmetric", 1.146),
             ("quantize-gptq-w4g64-sym", "llm-compressor GPTQ W4 g64 symmetric", 1.146),
             ("prune-sparsegpt-50", "llm-compressor SparseGPT 50%", 1.814),
             ("prune-wanda-50", "llm-compressor Wanda 50%", 2.627),
             ("quantize-awq-nf4", "bitsandbytes NF4", 1.244)]  # quantize-nf4 *is* bitsandbytes NF4: its row
# reproduces the reference (a check of the protocol), so it is not compared with itself.
TIME_LIMIT_S = 180.0


# ----------------------------------------------------------------------------------------------
# Running


def run_recipe(name: str, runs_dir: Path, rerun: bool) -> str:
    """Run (or resume, or reuse) one recipe; return what happened."""
    recipe = REPO / "recipes" / f"{name}.yaml"
    if not recipe.is_file():
        return "missing recipe"
    out = runs_dir / name
    record = read_record(out)
    if record is not None and rerun:
        shutil.rmtree(out)
        record = None
    if record is not None and record.get("status") in ("completed", "gate_failed"):
        return "reused"
    cmd = [sys.executable, "-m", "effopt", "run", str(recipe.relative_to(REPO)), "--output", str(out), "--quiet"]
    if record is not None:
        cmd.append("--resume")
    print(f"[bench] {name}: {shlex.join(cmd)}", flush=True)
    load_before = os.getloadavg()[0]
    proc = subprocess.run(cmd, cwd=REPO)
    runs_dir.mkdir(parents=True, exist_ok=True)
    (runs_dir / f"{name}.load.json").write_text(json.dumps({"load_before": load_before,
                                                            "load_after": os.getloadavg()[0]}))
    return "ran" if proc.returncode in (0, 1) else f"failed (exit {proc.returncode})"


def read_record(run_dir: Path) -> dict | None:
    """run.json of a run directory, or None."""
    path = run_dir / "run.json"
    return json.loads(path.read_text()) if path.is_file() else None


# ----------------------------------------------------------------------------------------------
# Reading results


def summarize(name: str, record: dict | None, load: dict | None = None) -> dict:
    """One table row from a run record: final perplexity, size, compression time and memory."""
    row = {"name": name, "status": "not run" if record is None else record["status"]}
    if record is None:
        return row
    evals = [s for s in record["stages"] if s["stage"] == "eval" and s["status"] == "completed"
             and "perplexity" in s["metrics"]]
    work = [s for s in record["stages"] if s["stage"] not in NOT_COMPRESSION]
    row["method"] = ", ".join(s["label"] for s in work) or "-"
    last_work = max((s["index"] for s in work), default=-1)
    if evals:
        row["first_perplexity"] = evals[0]["metrics"]["perplexity"]
    if evals and evals[-1]["index"] > last_work and record["status"] in ("completed", "gate_failed"):
        m = evals[-1]["metrics"]  # the model after every compression stage of a finished run
        row.update(perplexity=m["perplexity"], size_bytes=m.get("size_bytes"), eval_tokens=m.get("eval_tokens"),
                   eval_source=m.get("eval_source"))
    done = [s for s in work if s["status"] == "completed"]
    if done and len(done) == len(work):
        row["seconds"] = sum(s["seconds"] or 0 for s in done)
        row["peak_rss_mb"] = max(s["peak_rss_mb"] or 0 for s in done)
    failed = [s for s in record["stages"] if s["status"] == "failed"]
    if failed:
        row["error"] = f"stage {failed[0]['index']} ({failed[0]['label']}): {failed[0]['error']}"
    if load:
        row["load"] = max(load.values())
    row["environment"] = record.get("environment", {})
    row["finished"] = record.get("finished")
    return row


def read_load(runs_dir: Path, name: str) -> dict:
    """1-minute load averages of the machine before and after the run (written by run_recipe)."""
    path = runs_dir / f"{name}.load.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def collect(runs_dir: Path) -> dict[str, dict]:
    """A row for every benchmark recipe (rows of runs that never happened say so)."""
    return {name: summarize(name, read_record(runs_dir / name), read_load(runs_dir, name)) for name in ALL}


# ----------------------------------------------------------------------------------------------
# Report


def _fmt(value, spec: str, scale: float = 1.0) -> str:
    if value is None:
        return "-"
    return format(value / scale, spec if abs(value / scale) < 1e5 else ".4g")


def table(names: list[str], rows: dict[str, dict], baseline: float | None) -> list[str]:
    """Markdown table of one group."""
    out = ["| recipe | stages | perplexity | × baseline | size MB | stage time s | peak RSS MB | load avg | status |",
           "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for name in names:
        r = rows[name]
        ratio, own = None, ""
        if r.get("perplexity"):
            if baseline:
                ratio = r["perplexity"] / baseline
            elif r.get("first_perplexity"):
                ratio, own = r["perplexity"] / r["first_perplexity"], " †"
        status = r["status"] if not r.get("error") else f"{r['status']}: {r['error'][:120]}"
        if not (REPO / "recipes" / f"{name}.yaml").is_file():
            status = "recipe missing" if r["status"] == "not run" else f"{status} (recipe now missing)"
        out.append(f"| {name} | {r.get('method', '-')} | {_fmt(r.get('perplexity'), '.3f')} | "
                   f"{_fmt(ratio, '.3f')}{own} | {_fmt(r.get('size_bytes'), '.1f', 1e6)} | {_fmt(r.get('seconds'), '.1f')} | "
                   f"{_fmt(r.get('peak_rss_mb'), '.0f')} | {_fmt(r.get('load'), '.1f')} | {status} |")
    return out


def _ppl(rows: dict[str, dict], name: str) -> float | None:
    return rows[name].get("perplexity") if rows[name]["status"] in ("completed", "gate_failed") else None


def _verdict(ok: bool | None) -> str:
    return "MISSING" if ok is None else ("PASS" if ok else "FAIL")


def gap_target(rows: dict[str, dict], base: float | None, method: str, reference: str, share: float) -> tuple[str, str]:
    """Does `method` lose at most `share` of `reference`'s perplexity increase over the baseline?"""
    m, ref = _ppl(rows, method), _ppl(rows, reference)
    if None in (m, ref, base):
        return _verdict(None), f"needs {method}, {reference} and baseline"
    allowed = share * (ref - base)
    return _verdict(m - base <= allowed), (f"{method} +{m - base:.3f} vs allowed {allowed:.3f} "
                                           f"({share:g} × {reference} +{ref - base:.3f})")


def targets(rows: dict[str, dict], base: float | None) -> list[str]:
    """The issue's targets, each with its verdict and the numbers behind it."""
    out = ["| target | verdict | measured |", "| --- | --- | --- |"]
    for method in ("quantize-gptq-w4g128", "quantize-awq-w4g128"):
        v, why = gap_target(rows, base, method, "quantize-rtn-w4g128", 0.5)
        out.append(f"| {method} loses ≤ ½ of RTN's increase (W4 g128) | {v} | {why} |")
    for method in ("prune-sparsegpt-50", "prune-wanda-50"):
        v, why = gap_target(rows, base, method, "prune-magnitude-50", 0.25)
        out.append(f"| {method} loses ≤ ¼ of magnitude's increase (50%) | {v} | {why} |")
    svd, asvd = _ppl(rows, "lowrank-svd-20"), _ppl(rows, "lowrank-asvd-20")
    ok = None if None in (svd, asvd) else asvd < svd
    why = "needs both low-rank runs" if ok is None else f"activation-aware {asvd:.4g} vs plain {svd:.4g}"
    out.append(f"| activation-aware SVD loses less than SVD (20% fewer params) | {_verdict(ok)} | {why} |")
    for name, label, figure in REFERENCE:
        m = _ppl(rows, name)
        ok = None if None in (m, base) else m / base < figure
        why = f"needs {name} and baseline" if ok is None else f"× {m / base:.3f} vs {label} × {figure}"
        out.append(f"| {name} beats {label} (× {figure}) | {_verdict(ok)} | {why} |")
    for name in ALL:
        seconds = rows[name].get("seconds")
        if name == "baseline" or seconds is None:
            continue
        out.append(f"| {name} compresses in ≤ {TIME_LIMIT_S:.0f} s | {_verdict(seconds <= TIME_LIMIT_S)} | "
                   f"{seconds:.1f} s |")
    return out


def machine() -> str:
    """CPU model, cores, memory, OS and library versions of this machine."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").is_file() else "?"
    mem = next((int(line.split()[1]) / 2 ** 20 for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")), 0.0) if Path("/proc/meminfo").is_file() else 0.0
    import torch

    return (f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, {platform.platform()}, Python "
            f"{platform.python_version()}, torch {torch.__version__}, {torch.get_num_threads()} threads")


def report(rows: dict[str, dict], command: str, notes: list[str]) -> str:
    """The whole results/quality.md text."""
    base = _ppl(rows, "baseline")
    revisions = sorted({r["environment"].get("git_revision") or "?" for r in rows.values() if r.get("environment")})
    lines = ["# Quality benchmark (issue 3)", "",
             f"- Written: {dt.datetime.now().astimezone().isoformat(timespec='seconds')}",
             f"- Machine: {machine()}",
             f"- Command: `{command}`",
             f"- effopt git revision(s) of the runs: {', '.join(revisions) or '-'}",
             "- Protocol: each recipe in recipes/ runs with `python -m effopt run recipes/NAME.yaml --output "
             "runs/quality/NAME`; perplexity is the last eval of the run, × baseline divides it by the "
             "baseline recipe's perplexity; stage time and peak RSS cover the compression stages only "
             "(not load or eval). Size is the model's weights as stored in memory. Load avg is the machine's "
             "1-minute load average before/after the run (the larger): on this 2-core machine anything above 2 "
             "means other jobs shared the CPU, and wall-clock times are inflated by that much or more.",
             ""]
    if base is not None:
        b = rows["baseline"]
        lines += [f"Baseline perplexity {base:.3f} on {b.get('eval_source')}, {b.get('eval_tokens')} scored tokens.",
                  ""]
    else:
        lines += ["No baseline run: × baseline (marked †) divides by each run's own first eval.", ""]
    for title, names in GROUPS:
        lines += [f"## {title}", "", *table(names, rows, base), ""]
    lines += ["## Targets", "", "Verdicts are computed by scripts/bench_quality.py from the numbers above; "
              "MISSING means a run it needs has no result.", "", *targets(rows, base), ""]
    if notes:
        lines += ["## Notes", "", *[f"- {n}" for n in notes], ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Parse options, run the recipes, write the report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", help="Run only these recipes (the report still "
                                                                  "includes earlier results).")
    parser.add_argument("--list", action="store_true", help="List the benchmark recipes and whether they exist.")
    parser.add_argument("--rerun", action="store_true", help="Delete and redo runs that already completed.")
    parser.add_argument("--no-run", action="store_true", help="Only rewrite the report from existing runs.")
    parser.add_argument("--note", action="append", default=[], help="A line for the report's notes (repeatable), "
                                                                     "e.g. a measurement made outside the runs.")
    parser.add_argument("--runs-dir", type=Path, default=REPO / "runs" / "quality")
    parser.add_argument("--output", type=Path, default=REPO / "results" / "quality.md")
    args = parser.parse_args(argv)
    if args.list:
        for title, names in GROUPS:
            print(title)
            for name in names:
                state = "exists" if (REPO / "recipes" / f"{name}.yaml").is_file() else "missing"
                print(f"  {name:28s} {state}")
        return 0
    unknown = [n for n in args.only or [] if n not in ALL]
    if unknown:
        parser.error(f"unknown recipe(s) {unknown}; --list shows the benchmark's recipes")
    notes = list(args.note)
    if not args.no_run:
        for name in args.only or ALL:
            outcome = run_recipe(name, args.runs_dir, args.rerun)
            print(f"[bench] {name}: {outcome}", flush=True)
            if outcome == "missing recipe":
                notes.append(f"recipes/{name}.yaml does not exist yet: row skipped.")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    command = shlex.join([Path(sys.executable).name, "scripts/bench_quality.py", *(argv if argv is not None
                                                                                   else sys.argv[1:])])
    args.output.write_text(report(collect(args.runs_dir), command, notes))
    print(f"[bench] wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
