"""Time each attention-forward config side by side with the SDPA cuDNN and flash backends (CUDA only).

`bench_kernels.py --only attn` reports the tuner's pick; this times every config named here in one process, so
forms of a kernel can be compared on the same GPU state. bf16, B=1, 32 query heads, d=128.

    python scripts/sweep_attn.py [--seqs 4096,16384] [--kv-heads 32,8] [--full] [--cfgs "ws,2,1,1;128,64,8,3,1"]

A config is `kernels.attention._fwd_cfgs`' tuple: "ws,stages,overlap,pingpong" for the Gluon kernels
(kernels/attention_ws.py), "block_m,block_n,warps,stages,tma" for the Triton one.
"""
import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
from bench_kernels import fmt, graph_ms, rel_err, sdpa, table  # noqa: E402
from kernels import attention as A  # noqa: E402

DEFAULT_CFGS = "128,64,8,3,1;ws,2,0,0;ws,2,1,0;ws,2,1,1"


def parse_cfg(text: str) -> tuple:
    parts = text.split(",")
    if parts[0] == "ws":
        return ("ws", int(parts[1]), bool(int(parts[2])), bool(int(parts[3])))
    return tuple(int(p) for p in parts[:4]) + (bool(int(parts[4])),)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqs", default="4096,16384")
    ap.add_argument("--kv-heads", default="32,8")
    ap.add_argument("--full", action="store_true", help="no causal mask")
    ap.add_argument("--cfgs", default=DEFAULT_CFGS, help="';'-separated configs (see the module docstring)")
    a = ap.parse_args()
    cfgs = [parse_cfg(c) for c in a.cfgs.split(";")]
    causal = not a.full
    names = [",".join(str(int(x)) if isinstance(x, bool) else str(x) for x in c) for c in cfgs]
    rows = []
    for hkv in (int(h) for h in a.kv_heads.split(",")):
        for s in (int(x) for x in a.seqs.split(",")):
            q = torch.randn(1, 32, s, 128, device="cuda", dtype=torch.bfloat16)
            k = torch.randn(1, hkv, s, 128, device="cuda", dtype=torch.bfloat16)
            v = torch.randn_like(k)
            flops = 4 * 32 * s * s * 128 / (2 if causal else 1)
            total = 4 if s > 4096 else 16
            base = {b: graph_ms([lambda b=b: sdpa(b)(q, k, v, causal)], total=total)[0] for b in ("cudnn", "flash")}
            ref = sdpa("cudnn")(q, k, v, causal)
            cells = []
            for c in cfgs:
                fn = lambda c=c: A._attn_forward(q, k, v, causal, 1 / math.sqrt(128), None, c)  # noqa: E731
                err = rel_err(fn()[0], ref)
                t = graph_ms([fn], total=total)[0]
                cells.append(f"{fmt(t * 1e3, 0)} µs, {fmt(flops / t / 1e9, 0)} TF, {fmt(base['cudnn'] / t, 3)}x"
                             + ("" if err < 1e-2 else f" ERR {err:.1e}"))
            rows.append([s, hkv, fmt(base["cudnn"] * 1e3, 0), fmt(flops / base["cudnn"] / 1e9, 0),
                         fmt(base["flash"] * 1e3, 0)] + cells)
    table(f"attention forward, bf16, B=1, 32 heads, d=128, {'causal' if causal else 'full'}: µs, TFLOP/s, "
          "speed vs cuDNN", ["tokens", "KV heads", "cuDNN µs", "cuDNN TF", "flash µs"] + names, rows)


if __name__ == "__main__":
    main()
