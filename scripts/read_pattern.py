"""Does the W4 matmul's address pattern cost DRAM bandwidth? A pure read of one 8192x8192 W4 weight's codes
(33.5 MB) in the mma.sync kernel's program / trip structure, from two layouts (CUDA only).

`qmatmul_mma` (and gemv2) give each program BLOCK_N rows and a K split, and each loop trip reads SPAN bytes
of every row: BLOCK_N runs of SPAN bytes, rows K/2 bytes apart (the plain row-major codes). If that
pattern itself runs DRAM below the streaming rate, no change to the kernel's arithmetic reaches the read
ceiling; a layout where each (tile, split, trip) is one contiguous run would. This times, for the same
grid, trips and loads (UNROLL trips issued before any is used, as a prefetch would):

  * rows:  the row-major layout, the kernels' pattern;
  * tiles: the same bytes laid out tile by tile, each trip one contiguous BLOCK_N x SPAN run;
  * the grid-stride streaming read of read_ceiling.py (the ceiling).

Times are graph replays over rotating copies totalling over 3x the L2 (bench_kernels.graph_ms).

    python scripts/read_pattern.py [--out pattern.md]
"""
import argparse
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_kernels as BK  # noqa: E402
from read_ceiling import best_read  # noqa: E402


@triton.jit
def _tile_read(src, out_ptr, ROW_WORDS, TRIPS, TILED: tl.constexpr, BN: tl.constexpr, SPAN_W: tl.constexpr,
               SK: tl.constexpr, UNROLL: tl.constexpr):
    """Program (n-tile, split) xors its BN rows x TRIPS * SPAN_W words, UNROLL trips of loads at a time."""
    pid, s = tl.program_id(0), tl.program_id(1)
    r = tl.arange(0, BN)[:, None]
    c = tl.arange(0, SPAN_W)[None, :]
    acc = tl.zeros([BN, SPAN_W], tl.int32)
    for t0 in range(0, TRIPS, UNROLL):
        for u in tl.static_range(UNROLL):
            t = t0 + u
            if TILED:  # tile (pid, s, t): BN x SPAN_W words, contiguous
                idx = ((pid * SK + s) * TRIPS + t) * (BN * SPAN_W) + r * SPAN_W + c
            else:  # row-major: rows ROW_WORDS apart, this split's trip t
                idx = (pid * BN + r) * ROW_WORDS + (s * TRIPS + t) * SPAN_W + c
            acc ^= tl.load(src + idx)
    tl.store(out_ptr + pid * SK + s, tl.sum(tl.sum(acc, 1), 0))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--shape", default="8192x8192", help="N x K of the W4 weight")
    a = ap.parse_args()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    n, k = (int(d) for d in a.shape.split("x"))
    row_words = k // 8  # 4-bit codes: K / 2 bytes a row
    words = n * row_words
    BK.emit(f"device: {torch.cuda.get_device_name(0)}, {sms} SMs; torch {torch.__version__}, triton "
            f"{triton.__version__}; {n}x{k} W4 codes, {words * 4 / 1e6:.1f} MB")
    bufs = BK.rotating(lambda: torch.randint(0, 1 << 30, (words,), device="cuda", dtype=torch.int32), words * 4)
    out = torch.empty(n * 16, device="cuda", dtype=torch.int32)
    stream_us, stream_cfg = best_read(words * 4, sms)
    rows = []
    # (rows a program, bytes a row a trip, split-K, warps, trips in flight): the M = 16 picks' structure
    # (64 rows, 4 blocks = 128 bytes a trip, split-K 4, 2 warps; 128 rows, split-K 8, 4 warps) and neighbours
    configs = [(64, 128, 4, 2, 2), (64, 128, 4, 4, 2), (64, 128, 8, 2, 2), (128, 128, 8, 4, 2), (64, 256, 4, 2, 2),
               (64, 128, 4, 2, 4), (128, 256, 4, 4, 2), (64, 128, 2, 4, 2)]
    for bn, span, sk, warps, unroll in configs:
        span_w = span // 4
        trips = row_words // (sk * span_w)
        if trips < unroll or trips % unroll:
            continue
        res = []
        for tiled in (False, True):
            def call(b, tiled=tiled):
                _tile_read[(n // bn, sk)](b, out, row_words, trips, TILED=tiled, BN=bn, SPAN_W=span_w, SK=sk,
                                          UNROLL=unroll, num_warps=warps)

            ms, how = BK.graph_ms([lambda b=b: call(b) for b in bufs])
            res.append(ms * 1e3 if how == "graph" else float("nan"))
        rows.append([f"{bn} rows, {span} B a row a trip, split-K {sk}, {warps} warps, {unroll} trips in flight",
                     f"{n // bn * sk}", f"{res[0]:.1f}", f"{res[1]:.1f}", f"{res[0] / res[1]:.2f}"])
    rows.sort(key=lambda r: float(r[2]))
    BK.table(f"Pure read in the matmul's program / trip structure: row-major codes vs tile-contiguous (streaming read: "
             f"{stream_us:.1f} µs, {stream_cfg})",
             ["program / trip", "programs", "rows µs", "tiles µs", "rows / tiles"], rows)
    if a.out:
        with open(a.out, "w") as f:
            f.write("\n".join(BK.LINES) + "\n")


if __name__ == "__main__":
    main()
