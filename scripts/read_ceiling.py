"""How fast can any kernel read the bytes a target's kernel must read? (CUDA only)

A speed target is reachable only if a kernel that does nothing but stream the same bytes once meets
it. For each target's bytes this times a tuned streaming read (`_stream_read`: grid-stride, 16-byte
loads, UNROLL tiles in flight a program; the best of a sweep over tile, unroll and programs per SM)
and compares it with the target's time budget, measured in the same run:

  * W4A16 g128 at M = 1, 16, 64 on 8192x8192 (and 28672x4096 for contrast): codes + fp16 scales + zeros
    as `prepare_weight` stores them, plus x; the budget is cuBLAS fp16 (torch.matmul, graph replays) / 4,
    / 3 and / 1.5 (the issue's targets);
  * decode attention, bf16 K + V caches (Llama-3-8B heads: 8 KV heads, d = 128) at B x S =
    1x4096, 8x4096, 1x32768, 32x4096: the budget is the bytes at 85% of the device-to-device copy
    bandwidth (read + write counted), measured in the same run.

Times are graph replays over rotating buffers totalling over 3x the L2 (bench_kernels.graph_ms).

    python scripts/read_ceiling.py [--out ceiling.md]
"""
import argparse
import itertools
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_kernels as BK  # noqa: E402


@triton.jit
def _stream_read(src, n_tiles, out_ptr, TILE: tl.constexpr, UNROLL: tl.constexpr):
    """Sum of n_tiles x TILE int32 words; program p reads UNROLL tiles at a time, grid-stride."""
    pid, grid = tl.program_id(0), tl.num_programs(0)
    offs = tl.arange(0, TILE)
    acc = tl.zeros((TILE,), tl.int32)
    for t0 in range(pid * UNROLL, n_tiles, grid * UNROLL):
        for u in tl.static_range(UNROLL):  # UNROLL independent loads before any use
            idx = (t0 + u) * TILE + offs
            acc ^= tl.load(src + idx, mask=idx < n_tiles * TILE, other=0)
    tl.store(out_ptr + pid, tl.sum(acc, 0))


CONFIGS = list(itertools.product((1024, 2048, 4096), (1, 2, 4), (2, 4, 8)))  # (TILE, UNROLL, programs per SM)


def best_read(nbytes: int, sms: int):
    """(µs, config) of the fastest `_stream_read` over a buffer of nbytes (rounded down to 16 KB)."""
    words = nbytes // 16384 * 4096
    bufs = BK.rotating(lambda: torch.randint(0, 1 << 30, (words,), device="cuda", dtype=torch.int32), words * 4)
    out = torch.empty(8 * sms, device="cuda", dtype=torch.int32)
    best = None
    for tile, unroll, per_sm in CONFIGS:
        grid = min(per_sm * sms, triton.cdiv(words // tile, unroll))

        def call(b, tile=tile, unroll=unroll, grid=grid):
            _stream_read[(grid,)](b, words // tile, out, TILE=tile, UNROLL=unroll, num_warps=4)

        ms, how = BK.graph_ms([lambda b=b: call(b) for b in bufs])
        if how == "graph" and (best is None or ms < best[0]):
            best = (ms, f"tile {tile} x{unroll}, {per_sm}/SM")
    return best[0] * 1e3, best[1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    copy_tbs = BK.copy_bandwidth()
    BK.emit(f"device: {torch.cuda.get_device_name(0)}, {sms} SMs; torch {torch.__version__}, triton "
            f"{triton.__version__}; copy bandwidth {copy_tbs:.2f} TB/s (read + write)")

    # W4A16 g128 at M = 1 / 16 / 64 (targets 4x / 3x / 1.5x cuBLAS fp16): the bytes prepare_weight keeps for
    # the kernels (codes, scales, zeros) plus x; the shape 8192², and Llama-3-8B's gate-up for contrast
    rows = []
    for n, k in [(8192, 8192), (28672, 4096)]:
        w = BK.make_quant(n, k, 4, 128)
        wbytes = w.qwords.numel() * 4 + (w.scales.numel() + w.zeros.numel()) * w.scales.element_size()
        w16 = [torch.randn(n, k, device="cuda", dtype=torch.float16) for _ in range(2)]
        del w
        read_us, cfg = best_read(wbytes, sms)
        for m, factor in [(1, 4), (16, 3), (64, 1.5)]:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            cublas_us = BK.graph_ms([lambda i=i: torch.matmul(x, w16[i].t()) for i in range(2)])[0] * 1e3
            budget = cublas_us / factor
            nbytes = wbytes + x.numel() * 2
            read_m = read_us * nbytes / wbytes  # x is < 3% of the bytes: scaled, not re-timed
            rows.append([f"W4A16 g128 {n}x{k}, M = {m} ({factor}x cuBLAS fp16 {cublas_us:.1f} µs)",
                         f"{nbytes / 1e6:.1f}", f"{budget:.1f}", f"{read_m:.1f}",
                         f"{nbytes / read_m / 1e6 / copy_tbs:.0%}", cfg, "yes" if read_m <= budget else "no"])
        del w16
    for b, s in [(1, 4096), (8, 4096), (1, 32768), (32, 4096)]:
        nbytes = 2 * b * 8 * s * 128 * 2
        budget = nbytes / (0.85 * copy_tbs * 1e12) * 1e6
        read_us, cfg = best_read(nbytes, sms)
        rows.append([f"decode bf16 KV, B={b} S={s} (85% of copy)", f"{nbytes / 1e6:.1f}", f"{budget:.1f}",
                     f"{read_us:.1f}", f"{nbytes / read_us / 1e6 / copy_tbs:.0%}", cfg,
                     "yes" if read_us <= budget else "no"])
    BK.table("Read ceiling: the fastest pure read of each target's bytes against the target's time budget",
             ["target", "MB read", "budget µs", "best pure read µs", "read % of copy", "read config",
              "read within budget?"], rows)
    if a.out:
        with open(a.out, "w") as f:
            f.write("\n".join(BK.LINES) + "\n")


if __name__ == "__main__":
    main()
