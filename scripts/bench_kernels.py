"""Benchmark effopt's Triton kernels against the baselines they must beat, in one run (CUDA only).

GPU times come from CUDA-graph replays over input copies that rotate past the L2 (see graph_ms);
the eager column of the matmul table shows what one un-graphed call costs from Python.

    python scripts/bench_kernels.py [--quick] [--out results.md] [--only qmatmul,attn,decode]
    python scripts/bench_kernels.py --gemv [--out gemv.md]   # decode GEMV table only (~2 min)
    python scripts/bench_kernels.py --w8a8 [--out w8a8.md]   # W8A8 (SmoothQuant) table only

Tables:
  * quant_matmul W4A16 g128 (and W8A16 per-channel) vs cuBLAS fp16 (torch.matmul) and
    bitsandbytes NF4 (when importable) at N x K = 4096^2, 8192^2, 14336x4096, 4096x14336 and
    M = 1, 16, 64, 128, 1024; the path column names the tuner's pick ('mma ...' = the swapped
    W x^T kernel, 'xw ...' = the x W^T kernel, offered from M = 32), and two more columns time
    the fastest config of each tensor-core orientation the tuner tried;
  * flash_attention forward / backward, causal and full, d=128, 32 heads (MHA and GQA with 8 KV
    heads), 1k / 4k / 16k tokens vs SDPA's flash and cuDNN backends;
  * decode_attention (bf16) and decode_attention_int8 at KV 4k-16k vs SDPA decode, with the bytes
    moved per second next to the device-to-device copy bandwidth measured in the same run; the
    "int8 Vᵀ" columns read V stored [D, S] per head (effopt's int8 KV cache layout), "int8 Vᵀ q.k"
    adds q rounded to int8 (qk_int8=True), "q.k x2" q as two int8 slices (qk_int8=2, as close as the
    fp16 path), each with its error against bf16 SDPA; "read" times a kernel that only streams the
    bf16 K and V (`_read_kernel`, untuned: scripts/read_ceiling.py times the best of a sweep).
  * --gemv: W4A16 g128 at M = 1, 4, 16 on the decode shapes (incl. Llama-3-8B fused qkv 6144x4096
    and gate-up 28672x4096): cuBLAS fp16, the tuner's pick, the best tensor-core (mma) config
    and each gemv2 config of `gemv2_configs` forced, one row each.
  * --w8a8: ActQuantLinear's products (int8 weights per channel, int8 activations per token) on the
    same shapes and M: kernels.int8_matmul.w8a8_linear (quantize + int8 tensor-core matmul with the
    rescale fused) on the layer's uint8 codes as stored, and on a pre-converted int8 copy; the
    layer's torch path (quantize_per_token, torch._int_mm, float rescale; int_weight() per call as
    the layer does, and with the int8 weight cached); cuBLAS fp16 on the float weight.
Correctness at real sizes on the GPU: `python -m pytest tests/kernels` (picks CUDA when present).
"""
import argparse
import math
import os
import sys
import time
import traceback

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from kernels import attention as A  # noqa: E402
from kernels import int8_matmul as W8  # noqa: E402
from kernels import qmatmul as Q  # noqa: E402
from kernels._tune import TIMINGS, chosen  # noqa: E402

L2_BYTES = 60 * 2**20
LINES: list = []


def emit(line=""):
    print(line, flush=True)
    LINES.append(line)


def bench(fn, rep=50):
    """Eager median milliseconds of fn() with a cold L2 (do_bench flushes before every call)."""
    return triton.testing.do_bench(fn, warmup=10, rep=rep, return_mode="median")


def graph_ms(calls, total=32, reps=7):
    """Median GPU milliseconds per call, from one CUDA graph replaying `calls` round-robin.

    `calls` run on rotating input copies whose total size is over 3x the L2, so no call finds
    its weights or cache in L2; the graph removes the CPU launch overhead (tens of µs per Triton
    launch) that eager timing would add to µs-scale kernels. Falls back to eager do_bench (with
    its L2 flush) when a call cannot be captured; the second value says which was used.
    """
    seq = [calls[i % len(calls)] for i in range(max(total, len(calls)))]
    try:
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
            times.append(start.elapsed_time(end) / len(seq))
        return sorted(times)[reps // 2], "graph"
    except Exception:  # noqa: BLE001 - not capturable (e.g. a library that syncs): time eagerly
        torch.cuda.synchronize()
        return bench(calls[0]), "eager"


def rotating(make, nbytes, cap=32):
    """Copies of an input set (make() builds one) totalling over 3x L2; at most `cap`."""
    n = max(1, min(cap, math.ceil(3 * L2_BYTES / max(nbytes, 1))))
    return [make() for _ in range(n)]


def table(title, header, rows):
    emit(f"\n### {title}\n")
    emit("| " + " | ".join(header) + " |")
    emit("|" + "|".join("---" for _ in header) + "|")
    for r in rows:
        emit("| " + " | ".join(str(c) for c in r) + " |")


def fmt(x, nd=1):
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{nd}f}"


