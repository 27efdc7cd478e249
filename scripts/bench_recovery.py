"""Recovery benchmark: compress the builtin SmolLM2-135M, then win the loss back, and write
results/recovery.md.

Rows (recipes in recipes/): (a) Wanda 2:4 -> LoRA, (b) 25% MLP-channel structured pruning ->
logit + feature distillation, (c) GPTQ W3 g128 -> QLoRA; plus a control (the same LoRA training on
the uncompressed model) that measures how much of a "recovery" is just adaptation to Austen's text.
Train text: Pride and Prejudice; calibration: Emma; evaluation: Persuasion (never trained on).

Each recipe runs as `python -m effopt run` in its own process (OMP_NUM_THREADS=--threads) into
--runs/NAME; a run directory that already completed is read, not rerun, and an unfinished one is
resumed. Usage:

    .venv/bin/python scripts/bench_recovery.py [--threads 1] [--runs runs/recovery] [--no-control]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ROWS = [("recover-wanda24-lora", "(a) Wanda 2:4", "LoRA r16 (merged, mask kept)"),
        ("recover-channels25-distill", "(b) 25% MLP channels (structured)", "logit KL (T=2) + feature distill"),
        ("recover-gptq3-qlora", "(c) GPTQ W3 g128", "QLoRA r16 over packed 3-bit")]
CONTROL = ("recover-control-lora", "none (control)", "LoRA r16, same budget as (a)")


def run_recipe(name: str, runs: Path, threads: int) -> tuple[dict, float]:
    """Run (or resume, or just read) recipes/NAME.yaml into runs/NAME; return (run.json, wall seconds)."""
    out = runs / name
    record_path = out / "run.json"
    if record_path.is_file() and json.loads(record_path.read_text())["status"] == "completed":
        return json.loads(record_path.read_text()), 0.0
    cmd = [sys.executable, "-m", "effopt", "run", str(REPO / "recipes" / f"{name}.yaml"), "-o", str(out), "--quiet"]
    if record_path.is_file():
        cmd.append("--resume")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(REPO))
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{name}: effopt run exited {proc.returncode}; see {out / 'log.txt'}")
    return json.loads(record_path.read_text()), time.perf_counter() - start


def summarize(record: dict) -> dict:
    """Baseline / compressed / recovered evals and the compression and recovery stages of one run."""
    stages = record["stages"]
    evals = [s["metrics"] for s in stages if s["stage"] == "eval"]
    work = [s for s in stages if s["stage"] not in ("load", "eval")]
    recovery = work[-1]
    compression = work[0] if len(work) > 1 else None
    base, comp, rec = evals[0], (evals[1] if compression else evals[0]), evals[-1]
    gap = comp["nll"] - base["nll"]
    return {"ppl_base": base["perplexity"], "ppl_comp": comp["perplexity"], "ppl_rec": rec["perplexity"],
            "nll_base": base["nll"], "nll_comp": comp["nll"], "nll_rec": rec["nll"],
            "won_back": (comp["nll"] - rec["nll"]) / gap if gap > 0 else None,
            "trainable": recovery["metrics"]["trainable_params"], "rec_seconds": recovery["seconds"],
            "train_seconds": recovery["metrics"]["train_seconds"],
            "tokens_per_s": recovery["metrics"]["train_tokens_per_s"],
            "rec_peak_mb": recovery["peak_rss_mb"], "loss_first": recovery["metrics"]["train_loss_first"],
            "loss_last": recovery["metrics"]["train_loss_last"],
            "comp_seconds": compression["seconds"] if compression else None,
            "size_comp": comp.get("size_bytes"), "size_rec": rec.get("size_bytes"),
            "sparsity_rec": rec.get("sparsity")}


def table(rows: list[tuple[str, str, dict]], control: dict | None) -> str:
    """The markdown table (and the control-adjusted fraction when a control ran)."""
    head = ("| compression | recovery | ppl before | ppl compressed | ppl recovered | loss won back | "
            "won back vs control | trainable params | recovery time (s) | train tok/s | peak RSS (MB) |")
    lines = [head, "|" + "|".join(["---"] * 11) + "|"]
    for comp, rec, s in rows:
        adjusted = "n/a"
        if control is not None and s["won_back"] is not None:
            floor = s["nll_base"] - (control["nll_base"] - control["nll_rec"])  # baseline adapted to Austen
            adjusted = f"{(s['nll_comp'] - s['nll_rec']) / (s['nll_comp'] - floor):.0%}"
        won = "n/a" if s["won_back"] is None else f"{s['won_back']:.0%}"
        lines.append(f"| {comp} | {rec} | {s['ppl_base']:.2f} | {s['ppl_comp']:.2f} | {s['ppl_rec']:.2f} | {won} | "
                     f"{adjusted} | {s['trainable']:,} | {s['rec_seconds']:.0f} | {s['tokens_per_s']:.0f} | "
                     f"{s['rec_peak_mb']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=REPO / "runs" / "recovery",
                        help="Run directories (default runs/recovery, like bench_quality's runs/quality).")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "recovery.md", help="Markdown output.")
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of each run.")
    parser.add_argument("--no-control", action="store_true", help="Skip the uncompressed control run.")
    args = parser.parse_args()
    load_start = os.getloadavg()
    rows, details, walls = [], [], {}
    for name, comp, rec in ROWS + ([] if args.no_control else [CONTROL]):
        record, wall = run_recipe(name, args.runs, args.threads)
        walls[name] = wall
        details.append((name, summarize(record)))
        if name != CONTROL[0]:
            rows.append((comp, rec, details[-1][1]))
    control = None if args.no_control else details[-1][1]
    write(args, rows, details, control, walls, load_start)


def _shown(path: str) -> str:
    """An absolute path inside the repo shown relative to it (results files carry no machine paths)."""
    if not Path(path).is_absolute():
        return path
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        return path


def write(args, rows, details, control, walls, load_start) -> None:
    """Write the results file: table, control, per-run details, command and machine."""
    import platform

    import torch

    text = ["# Recovery after compression (builtin SmolLM2-135M)", "",
            "Made by `" + " ".join(["scripts/bench_recovery.py"] + [_shown(a) for a in sys.argv[1:]]) + "` on "
            + dt.date.today().isoformat() + ". Train text: Pride and Prejudice (120 steps x 2 x 256 tokens); "
            "calibration: Emma; evaluation: first 16,384 tokens of Persuasion in 1,024-token windows (held out). "
            "`loss won back` = (NLL compressed - NLL recovered) / (NLL compressed - NLL before), NLL = mean "
            "per-token loss on Persuasion. `won back vs control` measures against the uncompressed model after "
            "the same LoRA training (the control row below), so adaptation to Austen is not counted as recovery.",
            "", table(rows, control), ""]
    if control is not None:
        text += [f"Control (uncompressed model, same LoRA training as (a)): perplexity {control['ppl_base']:.2f} -> "
                 f"{control['ppl_rec']:.2f} (NLL {control['nll_base']:.4f} -> {control['nll_rec']:.4f}).", ""]
    text += ["| run | train loss first -> last | recovery stage s (train s) | compression s | size compressed -> "
             "recovered (MB) | sparsity after |", "|---|---|---|---|---|---|"]
    for name, s in details:
        comp_s = "-" if s["comp_seconds"] is None else f"{s['comp_seconds']:.0f}"
        sizes = f"{(s['size_comp'] or 0) / 1e6:.1f} -> {(s['size_rec'] or 0) / 1e6:.1f}"
        text.append(f"| {name} | {s['loss_first']:.3f} -> {s['loss_last']:.3f} | {s['rec_seconds']:.0f} "
                    f"({s['train_seconds']:.0f}) | {comp_s} | {sizes} | {s['sparsity_rec']:.3f} |")
    text += ["", f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
             f"{torch.__version__}, OMP_NUM_THREADS={args.threads}; load average at start "
             f"{load_start[0]:.1f}, at end {os.getloadavg()[0]:.1f} (other jobs shared the CPU: times are "
             "upper bounds). Peak RSS is the recovery stage's (student, teacher where used, optimizer state).",
             f"Run directories: {_shown(str(args.runs))}/<recipe name> (run.json has every metric)."]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(text) + "\n")
    print(args.out.read_text())


if __name__ == "__main__":
    main()
