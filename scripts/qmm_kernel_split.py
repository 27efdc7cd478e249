"""Where one W4A16 g128 quant_matmul call's GPU time goes, kernel by kernel (the tuner's pick; CUDA only).

    python3 scripts/qmm_kernel_split.py [--shape 8192x8192] [--ms 256,1024]

For each M: the tuner picks a config, then torch.profiler records 20 calls (each after a 128 MB L2 flush) and
the table lists every kernel of a call with its mean device µs, next to cuBLAS fp16's kernels timed the same
way. Shows what a pick spends outside its main kernel (the x gather of the wgmma form, a split-K reduction).
"""
import argparse
import collections
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from kernels import qmatmul as Q  # noqa: E402
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_kernels import make_quant  # noqa: E402

CALLS = 20


def kernel_us(fn) -> dict:
    """Mean device µs per call of each kernel `fn` launches (the L2 flush between calls left out)."""
    flush = torch.empty(128 * 2**20, dtype=torch.int8, device="cuda")
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(CALLS):
            flush.zero_()
            fn()
        torch.cuda.synchronize()
    total = collections.Counter()
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA and "fill" not in ev.name.lower():
            total[ev.name[:70]] += ev.device_time
    return {name: us / CALLS for name, us in total.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="8192x8192", help="N x K of the weight")
    ap.add_argument("--ms", default="256,1024")
    a = ap.parse_args()
    n, k = (int(d) for d in a.shape.split("x"))
    w = make_quant(n, k, 4, 128)
    w16 = Q.dequantize(w.qweight, w.scales, w.zeros, 4, 128, k, dtype=torch.float16)
    print("| N x K | M | path | kernel | µs |\n|---|---|---|---|---|")
    for m in (int(v) for v in a.ms.split(",")):
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        Q.quant_matmul(x, w)  # tune
        for path, fn in (("effopt", lambda: Q.quant_matmul(x, w)), ("cuBLAS fp16", lambda: x @ w16.t())):
            parts = kernel_us(fn)
            for name, us in sorted(parts.items(), key=lambda p: -p[1]):
                print(f"| {n}x{k} | {m} | {path} | `{name}` | {us:.1f} |")
            print(f"| {n}x{k} | {m} | {path} | **sum** | **{sum(parts.values()):.1f}** |")


if __name__ == "__main__":
    main()
