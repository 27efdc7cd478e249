"""W4A16 g128 configs timed back to back, as a decode step runs its layers: with and without a dependent launch (GPU).

    python3 scripts/pdl_chain.py --shape 8192x8192 --ms 1,16 --cfgs "ms,8,64,32,1,4,0,4,3,specialized=1,halves=2"
    python3 scripts/pdl_chain.py --ms 16 --pdl 1 --cfgs "ms,16,64,32,1,4,0,4,4,specialized=1,halves=2;ms,16,128,..."
    python3 scripts/pdl_chain.py --ms 16 --cfgs tuner:ms --flush

Each config (`once_qmatmul.parse_cfg`'s form) is timed with each of the --pdl modes (0, 1, 2 by default), the way
`bench_kernels.py` times the tuner's pick: one CUDA graph of calls over rotating weight copies (> 3x the L2),
no flush between them, so each call follows the previous one as the next layer follows this one. cuBLAS fp16
is timed the same way. `--cfgs tuner` times every candidate the tuner offers for M (`tuner:KIND`: those of one
kind), each with its own dependent-launch mode, and ends with the fastest few. --flush adds the tuner's method
for the same calls (`kernels._tune.gpu_ms`: each call after a 128 MB L2 flush, the flush alone subtracted), so
the two methods are compared in one process.
"""
import argparse
import dataclasses
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from kernels import qmatmul as Q  # noqa: E402
from kernels._tune import gpu_ms  # noqa: E402
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_kernels import _cfg_str, graph_ms, rel_err, rotating_quant  # noqa: E402
from once_qmatmul import parse_cfg  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="8192x8192", help="N x K of the weight")
    ap.add_argument("--ms", default="1,16")
    ap.add_argument("--cfgs", required=True, help="';'-separated configs, each timed with every --pdl mode; or "
                    "tuner[:KIND]: the tuner's candidates (of one kind)")
    ap.add_argument("--pdl", default="0,1,2", help="dependent-launch modes to time each given config with")
    ap.add_argument("--top", type=int, default=5, help="with --cfgs tuner: the fastest rows listed again at the end")
    ap.add_argument("--flush", action="store_true", help="also time each call after an L2 flush (the tuner's way)")
    args = ap.parse_args()
    n, k = (int(d) for d in args.shape.split("x"))
    torch.manual_seed(0)
    ws, w16, _ = rotating_quant(n, k, 4, 128)
    w0 = ws[0]
    flush = gpu_ms(lambda: None) if args.flush else None

    def after_flush(fn):  # µs, or a blank cell without --flush
        return f"{(gpu_ms(fn) - flush) * 1e3:.1f}" if args.flush else ""

    print("| N x K | M | config | µs | vs cuBLAS fp16 | rel err | µs after a flush |\n|---|---|---|---|---|---|---|")
    for m in (int(v) for v in args.ms.split(",")):
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        out = torch.empty(m, n, device="cuda", dtype=torch.float16)
        t16 = graph_ms([lambda i=i: torch.matmul(x, w16[i].t()) for i in range(len(w16))])[0] * 1e3
        tf16 = after_flush(lambda: torch.matmul(x, w16[0].t()))
        print(f"| {n}x{k} | {m} | cuBLAS fp16 | {t16:.1f} | 1.00 | | {tf16} |")
        ref = x.float() @ w16[0].float().t()
        rows = []
        for c in configs(args.cfgs, args.pdl, m, w0):
            try:  # a config that cannot launch (pdl on the plain kernel) is reported, and the rest still run
                err = rel_err(Q.quant_matmul(x, w0, cfg=c), ref)
            except Exception as e:  # noqa: BLE001 (a table row, not a library path)
                print(f"| {n}x{k} | {m} | {_cfg_str(c)} | failed: {type(e).__name__}: {str(e)[:100]} | | | |")
                continue
            t = graph_ms([lambda i=i, c=c: Q.quant_matmul(x, ws[i], cfg=c, out=out) for i in range(len(ws))])[0] * 1e3
            tf = after_flush(lambda c=c: Q.quant_matmul(x, w0, cfg=c, out=out))
            rows.append(f"| {n}x{k} | {m} | {_cfg_str(c)} | {t:.1f} | {t16 / t:.2f} | {err:.1e} | {tf} |")
            print(rows[-1])
        if args.cfgs.startswith("tuner") and rows:
            print(f"\nfastest back to back at M = {m}:")
            for row in sorted(rows, key=lambda r: float(r.split("|")[4]))[: args.top]:
                print(row)


def configs(spec: str, pdl_modes: str, m: int, w) -> list:
    """The configs to time: the tuner's candidates for m tokens (`tuner` / `tuner:KIND`), or each ';'-separated
    config with each dependent-launch mode."""
    if spec.startswith("tuner"):
        kind = spec.partition(":")[2]
        return [c for c in Q.candidates(m, w, torch.float16) if not kind or c.kind == kind]
    return [dataclasses.replace(parse_cfg(text), pdl=int(p)) for text in spec.split(";") for p in pdl_modes.split(",")]


if __name__ == "__main__":
    main()
