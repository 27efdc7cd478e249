"""One W4A16 g128 `quant_matmul` launch with a forced config, for Nsight Compute (no tuner, no timing).

    ncu --clock-control none -k regex:_gemv2_kernel -s 2 -c 1 --section SpeedOfLight \\
        python3 scripts/once_qmatmul.py --shape 8192x8192 --m 1 --cfg gemv2,1,64,128,4,4,0,4,1

--cfg is Cfg's fields in order: kind, block_m, block_n, block_kb, split_k, step_blocks, x_split, warps,
stages, ptx, zero_in_tile (flags as 0/1; gemv2 wants stages 1, its prefetch off, as the tuner's picks),
then any field as name=value (e.g. post_zero=0; wg: specialized=1; mma: mma_v2=1).
The call runs three times (compile, then two launches), so `-s 2 -c 1` profiles a warm launch.
results/kernels.md ("Session of 2026-11-30, late") has the full ncu command and what it showed.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from kernels import qmatmul as Q  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_kernels import make_quant  # noqa: E402  (the benchmark's random W4 g128 weight)


def parse_cfg(text: str) -> Q.Cfg:
    kind, *tokens = text.split(",")
    names = ["block_m", "block_n", "block_kb", "split_k", "step_blocks", "x_split", "warps", "stages", "ptx",
             "zero_in_tile"]
    fields = {n: int(v) for n, v in zip(names, (t for t in tokens if "=" not in t))}
    fields.update((n, int(v)) for n, v in (t.split("=") for t in tokens if "=" in t))  # e.g. post_zero=0
    for flag in ("x_split", "ptx", "zero_in_tile", "post_zero", "specialized", "mma_v2", "wgmma", "natural"):
        if flag in fields:
            fields[flag] = bool(fields[flag])
    return Q.Cfg(kind, **fields)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="8192x8192", help="N x K of the weight")
    ap.add_argument("--m", type=int, default=1, help="tokens")
    ap.add_argument("--cfg", required=True)
    args = ap.parse_args()
    n, k = (int(d) for d in args.shape.split("x"))
    torch.manual_seed(0)
    w = make_quant(n, k, 4, 128)
    x = torch.randn(args.m, k, device="cuda", dtype=torch.float16)
    cfg = parse_cfg(args.cfg)
    for _ in range(3):
        out = Q.quant_matmul(x, w, cfg=cfg)
    torch.cuda.synchronize()
    print(f"{args.shape} M={args.m} {cfg}: out norm {out.float().norm().item():.3e}")


if __name__ == "__main__":
    main()
