"""One W4A16 config and cuBLAS fp16 timed several ways, to find why back-to-back and after-a-flush times differ (GPU).

    python3 scripts/timing_methods.py --ms 1,16 --cfgs "ms,8,64,32,1,4,0,4,4,specialized=1,halves=2,pdl=1;..."

Each method gives µs a call:
- chain: one CUDA graph of calls over rotating weight copies (> 3x the L2), none between (`bench_kernels.py`).
- chain x-rot: the same, x rotating too (a copy of x a call), so x is not the previous call's L2-hot x.
- chain spaced: a one-element kernel between calls, that kernel's own chain subtracted.
- flush: each call after a 128 MB `zero_`, the flush's own chain subtracted (the tuner's method, `_tune.gpu_ms`).
- flush rot: the same with rotating weight copies.
- read-flush rot: each call after a 128 MB read (a sum: no dirty lines left in L2), rotating weights.
- L2-hot: one weight back to back (it fits in the L2): what the calls cost with no HBM reads of the weight.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from kernels import qmatmul as Q  # noqa: E402
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_kernels import _cfg_str, rotating_quant  # noqa: E402
from once_qmatmul import parse_cfg  # noqa: E402


def graph_us(calls, total=48, reps=7) -> float:
    """Median µs a call of one CUDA graph running `calls` round-robin, `total` calls in all."""
    seq = [calls[i % len(calls)] for i in range(max(total, len(calls)))]
    for c in calls:
        c()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in seq:
            c()
    graph.replay()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(seq))
    return sorted(times)[reps // 2]


def methods(call, n_w: int, n_x: int) -> dict:
    """µs of call(i_w, i_x) by each method (the module docstring)."""
    big = torch.zeros(128 << 18, dtype=torch.int32, device="cuda")
    total = torch.empty((), dtype=torch.int64, device="cuda")
    tick = torch.zeros(1, device="cuda")

    def zero():
        big.zero_()

    def read():
        torch.sum(big, dim=0, out=total)

    def spacer():
        tick.add_(1)

    def after(pre, rot):
        t_pre = graph_us([pre], total=16)
        return graph_us([lambda i=i: (pre(), call(i if rot else 0, 0)) for i in range(n_w if rot else 1)],
                        total=16) - t_pre

    t_sp = graph_us([spacer])
    return {
        "chain": graph_us([lambda i=i: call(i, 0) for i in range(n_w)]),
        "chain x-rot": graph_us([lambda i=i: call(i, i % n_x) for i in range(n_w)]),
        "chain spaced": graph_us([lambda i=i: (spacer(), call(i, 0)) for i in range(n_w)]) - t_sp,
        "flush": after(zero, False),
        "flush rot": after(zero, True),
        "read-flush rot": after(read, True),
        "L2-hot": graph_us([lambda: call(0, 0)]),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="8192x8192", help="N x K of the weight")
    ap.add_argument("--ms", default="16")
    ap.add_argument("--cfgs", required=True, help="';'-separated configs (`once_qmatmul.parse_cfg`'s form)")
    args = ap.parse_args()
    n, k = (int(d) for d in args.shape.split("x"))
    torch.manual_seed(0)
    ws, w16, _ = rotating_quant(n, k, 4, 128)
    names = None
    for m in (int(v) for v in args.ms.split(",")):
        xs = [torch.randn(m, k, device="cuda", dtype=torch.float16) for _ in range(len(ws))]
        out = torch.empty(m, n, device="cuda", dtype=torch.float16)
        rows = [("cuBLAS fp16", methods(lambda i, j: torch.matmul(xs[j], w16[i % len(w16)].t(), out=out),
                                        len(w16), len(xs)))]
        for text in args.cfgs.split(";"):
            c = parse_cfg(text)
            rows.append((_cfg_str(c), methods(lambda i, j, c=c: Q.quant_matmul(xs[j], ws[i], cfg=c, out=out),
                                              len(ws), len(xs))))
        if names is None:
            names = list(rows[0][1])
            print("| N x K | M | config | " + " | ".join(f"{h} µs" for h in names) + " |")
            print("|---" * (3 + len(names)) + "|")
        for label, t in rows:
            print(f"| {n}x{k} | {m} | {label} | " + " | ".join(f"{t[h]:.1f}" for h in names) + " |")


if __name__ == "__main__":
    main()
