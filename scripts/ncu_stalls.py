"""Where a kernel's warps wait, by SASS opcode: a summary of Nsight Compute's per-instruction stall sampling.

    ncu --clock-control none -k regex:KERNEL -s 2 -c 1 --section SourceCounters --section WarpStateStats -o rep ...
    ncu --import rep.ncu-rep --page source --print-source sass --csv > src.csv
    python3 scripts/ncu_stalls.py src.csv [--top 30]

Prints the samples of each opcode (and its share), split by stall reason, then the instructions with the most
samples. A sample is one warp seen at that instruction, issued or waiting.
"""
import argparse
import collections
import csv
import re


def _num(text: str) -> float:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return 0.0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("csv")
    ap.add_argument("--top", type=int, default=30)
    a = ap.parse_args()
    with open(a.csv, newline="") as f:
        lines = [ln for ln in f if not ln.startswith('"Kernel Name"')]
    rows = list(csv.DictReader(lines))
    reasons = [c for c in rows[0] if c.startswith("stall_") and "Not Issued" not in c]
    by_op = collections.defaultdict(collections.Counter)
    per_inst = []
    for r in rows:
        src = r.get("Source", "").strip()
        m = re.match(r"(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)", src)
        if not m:
            continue
        samples = _num(r.get("Warp Stall Sampling (All Samples)", "0"))
        op = m.group(1)
        by_op[op]["samples"] += samples
        by_op[op]["count"] += 1
        for c in reasons:
            by_op[op][c[6:]] += _num(r[c])
        per_inst.append((samples, r.get("Address", ""), src))
    total = sum(v["samples"] for v in by_op.values()) or 1.0
    print(f"| opcode | instructions | samples % | top stall reasons (% of the opcode's samples) |")
    print("|---|---|---|---|")
    for op, v in sorted(by_op.items(), key=lambda kv: -kv[1]["samples"])[:a.top]:
        parts = sorted(((v[c[6:]], c[6:]) for c in reasons), reverse=True)[:4]
        why = ", ".join(f"{name} {n / max(v['samples'], 1):.0%}" for n, name in parts if n)
        print(f"| {op} | {v['count']} | {v['samples'] / total:.1%} | {why} |")
    print("\nmost-sampled instructions:")
    for samples, addr, src in sorted(per_inst, reverse=True)[:a.top]:
        print(f"  {samples / total:6.2%}  {addr}  {src}")


if __name__ == "__main__":
    main()
