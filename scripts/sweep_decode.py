"""Sweep decode-attention configs (bf16 and int8 caches) on the bench's shapes; CUDA only.

Every config (BLOCK_N, programs per SM, warps, stages, fused merge) is timed the way
bench_kernels.py times the decode table (CUDA-graph replays over cache copies > 3x L2), so the
figures compare with that table. Prints, per shape and cache type, the fastest configs and the
tuner's pick and its time (per L2 flush of the tuner, --flush).

    python scripts/sweep_decode.py [--shapes 32x4096,8x4096] [--top 6] [--caches int8] [--modes 0,1,2] [--v-t]
        [--qk-int8 1,2] [--blocks 64,128 --per-sm 1,2,4 --warps 4 --stages 2,3] [--flush zero,read]
        [--merge-chunks 1,8] [--pdl 0,1,2] [--merge-rows 1,4 --merge-warps 1,4]
    python scripts/sweep_decode.py --once 32x4096 --quant --cfg 128,2,4,3,0   # one call (for ncu)
"""
import argparse
import itertools
import sys

import torch

from bench_kernels import copy_bandwidth, fmt, graph_ms, rotating, table

sys.path.insert(0, __file__.rsplit("/scripts/", 1)[0])
from kernels import attention as A  # noqa: E402
from kernels import _tune  # noqa: E402


V_T = False  # --v-t: int8 V stored [D, S] per head (effopt's cache layout), passed as the transposed view


