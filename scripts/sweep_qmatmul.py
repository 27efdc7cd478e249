"""The quant_matmul candidates the tuner times for one W4A16 g128 shape: the fastest of each kind (GPU).

    python3 scripts/sweep_qmatmul.py --shape 8192x8192 --ms 16,128 [--kinds wg,xw]
    python3 scripts/sweep_qmatmul.py --ms 16 --cfgs "ms,16,128,32,4,2,0,4;mma,16,64,64,4,2,1,4,3,1,1,mma_v2=1"
        (only these configs, in `once_qmatmul.parse_cfg`'s form, timed the same way: no tuner run; each one's
        relative error against fp32 math is printed first, and a config that fails to launch is reported)

Times are the tuner's own (`kernels._tune.gpu_ms`: CUDA-graph replays after a 128 MB L2 flush) with
the flush alone subtracted, so they read as kernel microseconds; cuBLAS fp16 is timed the same way.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from kernels import qmatmul as Q  # noqa: E402
from kernels._tune import TIMINGS, gpu_ms  # noqa: E402
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_kernels import _cfg_str, make_quant, qmm_key, rel_err  # noqa: E402
from once_qmatmul import parse_cfg  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="8192x8192", help="N x K of the weight")
    ap.add_argument("--ms", default="16,64,128")
    ap.add_argument("--kinds", default="", help="only these kinds (comma-separated)")
    ap.add_argument("--top", type=int, default=4, help="the fastest configs of each kind")
    ap.add_argument("--cfgs", default="", help="time only these configs (';'-separated, once_qmatmul's form)")
    args = ap.parse_args()
    n, k = (int(d) for d in args.shape.split("x"))
    torch.manual_seed(0)
    w = make_quant(n, k, 4, 128)
    w16 = Q.dequantize(w.qweight, w.scales, w.zeros, 4, 128, k, dtype=torch.float16)
    flush = gpu_ms(lambda: None)
    kinds = set(filter(None, args.kinds.split(",")))
    print(f"| N x K | M | config | µs | vs cuBLAS fp16 |\n|---|---|---|---|---|")
    for m in (int(v) for v in args.ms.split(",")):
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        t16 = (gpu_ms(lambda: torch.matmul(x, w16.t())) - flush) * 1e3
        if args.cfgs:
            ref = x.float() @ w16.float().t()
            timed = []
            for text in args.cfgs.split(";"):
                try:  # a listed config that fails to launch is reported, and the rest still run
                    c = parse_cfg(text)
                    err = rel_err(Q.quant_matmul(x, w, cfg=c), ref)
                    timed.append((c, gpu_ms(lambda c=c: Q.quant_matmul(x, w, cfg=c))))
                    print(f"| {n}x{k} | {m} | {_cfg_str(c)} | rel err {err:.1e} | |")
                except Exception as e:  # noqa: BLE001 (a sweep row, not a library path)
                    print(f"| {n}x{k} | {m} | {text} | failed: {type(e).__name__}: {str(e)[:100]} | |")
        else:
            Q.quant_matmul(x, w)
            key = qmm_key(m, n, k, 4)
            timed = sorted((t for t in TIMINGS[key] if not kinds or t[0].kind in kinds), key=lambda t: t[1])
        per_kind = {}  # kind -> its timings, fastest first
        for t in timed:
            per_kind.setdefault((t[0].kind, t[0].mma_v2, t[0].natural), []).append(t)  # mma.sync, natural: own kinds
        top = len(timed) if args.cfgs else args.top  # listed configs: every one
        rows = [t for kind_timed in per_kind.values() for t in kind_timed[:top]]
        print(f"| {n}x{k} | {m} | cuBLAS fp16 | {t16:.1f} | 1.00 |")
        for cfg, ms in sorted(rows, key=lambda t: t[1]):
            us = (ms - flush) * 1e3
            print(f"| {n}x{k} | {m} | {_cfg_str(cfg)} | {us:.1f} | {t16 / us:.2f} |")


if __name__ == "__main__":
    main()
