"""W4A16 g128 configs timed back to back, as a decode step runs its layers: with and without a dependent launch (GPU).

    python3 scripts/pdl_chain.py --shape 8192x8192 --ms 1,16 --cfgs "ms,8,64,32,1,4,0,4,3,specialized=1,halves=2"
    python3 scripts/pdl_chain.py --ms 16 --pdl 1 --cfgs "ms,16,64,32,1,4,0,4,4,specialized=1,halves=2;ms,16,128,..."

Each config (`once_qmatmul.parse_cfg`'s form) is timed with each of the --pdl modes (0, 1, 2 by default), the way
`bench_kernels.py` times the tuner's pick: one CUDA graph of calls over rotating weight copies (> 3x the L2),
no flush between them, so each call follows the previous one as the next layer follows this one. cuBLAS fp16
is timed the same way.
"""
import argparse
import dataclasses
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from kernels import qmatmul as Q  # noqa: E402
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_kernels import _cfg_str, graph_ms, rel_err, rotating_quant  # noqa: E402
from once_qmatmul import parse_cfg  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="8192x8192", help="N x K of the weight")
    ap.add_argument("--ms", default="1,16")
    ap.add_argument("--cfgs", required=True, help="';'-separated configs, each timed with every --pdl mode")
    ap.add_argument("--pdl", default="0,1,2", help="dependent-launch modes to time each config with")
    args = ap.parse_args()
    n, k = (int(d) for d in args.shape.split("x"))
    torch.manual_seed(0)
    ws, w16, _ = rotating_quant(n, k, 4, 128)
    w0 = ws[0]
    print("| N x K | M | config | µs | vs cuBLAS fp16 | rel err |\n|---|---|---|---|---|---|")
    for m in (int(v) for v in args.ms.split(",")):
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        out = torch.empty(m, n, device="cuda", dtype=torch.float16)
        t16 = graph_ms([lambda i=i: torch.matmul(x, w16[i].t()) for i in range(len(w16))])[0] * 1e3
        print(f"| {n}x{k} | {m} | cuBLAS fp16 | {t16:.1f} | 1.00 | |")
        ref = x.float() @ w16[0].float().t()
        for text in args.cfgs.split(";"):
            for pdl in (int(v) for v in args.pdl.split(",")):
                c = dataclasses.replace(parse_cfg(text), pdl=pdl)
                try:  # a config that cannot launch (pdl on the plain kernel) is reported, and the rest still run
                    err = rel_err(Q.quant_matmul(x, w0, cfg=c), ref)
                except Exception as e:  # noqa: BLE001 (a table row, not a library path)
                    print(f"| {n}x{k} | {m} | {text} pdl={pdl} | failed: {type(e).__name__}: {str(e)[:100]} | | |")
                    continue
                t = graph_ms([lambda i=i, c=c: Q.quant_matmul(x, ws[i], cfg=c, out=out) for i in range(len(ws))])[0]
                print(f"| {n}x{k} | {m} | {_cfg_str(c)} | {t * 1e3:.1f} | {t16 / (t * 1e3):.2f} | {err:.1e} |")


if __name__ == "__main__":
    main()