def make_sets(b, s, quant):
    nbytes = 2 * b * 8 * s * 128 * (1 if quant else 2)

    def mk():
        q = torch.randn(b, 32, 128, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(b, 8, s, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        if not quant:
            return q, k, v
        (kq, ks), (vq, vs) = A.quantize_kv(k), A.quantize_kv(v)
        if V_T:
            vq = vq.transpose(2, 3).contiguous().transpose(2, 3)
        return q, kq, vq, ks, vs
    return rotating(mk, nbytes), nbytes + (2 * b * 8 * s * 4 if quant else 0)


def call(args, quant, cfg=None, qk_int8=False):
    if quant:
        return A.decode_attention_int8(*args, cfg=cfg, qk_int8=qk_int8)
    return A.decode_attention(*args, cfg=cfg)


def parse_cfg(text):
    """'64,4,4,2,0[,cap[,pdl]]' -> a decode config tuple (the fifth field, fused merge, as a bool)."""
    cfg = tuple(int(x) for x in text.split(","))
    return cfg[:4] + (bool(cfg[4]),) + cfg[5:7]


def parse_shape(text):
    b, s = text.split("x")
    return int(b), int(s)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="1x4096,8x4096,32x4096,8x16384,1x32768")
    ap.add_argument("--top", type=int, default=6)
    ap.add_argument("--caches", default="bf16,int8")
    ap.add_argument("--modes", default=None, help="int8 conversion modes to compare (A.INT8_CONVERT), e.g. 0,1,2")
    ap.add_argument("--qk-int8", default="", help="int8 caches: also q as int8, 1 or 2 slices (qk_int8), e.g. 1,2")
    ap.add_argument("--blocks", default="32,64,128,256", help="BLOCK_N values to try")
    ap.add_argument("--per-sm", default="1,2,4,8", help="programs per SM to try")
    ap.add_argument("--warps", default="4,8")
    ap.add_argument("--stages", default="2,3,4")
    ap.add_argument("--maxnreg", default="0", help="register caps to try (0: none), e.g. 0,128")
    ap.add_argument("--pdl", default="0", help="dependent launches (1: the merge, 2: merge and split), e.g. 0,1,2")
    ap.add_argument("--merge-chunks", default=str(A.MERGE_CHUNK), help="splits a trip of the fused merge, e.g. 1,8")
    ap.add_argument("--merge-rows", default=str(A.MERGE_ROWS), help="rows a merge-kernel program, e.g. 1,4")
    ap.add_argument("--merge-warps", default=str(A.MERGE_WARPS), help="merge-kernel warps (0: by splits), e.g. 0,1,4")
    ap.add_argument("--flush", default=_tune.FLUSH_MODE, help="tuner L2 flushes to compare, e.g. zero,read")
    ap.add_argument("--once", default=None, help="BxS: run one config once per cache copy (profiling)")
    ap.add_argument("--quant", action="store_true")
    ap.add_argument("--v-t", action="store_true", help="int8 V stored [D, S] per head")
    ap.add_argument("--cfg", default="128,2,4,3,0")
    a = ap.parse_args()
    global V_T
    V_T = a.v_t
    if a.once:
        cfg = parse_cfg(a.cfg)
        sets, _ = make_sets(*parse_shape(a.once), a.quant)
        for s in sets:
            call(s, a.quant, cfg)
        torch.cuda.synchronize()
        return
    copy_tbs = copy_bandwidth()
    print(f"copy bandwidth {copy_tbs:.2f} TB/s", flush=True)
    ints = lambda text: [int(x) for x in text.split(",")]  # noqa: E731
    grid = itertools.product(ints(a.blocks), ints(a.per_sm), ints(a.warps), ints(a.stages))
    cfgs = [c + (f,) + ((cap, pdl) if pdl else (cap,) if cap else ()) for c in grid for f in (False, True)
            for cap in ints(a.maxnreg) for pdl in ints(a.pdl) if not (f and pdl)]
    rows = []
    for shape in a.shapes.split(","):
        b, s = parse_shape(shape)
        runs = [(c == "int8", m, False) for c in a.caches.split(",")
                for m in (a.modes.split(",") if c == "int8" and a.modes else [A.INT8_CONVERT])]
        runs += [(True, A.INT8_CONVERT, m) for m in (ints(a.qk_int8) if a.qk_int8 else [])]
        runs = [r + (chunk, m_rows, m_warps) for r in runs for chunk in ints(a.merge_chunks)
                for m_rows in ints(a.merge_rows) for m_warps in ints(a.merge_warps)]
        for quant, mode, qk_int8, chunk, m_rows, m_warps in runs:
            A.INT8_CONVERT, A.MERGE_CHUNK, A.MERGE_ROWS, A.MERGE_WARPS = int(mode), chunk, m_rows, m_warps
            _tune.forget()  # the tuner's pick per mode
            sets, nbytes = make_sets(b, s, quant)
            timed = []
            for cfg in cfgs:
                try:
                    t, _ = graph_ms([lambda x=x: call(x, quant, cfg, qk_int8) for x in sets])
                except Exception as e:  # noqa: BLE001 - a config that does not fit: report, go on
                    print(f"{shape} {cfg}: {type(e).__name__}", flush=True)
                    continue
                timed.append((t, cfg))
            timed.sort()
            cache = (f"int8 q.k, {qk_int8} slice(s)" if qk_int8 else f"int8 cvt {mode}") if quant else "bf16"
            cache += f", merge {chunk} a trip" if len(ints(a.merge_chunks)) > 1 else ""
            if len(ints(a.merge_rows) + ints(a.merge_warps)) > 2:
                cache += f", merge {m_rows} rows x {m_warps} warps"
            for rank, (t, cfg) in enumerate(timed[:a.top]):
                rows.append([shape, cache, rank + 1, cfg, fmt(t * 1e3),
                             fmt(100 * nbytes / (t * 1e-3) / 1e12 / copy_tbs, 0)])
            flushes = a.flush.split(",")
            for flush in flushes:  # the tuner's pick under each L2 flush, timed like the rest
                _tune.FLUSH_MODE = flush
                _tune.forget()
                t_pick, _ = graph_ms([lambda x=x: call(x, quant, None, qk_int8) for x in sets])
                pick = A.decode_choice(sets[0][0], sets[0][1], quant=quant, qk_int8=qk_int8, v_t=quant and V_T)
                rows.append([shape, cache, f"tuner ({flush} flush)", pick, fmt(t_pick * 1e3),
                             fmt(100 * nbytes / (t_pick * 1e-3) / 1e12 / copy_tbs, 0)])
            for r in rows[-min(a.top, len(timed)) - len(flushes):]:  # as it goes: a run cut short keeps them
                print("partial | " + " | ".join(str(c) for c in r), flush=True)
    table("decode config sweep (graph replays, cache copies > 3x L2)",
          ["B x S", "cache", "rank", "config (BLOCK_N, per SM, warps, stages, fused)", "µs", "% of copy BW"], rows)


if __name__ == "__main__":
    main()