def rel_err(y, ref) -> float:
    """Relative L2 error of an output against its reference, both in fp32."""
    ref = ref.float()
    return ((y.float() - ref).norm() / ref.norm()).item()


def copy_bandwidth():
    """Device-to-device copy of 2 GiB, bytes read + written per second (TB/s)."""
    src = torch.randn(2**30, dtype=torch.float16, device="cuda")
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src), rep=100)
    return 2 * src.numel() * 2 / (ms * 1e-3) / 1e12


@triton.jit
def _read_kernel(a_ptr, b_ptr, n_blocks, out_ptr, BLOCK: tl.constexpr):
    """Read two buffers of n_blocks x BLOCK elements each (grid-stride), keep one sum per program: what
    a kernel that only streams those bytes achieves, the ceiling a decode step at that size can reach."""
    pid, grid = tl.program_id(0), tl.num_programs(0)
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), tl.float32)
    for blk in range(pid, 2 * n_blocks, grid):
        if blk < n_blocks:
            acc += tl.load(a_ptr + blk * BLOCK + offs).to(tl.float32)
        else:
            acc += tl.load(b_ptr + (blk - n_blocks) * BLOCK + offs).to(tl.float32)
    tl.store(out_ptr + pid, tl.sum(acc, 0))


def read_both(a, b, out, block=4096):
    """_read_kernel over a and b (same size, contiguous, a multiple of `block` elements)."""
    _read_kernel[(out.numel(),)](a, b, a.numel() // block, out, BLOCK=block, num_warps=4)


# ------------------------------------------------------------------------------------------------
def make_quant(n, k, bits, group):
    g = k if group <= 0 else group
    qweight = torch.randint(0, 256, (n, -(-k * bits // 8)), dtype=torch.uint8, device="cuda")
    scales = (torch.rand(n, -(-k // g), device="cuda") * 0.01 + 0.001).half()
    zeros = torch.full_like(scales, 2 ** (bits - 1))
    return Q.prepare_weight(qweight, scales, zeros, bits, g, k)


def rotating_quant(n, k, bits, group):
    """Copies of a random quantized n x k weight totalling over 3x the L2, their fp16 dequantized copies (also
    over 3x the L2, for cuBLAS), and one copy's bytes (codes, scales, zeros)."""
    w0 = make_quant(n, k, bits, group)
    wbytes = w0.qweight.numel() + 2 * w0.scales.numel() * 2
    ws = [w0] + rotating(lambda: make_quant(n, k, bits, group), wbytes)[1:]
    w16 = [Q.dequantize(w.qweight, w.scales, w.zeros, bits, w.group_size, k, dtype=torch.float16)
           for w in ws[: max(1, math.ceil(3 * L2_BYTES / (n * k * 2)))]]
    return ws, w16, wbytes


def qmm_key(m, n, k, bits):
    """quant_matmul's tuner key for m tokens on an n x k weight of `bits` (tokens bucketed as it does), or None
    before it has been tuned."""
    tokens = m if m <= 4 else triton.next_power_of_2(m)
    return next((kk for kk in TIMINGS if kk[1:5] == (tokens, n, k, bits)), None)


def bnb_nf4(w_fp16):
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as F
    except Exception as e:  # noqa: BLE001 - optional baseline
        return None, f"bitsandbytes not importable ({type(e).__name__})"
    wq, state = F.quantize_4bit(w_fp16, quant_type="nf4", blocksize=64)
    return (lambda x: bnb.matmul_4bit(x, wq.t(), quant_state=state)), f"bitsandbytes {bnb.__version__}"


def bench_qmatmul(quick, ms_only=None, shapes_only=None):
    shapes = [(4096, 4096), (8192, 8192), (14336, 4096), (4096, 14336)]
    ms_list = [1, 16, 64, 128, 1024]
    variants = [("W4A16 g128", 4, 128)] + ([] if quick else [("W8A16 per-channel", 8, -1)])
    if quick:
        shapes, ms_list = [(8192, 8192), (4096, 14336)], [1, 16, 64, 1024]
    shapes, ms_list = shapes_only or shapes, ms_only or ms_list
    for name, bits, group in variants:
        rows = []
        note = ""
        for n, k in shapes:
            ws, w16, wbytes = rotating_quant(n, k, bits, group)
            w0 = ws[0]
            nf4, note = bnb_nf4(w16[0]) if bits == 4 else (None, "")
            for m in ms_list:
                xs = [torch.randn(m, k, device="cuda", dtype=torch.float16) for _ in range(4)]
                out = torch.empty(m, n, device="cuda", dtype=torch.float16)
                Q.quant_matmul(xs[0], w0, out=out)  # tunes once for this shape
                ref = xs[1].float() @ w16[0].float().t()
                err = rel_err(Q.quant_matmul(xs[1], w0), ref)
                t_q, _ = graph_ms([lambda i=i: Q.quant_matmul(xs[i % 4], ws[i], out=out) for i in range(len(ws))])
                t_e = bench(lambda: Q.quant_matmul(xs[0], w0, out=out))
                t_f, _ = graph_ms([lambda i=i: torch.matmul(xs[i % 4], w16[i].t()) for i in range(len(w16))])
                t_b, how = graph_ms([lambda: nf4(xs[0])]) if nf4 else (None, "")
                key = qmm_key(m, n, k, bits)
                flops = 2 * m * n * k
                byts = wbytes + m * k * 2 + m * n * 2
                best = {}  # per orientation, the tuner's fastest config, re-timed like the row
                for kind in ("mma", "xw", "wg", "ms"):
                    c = min((t for t in TIMINGS.get(key, []) if t[0].kind == kind and math.isfinite(t[1])),
                            key=lambda t: t[1], default=None)
                    if c is None:
                        best[kind] = "n/a"
                        continue
                    calls = [lambda i=i, cf=c[0]: Q.quant_matmul(xs[i % 4], ws[i], out=out, cfg=cf)
                             for i in range(len(ws))]
                    t_c = t_q if c[0] == chosen(key) else graph_ms(calls)[0]
                    best[kind] = f"{fmt(t_c * 1e3)} ({_cfg_str(c[0])})"
                rows.append([f"{n}x{k}", m, fmt(t_q * 1e3), fmt(byts / (t_q * 1e-3) / 1e12, 2),
                             fmt(flops / (t_q * 1e-3) / 1e12), fmt(t_f * 1e3), fmt(t_f / t_q, 2),
                             (fmt(t_b * 1e3) + ("" if how == "graph" else " (eager)")) if t_b else "n/a",
                             fmt(t_b / t_q, 2) if t_b else "n/a", fmt(t_e * 1e3),
                             _cfg_str(chosen(key) if key else None), best["mma"], best["xw"], best["wg"],
                             best["ms"], f"{err:.1e}"])
                print("  row:", " | ".join(str(c) for c in rows[-1]), file=sys.stderr, flush=True)
            ws = w16 = None  # free this shape's copies before the next
        table(f"quant_matmul {name} (fp16 activations; bnb: {note}; path: the tuner's pick, 'mma' = W x^T "
              f"(swap AB), 'xw' = x W^T, 'wg' = Gluon async wgmma (W x^T), 'ms' = Gluon mma.sync (W x^T); "
              f"best mma / xw / wg / ms: the fastest config of each kind the tuner timed)",
              ["N x K", "M", "effopt µs", "TB/s", "TFLOP/s", "cuBLAS fp16 µs", "speedup vs fp16",
               "bnb NF4 µs", "speedup vs NF4", "effopt eager µs", "path", "best mma µs", "best xw µs",
               "best wg µs", "best ms µs", "rel err"], rows)


# (block_n, step, warps, programs per SM) of `--gemv-sweep`, each with prefetch off
GEMV2_SWEEP = [(bn, step, warps, per_sm) for bn, warps in ((64, 4), (128, 8), (128, 4)) for step in (2, 3, 4)
               for per_sm in (3, 4, 5)]


def bench_gemv(copy_tbs, ms_only=None, shapes_only=None, sweep=False):
    """Decode-size W4A16 g128 products: every gemv2 config next to cuBLAS, the tuner and the best mma.
    sweep: also each gemv2 config of GEMV2_SWEEP."""
    shapes = shapes_only or [(8192, 8192), (14336, 4096), (4096, 14336), (4096, 4096), (6144, 4096), (28672, 4096)]
    rows = []
    Q.GEMV2_COPY = "1"  # this table times gemv2's configs: its weights keep gemv2's copy of the codes
    for n, k in shapes:
        ws, w16, wbytes = rotating_quant(n, k, 4, 128)
        w0 = ws[0]
        for m in ms_only or (1, 4, 16):
            xs = [torch.randn(m, k, device="cuda", dtype=torch.float16) for _ in range(4)]
            out = torch.empty(m, n, device="cuda", dtype=torch.float16)
            ref = xs[1].float() @ w16[0].float().t()
            byts = wbytes + m * k * 2 + m * n * 2

            def row(label, cfg):
                err = rel_err(Q.quant_matmul(xs[1], w0, cfg=cfg), ref)
                t, _ = graph_ms([lambda i=i: Q.quant_matmul(xs[i % 4], ws[i], out=out, cfg=cfg)
                                 for i in range(len(ws))])
                rows.append([f"{n}x{k}", m, label, fmt(t * 1e3), fmt(byts / (t * 1e-3) / 1e12, 2),
                             fmt(100 * byts / (t * 1e-3) / 1e12 / copy_tbs, 0), fmt(t_f / t, 2), f"{err:.1e}"])
                print(" | ".join(str(c) for c in rows[-1]), flush=True)  # progress; the table follows

            t_f, _ = graph_ms([lambda i=i: torch.matmul(xs[i % 4], w16[i].t()) for i in range(len(w16))])
            rows.append([f"{n}x{k}", m, "cuBLAS fp16", fmt(t_f * 1e3), fmt(n * k * 2 / (t_f * 1e-3) / 1e12, 2),
                         "", "1.00", ""])
            Q.quant_matmul(xs[0], w0, out=out)  # the tuner times its candidates once for this shape
            key = qmm_key(m, n, k, 4)
            row(f"tuned: {_cfg_str(chosen(key))}", chosen(key))
            for ptx in (False, True):  # with and without the PTX code conversion (none with EFFOPT_QMM_PTX=0)
                mma = min((c for c in TIMINGS[key] if c[0].kind == "mma" and c[0].ptx == ptx), key=lambda c: c[1],
                          default=None)
                if mma:
                    row(f"best mma: {_cfg_str(mma[0])}", mma[0])
            for cfg in Q.gemv2_configs(m, w0):
                row(_cfg_str(cfg), cfg)
            for bn, step, warps, per_sm in GEMV2_SWEEP if sweep else []:
                cfg = Q.gemv2_cfg(m, w0, bn, step, 1, per_sm, warps)
                try:
                    row(f"sweep {per_sm}/SM: {_cfg_str(cfg)}", cfg)
                except triton.runtime.errors.OutOfResources as e:
                    print(f"{_cfg_str(cfg)}: {e}")
        ws = w16 = None
    table(f"decode GEMV, W4A16 g128, fp16 x (copy bandwidth {copy_tbs:.2f} TB/s read + write)",
          ["N x K", "M", "kernel", "µs", "TB/s", "% of copy BW", "speedup vs cuBLAS fp16", "rel err"], rows)


def _cfg_str(cfg):
    """'mma 16x64x64B sk4 x2': kind ('mma' = out^T = W x^T, 'xw' = out = x W^T, gemv, gemv2),
    block_m x block_n x bytes of a row per K-step, split-K, K-steps per trip; 'pre' = scale and zero
    folded into the weight tile (else applied after the MMA); 'zit' = the zero point subtracted in the
    tile, the scale after; xw: also warps and stages; 'ptx' = the PTX code conversion; 'v2' = compiled
    with mma.sync instead of wgmma (sm_90, up to 16 tokens)."""
    if cfg is None:
        return "?"
    if cfg.kind == "dequant":
        return "dequant+cuBLAS"
    tag = f"{cfg.kind} {cfg.block_m}x{cfg.block_n}x{cfg.block_kb}B"
    tag += f" sk{cfg.split_k}" if cfg.split_k > 1 else ""
    tag += f" x{cfg.step_blocks}" if cfg.step_blocks > 1 else ""
    if cfg.kind == "gemv2":
        return tag + f" w{cfg.warps}" + (" prefetch" if cfg.stages > 1 else "")
    if cfg.kind == "wg":
        return f"wg {cfg.block_m}x{cfg.block_n}" + (f" sk{cfg.split_k}" if cfg.split_k > 1 else "") + \
            f" w{cfg.warps}s{cfg.stages}" + (" ws" if cfg.specialized else "")
    if cfg.kind == "ms":
        return f"ms {cfg.block_m}x{cfg.block_n}" + (f" sk{cfg.split_k}" if cfg.split_k > 1 else "") + \
            f" x{cfg.step_blocks} w{cfg.warps}s{cfg.stages}" + ("" if cfg.post_zero else " pre") + \
            (" xg" if cfg.x_split else "") + (" ws" if cfg.specialized else "") + (" h2" if cfg.halves == 2 else "") + \
            (" wgmma" if cfg.wgmma else "") + (" nat" if cfg.natural else "") + (f" pdl{cfg.pdl}" if cfg.pdl else "")
    if cfg.kind == "xw":
        tag += f" w{cfg.warps}s{cfg.stages}"
    tag += "" if cfg.post_zero else " pre"
    return tag + (" zit" if cfg.zero_in_tile else "") + (" ptx" if cfg.ptx else "") + (" v2" if cfg.mma_v2 else "")


# ------------------------------------------------------------------------------------------------
def make_w8a8(n, k):
    """A float fp16 weight [N, K] and ActQuantLinear's buffers for it: (w16, uint8 codes, fp16 scales [N, 1])."""
    from effopt.nn.act_quant_linear import ActQuantLinear

    w16 = torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02
    layer = ActQuantLinear.from_weight(w16, None)
    return w16, layer.qweight, layer.scales


def w8a8_torch_path(x, qweight, scales, int_weight=None):
    """ActQuantLinear's torch path (its forward without the kernel), but torch._int_mm unguarded:
    where it refuses the shape (M <= 16 on some versions) the layer falls back to a float64
    product, which this benchmark reports as n/a rather than time."""
    from effopt.nn.act_quant_linear import quantize_per_token

    xq, xs = quantize_per_token(x)
    wq = int_weight if int_weight is not None else (qweight.to(torch.int16) - 128).to(torch.int8)
    acc = torch._int_mm(xq, wq.t())
    return (acc.float() * xs * scales.float().view(1, -1)).to(x.dtype)


def bench_w8a8(quick):
    shapes = [(4096, 4096), (8192, 8192), (14336, 4096), (4096, 14336)]
    ms_list = [1, 16, 64, 128, 1024]
    if quick:
        shapes, ms_list = [(8192, 8192), (4096, 14336)], [1, 16, 64, 1024]
    rows = []
    for n, k in shapes:
        sets = rotating(lambda: make_w8a8(n, k), n * k)  # the int8 weights past the L2
        w16s = [w for w, _, _ in sets[: max(1, math.ceil(3 * L2_BYTES / (n * k * 2)))]]
        i8s = [W8.int8_weight(q) for _, q, _ in sets]
        w16, q0, s0 = sets[0]
        for m in ms_list:
            xs = [torch.randn(m, k, device="cuda", dtype=torch.float16) for _ in range(4)]
            out = torch.empty(m, n, device="cuda", dtype=torch.float16)
            ref = xs[1].float() @ w16.float().t()

            def err(y):
                return f"{rel_err(y, ref):.1e}"

            W8.w8a8_linear(xs[0], q0, s0, out=out)  # tunes once for this shape (uint8 and int8 weights)
            W8.w8a8_linear(xs[0], i8s[0], s0, out=out)
            e_ours = err(W8.w8a8_linear(xs[1], q0, s0))
            t_u8, _ = graph_ms([lambda i=i: W8.w8a8_linear(xs[i % 4], sets[i][1], sets[i][2], out=out)
                                for i in range(len(sets))])
            t_i8, _ = graph_ms([lambda i=i: W8.w8a8_linear(xs[i % 4], i8s[i], sets[i][2], out=out)
                                for i in range(len(sets))])
            try:
                e_torch = err(w8a8_torch_path(xs[1], q0, s0))
                t_tp, _ = graph_ms([lambda i=i: w8a8_torch_path(xs[i % 4], sets[i][1], sets[i][2])
                                    for i in range(len(sets))])
                t_tc, _ = graph_ms([lambda i=i: w8a8_torch_path(xs[i % 4], sets[i][1], sets[i][2], i8s[i])
                                    for i in range(len(sets))])
            except RuntimeError as e:  # torch._int_mm refuses this shape
                e_torch, t_tp, t_tc = f"n/a ({str(e).splitlines()[0][:40]})", None, None
            t_f, _ = graph_ms([lambda i=i: torch.matmul(xs[i % 4], w16s[i].t()) for i in range(len(w16s))])
            key = next((kk for kk in TIMINGS if kk[0] == "w8a8" and kk[2:6] == (
                m if m <= W8.SMALL_M else triton.next_power_of_2(m), n, k, torch.uint8)), None)
            byts = n * k + m * k * 2 + m * n * 2
            rows.append([f"{n}x{k}", m, fmt(t_u8 * 1e3), fmt(byts / (t_u8 * 1e-3) / 1e12, 2),
                         fmt(2 * m * n * k / (t_u8 * 1e-3) / 1e12), fmt(t_i8 * 1e3),
                         fmt(t_tp * 1e3 if t_tp else None), fmt(t_tc * 1e3 if t_tc else None), fmt(t_f * 1e3),
                         fmt(t_tp / t_u8 if t_tp else None, 2), fmt(t_tc / t_u8 if t_tc else None, 2),
                         fmt(t_f / t_u8, 2), _w8a8_cfg_str(chosen(key) if key else None), e_ours, e_torch,
                         err(torch.matmul(xs[1], w16.t()))])
            print(" | ".join(str(c) for c in rows[-1]), flush=True)  # progress; the table follows
        sets = w16s = i8s = None
    table("W8A8 (SmoothQuant ActQuantLinear): fp16 x, int8 weights per channel, int8 activations per token",
          ["N x K", "M", "effopt µs", "TB/s", "TOP/s", "effopt int8-w µs", "torch path µs",
           "torch int8-w cached µs", "cuBLAS fp16 µs", "vs torch path", "vs torch cached", "vs cuBLAS fp16",
           "config", "rel err effopt", "rel err torch", "rel err fp16"], rows)


def _w8a8_cfg_str(cfg):
    if cfg is None:
        return "?"
    return (f"{cfg.block_m}x{cfg.block_n}x{cfg.block_k} {'swap ' if cfg.swap else ''}"
            f"w{cfg.warps} s{cfg.stages}")


# ------------------------------------------------------------------------------------------------
def sdpa(backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    b = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
         "efficient": SDPBackend.EFFICIENT_ATTENTION}[backend]

    def run(q, k, v, causal):
        with sdpa_kernel(b):
            gqa = q.shape[1] != k.shape[1]
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)

    return run


def try_time(fn, s):
    try:
        fn()
        torch.cuda.synchronize()
        return graph_ms([fn], total=4 if s > 4096 else 16)[0]
    except Exception as e:  # noqa: BLE001 - a backend that does not take this case
        return f"n/a ({type(e).__name__})"


def _attn_cfg_str(pick) -> str:
    if not pick:
        return "?"
    if pick[0] == "ws":  # kernels.attention_ws
        return f"Gluon ws s{pick[1]}" + (" overlap" if pick[2] else "") + (" pingpong" if pick[3] else "")
    return f"{pick[0]}x{pick[1]} w{pick[2]} s{pick[3]}{' TMA' if pick[4] else ''}"


def bench_attention(quick):
    seqs = [1024, 4096] if quick else [1024, 4096, 16384]
    fwd_rows, bwd_rows = [], []
    for hkv in (32, 8):
        for causal in (True, False):
            for s in seqs:
                q = torch.randn(1, 32, s, 128, device="cuda", dtype=torch.bfloat16)
                k = torch.randn(1, hkv, s, 128, device="cuda", dtype=torch.bfloat16)
                v = torch.randn_like(k)
                flops = 4 * 32 * s * s * 128 / (2 if causal else 1)
                ref = sdpa("flash")(q, k, v, causal) if hkv == 32 else None
                o = A.flash_attention(q, k, v, causal=causal)
                err = rel_err(o, ref) if ref is not None else None
                t, _ = graph_ms([lambda: A.flash_attention(q, k, v, causal=causal)], total=4 if s > 4096 else 16)
                base = {b: try_time(lambda b=b: sdpa(b)(q, k, v, causal), s) for b in ("flash", "cudnn")}
                key = next((kk for kk in TIMINGS if kk[0] == "fwd" and kk[4] == causal and kk[6] == s), None)
                pick = chosen(key) if key else None  # (BLOCK_M, BLOCK_N, warps, stages, TMA) or ("ws", ...)
                fwd_rows.append(_attn_row(s, hkv, causal, t, base, flops, err) + [_attn_cfg_str(pick)])
                if causal and (not quick or s == 4096):
                    qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))
                    do = torch.randn_like(q)
                    ours = A.flash_attention(qg, kg, vg, causal=True)
                    tb = bench(lambda: torch.autograd.grad(ours, (qg, kg, vg), do, retain_graph=True))
                    bb = {}
                    for b in ("flash", "cudnn"):
                        try:
                            theirs = sdpa(b)(qg, kg, vg, True)
                            bb[b] = bench(lambda t_=theirs: torch.autograd.grad(t_, (qg, kg, vg), do, retain_graph=True))
                        except Exception as e:  # noqa: BLE001
                            bb[b] = f"n/a ({type(e).__name__})"
                    bwd_rows.append(_attn_row(s, hkv, True, tb, bb, 2.5 * flops, None))
    hdr = ["tokens", "KV heads", "causal", "effopt ms", "TFLOP/s", "SDPA flash ms", "SDPA cuDNN ms",
           "vs flash", "vs cuDNN", "rel err vs flash"]
    table("flash_attention forward, bf16, B=1, 32 heads, d=128 (config: the tuner's pick)", hdr + ["config"],
          fwd_rows)
    table("flash_attention backward (dq, dk, dv), bf16, B=1, 32 heads, d=128, causal "
          "(TFLOP/s counts 2.5x the forward FLOPs)", hdr[:-1], [r[:-1] for r in bwd_rows])


def _attn_row(s, hkv, causal, t, base, flops, err):
    def ratio(b):
        return fmt(b / t, 2) if isinstance(b, float) else "n/a"

    def ms(b):
        return fmt(b, 3) if isinstance(b, float) else b

    return [s, hkv, causal, fmt(t, 3), fmt(flops / (t * 1e-3) / 1e12), ms(base["flash"]), ms(base["cudnn"]),
            ratio(base["flash"]), ratio(base["cudnn"]), "n/a" if err is None else f"{err:.1e}"]


def bench_decode(quick, copy_tbs):
    cases = [(1, 4096), (8, 4096), (32, 4096), (8, 16384), (1, 32768)]
    if quick:
        cases = [(8, 4096), (1, 32768)]
    rows = []
    for b, s in cases:
        nbytes = 2 * b * 8 * s * 128 * 2
        mk = lambda: (torch.randn(b, 32, 128, device="cuda", dtype=torch.bfloat16),  # noqa: E731
                      torch.randn(b, 8, s, 128, device="cuda", dtype=torch.bfloat16),
                      torch.randn(b, 8, s, 128, device="cuda", dtype=torch.bfloat16))
        sets = rotating(mk, nbytes)
        q, k, v = sets[0]
        floats8 = [sets[0]] + rotating(mk, nbytes // 2)[1:]  # the first quantizes sets[0], for the errors
        sets8 = [(qq, kq, vq, ks, vs) for qq, kq, ks, vq, vs in (
            (qq,) + A.quantize_kv(kk) + A.quantize_kv(vv) for qq, kk, vv in floats8)]
        ref = torch.nn.functional.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True)[:, :, 0]
        err = rel_err(A.decode_attention(q, k, v), ref)
        t, _ = graph_ms([lambda a=a: A.decode_attention(*a) for a in sets])
        t8, _ = graph_ms([lambda a=a: A.decode_attention_int8(*a) for a in sets8])
        # V stored [D, S] per head (effopt's int8 cache layout): the transposed view of that buffer
        sets8t = [(qq, kq, vq.transpose(2, 3).contiguous().transpose(2, 3), ks, vs) for qq, kq, vq, ks, vs in sets8]
        t8t, _ = graph_ms([lambda a=a: A.decode_attention_int8(*a) for a in sets8t])
        t8q, _ = graph_ms([lambda a=a: A.decode_attention_int8(*a, qk_int8=True) for a in sets8t])
        t8q2, _ = graph_ms([lambda a=a: A.decode_attention_int8(*a, qk_int8=2) for a in sets8t])
        err8, err8t, err8q, err8q2 = (rel_err(A.decode_attention_int8(*s8, qk_int8=x), ref)
                                      for s8, x in ((sets8[0], False), (sets8t[0], False), (sets8t[0], True),
                                                    (sets8t[0], 2)))
        t_sdpa, _ = graph_ms([lambda a=a: _sdpa_decode(*a) for a in sets])
        sums = torch.empty(8 * torch.cuda.get_device_properties(0).multi_processor_count, device="cuda")
        t_read, _ = graph_ms([lambda a=a: read_both(a[1], a[2], sums) for a in sets])
        b8 = nbytes // 2 + 2 * b * 8 * s * 4
        rows.append([b, s, fmt(t * 1e3), fmt(nbytes / (t * 1e-3) / 1e12, 2), fmt(100 * nbytes / (t * 1e-3) / 1e12 / copy_tbs, 0),
                     fmt(t_read * 1e3), fmt(100 * nbytes / (t_read * 1e-3) / 1e12 / copy_tbs, 0),
                     fmt(100 * t_read / t, 0),
                     fmt(t8 * 1e3), fmt(b8 / (t8 * 1e-3) / 1e12, 2), fmt(t_sdpa * 1e3), fmt(t_sdpa / t, 2),
                     fmt(t_sdpa / t8, 2), fmt(t8t * 1e3), fmt(b8 / (t8t * 1e-3) / 1e12, 2), fmt(t_sdpa / t8t, 2),
                     fmt(t8q * 1e3), fmt(t_sdpa / t8q, 2), fmt(t8q2 * 1e3), fmt(t_sdpa / t8q2, 2),
                     f"{err:.1e}", f"{err8:.1e}", f"{err8t:.1e}", f"{err8q:.1e}", f"{err8q2:.1e}",
                     _decode_cfg(A.decode_choice(q, k)),
                     _decode_cfg(A.decode_choice(q, sets8[0][1], quant=True)),
                     _decode_cfg(A.decode_choice(q, sets8[0][1], quant=True, v_t=True))])
    table(f"decode attention, 32 query heads / 8 KV heads, d=128 (copy bandwidth {copy_tbs:.2f} TB/s "
          "read+write)",
          ["batch", "KV len", "bf16 µs", "bf16 TB/s", "% of copy BW", "read µs", "read % of copy BW",
           "bf16 % of read", "int8 µs", "int8 TB/s", "SDPA bf16 µs",
           "bf16 vs SDPA", "int8 vs SDPA", "int8 Vᵀ µs", "int8 Vᵀ TB/s", "int8 Vᵀ vs SDPA", "int8 Vᵀ q.k µs",
           "int8 Vᵀ q.k vs SDPA", "int8 Vᵀ q.k x2 µs", "int8 Vᵀ q.k x2 vs SDPA", "rel err", "rel err int8",
           "rel err int8 Vᵀ", "rel err int8 Vᵀ q.k", "rel err int8 Vᵀ q.k x2",
           "bf16 config", "int8 config", "int8 Vᵀ config"], rows)


def _decode_cfg(cfg) -> str:
    """BLOCK_N / programs per SM / warps / stages, and where the slices are merged."""
    if cfg is None:
        return "n/a"
    bn, per_sm, warps, stages, fused, cap, pdl = A.decode_cfg_fields(cfg)
    return f"{bn}x{per_sm}/SM w{warps} s{stages} " + ("fused merge" if fused else "merge launch") + \
        (f" (PDL {int(pdl)})" if pdl and not fused else "") + (f" maxnreg {cap}" if cap else "")


def _sdpa_decode(q, k, v):
    return torch.nn.functional.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True)


# ------------------------------------------------------------------------------------------------
def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a smaller set of shapes")
    ap.add_argument("--out", default=None, help="also write the tables (markdown) here")
    ap.add_argument("--only", default="qmatmul,attn,decode")
    ap.add_argument("--gemv", action="store_true", help="only the decode GEMV table (gemv2 configs vs the rest)")
    ap.add_argument("--gemv-sweep", action="store_true", help="with --gemv: also a grid of gemv2 configs")
    ap.add_argument("--w8a8", action="store_true", help="only the W8A8 (SmoothQuant int8 x int8) table")
    ap.add_argument("--ms", default=None, help="qmatmul, gemv: only these token counts, e.g. 16,64")
    ap.add_argument("--shapes", default=None, help="qmatmul, gemv: only these NxK weights, e.g. 8192x8192,4096x14336")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_kernels.py needs a CUDA GPU")
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    emit(f"# effopt kernels benchmark\n\n{time.strftime('%Y-%m-%d %H:%M')} | {props.name} "
         f"({props.multi_processor_count} SMs) | torch {torch.__version__} | triton {triton.__version__} | "
         f"`{' '.join(sys.argv)}`")
    copy_tbs = copy_bandwidth()
    emit(f"\ndevice-to-device copy: {copy_tbs:.2f} TB/s (read + write)")
    ms_only = [int(m) for m in args.ms.split(",")] if args.ms else None
    shapes_only = [tuple(int(d) for d in s.split("x")) for s in args.shapes.split(",")] if args.shapes else None
    sections = {"qmatmul": lambda: bench_qmatmul(args.quick, ms_only, shapes_only),
                "attn": lambda: bench_attention(args.quick),
                "decode": lambda: bench_decode(args.quick, copy_tbs),
                "gemv": lambda: bench_gemv(copy_tbs, ms_only, shapes_only, args.gemv_sweep),
                "w8a8": lambda: bench_w8a8(args.quick)}
    only = [name for name, flag in (("gemv", args.gemv), ("w8a8", args.w8a8)) if flag]
    for name in only or args.only.split(","):
        t0 = time.time()
        try:
            sections[name]()
        except Exception:  # noqa: BLE001 - report and go on with the other tables
            emit(f"\n{name}: FAILED\n```\n{traceback.format_exc()}```")
        emit(f"\n({name}: {time.time() - t0:.0f} s)")
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(LINES) + "\n")


if __name__ == "__main__":
    main()
