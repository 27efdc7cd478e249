"""Fused attention: FlashAttention-style forward and backward, split-KV decode, int8-KV decode.

Layouts: q [B, H, Sq, D], k / v [B, Hkv, Skv, D] (H a multiple of Hkv: GQA / MQA), any strides
with a unit stride on D. Causal masks are bottom-right aligned (query i sits at position
i + Skv - Sq, as with a KV cache); `window` = W keeps keys with q_pos - W < k_pos <= q_pos
(transformers' sliding-window convention). fp16 / bf16, head dim up to 256 (64 and 128 tuned).

Forward: one program per (BLOCK_M queries, head); keys stream through in BLOCK_N blocks with an
online softmax in base 2 (exp2 of pre-scaled logits). Blocks that need no mask run a mask-free
loop. Backward: recompute P from the saved log-sum-exp; one kernel accumulates dK, dV per key
block (looping over the query heads of its KV group), another dQ per query block.
Decode: each program takes one KV head, all of its G query heads (times the step's T tokens, T > 1
for a speculative verify step) as the rows of a small MMA, and one slice of the cache; a second
kernel merges the slices by their log-sum-exp.
"""
import math

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from kernels import attention_ws
from kernels._tune import choose, device_buffer, interpreting, pdl_ok

LOG2E = 1.4426950408889634


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr):
    # triton 3.9's CPU interpreter mis-computes bf16 dots: there (UPCAST) operands go in as fp32.
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    return tl.dot(a, b, acc)


@triton.jit
def _keep(rows_pos, cols, Skv, WINDOW, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Boolean [rows, cols] mask of the keys each query may see."""
    ok = (cols < Skv)[None, :]
    if CAUSAL:
        ok = ok & (cols[None, :] <= rows_pos[:, None])
    if HAS_WINDOW:
        ok = ok & (cols[None, :] > rows_pos[:, None] - WINDOW)
    return ok


@triton.jit
def _fwd_blocks(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, pos, offs_n, offs_d, d_ok,
                lo, hi, Skv, qk_scale, WINDOW,
                MASK: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, TMA: tl.constexpr):
    """Online-softmax update over key blocks [lo, hi); MASK=False for blocks known to be full."""
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        if TMA:  # k_base / v_base are tensor descriptors [Skv, HEAD_DIM]; rows past Skv read as 0
            kt = tl.trans(k_base.load([start_n, 0]))
        elif MASK:
            kt = tl.load(k_base + cols[None, :] * stride_kn + offs_d[:, None],
                         mask=d_ok[:, None] & (cols < Skv)[None, :], other=0.0)
        else:
            kt = tl.load(k_base + cols[None, :] * stride_kn + offs_d[:, None], mask=d_ok[:, None], other=0.0)
        qk = _dot(q, kt, tl.zeros((q.shape[0], BLOCK_N), tl.float32), UPCAST) * qk_scale
        if MASK:
            qk = tl.where(_keep(pos, cols, Skv, WINDOW, CAUSAL, HAS_WINDOW), qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen no key yet
        p = tl.math.exp2(qk - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if TMA:
            v = v_base.load([start_n, 0])
        elif MASK:
            v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :],
                        mask=(cols < Skv)[:, None] & d_ok[None, :], other=0.0)
        else:
            v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :], mask=d_ok[None, :], other=0.0)
        acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], UPCAST)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(Q, K, V, O, LSE, qk_scale, Sq, Skv, H, GROUP, WINDOW,
              stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
              stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, UPCAST: tl.constexpr,
              TMA: tl.constexpr = False):
    """O = softmax(Q K^T * scale + mask) V for BLOCK_M queries of one (batch, head); LSE in log2 units.

    TMA: K / V tiles through device-side tensor descriptors (Hopper's bulk copies; HEAD_DIM == BLOCK_D,
    16-byte aligned rows): in sm_90 SASS (Triton 3.6, 128x64 tiles, 8 warps) 146 registers against
    181 with pointer loads. On the H200 the tuner picks it (128x128) for causal 16k only: 2.7% faster
    there; pointer loads win at the other shapes (results/kernels.md).
    """
    pid_m = tl.program_id(0)
    if CAUSAL:  # the longest rows first, so the last wave is short
        pid_m = tl.num_programs(0) - 1 - pid_m
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    hk = h // GROUP
    off = Skv - Sq
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    pos = offs_m + off
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                mask=(offs_m < Sq)[:, None] & d_ok[None, :], other=0.0)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    if TMA:
        k_base = tl.make_tensor_descriptor(k_base, [Skv, HEAD_DIM], [stride_kn, 1], [BLOCK_N, BLOCK_D])
        v_base = tl.make_tensor_descriptor(v_base, [Skv, HEAD_DIM], [stride_vn, 1], [BLOCK_N, BLOCK_D])

    # key range [lo, hi) and its mask-free middle [full_lo, full_hi), all multiples of BLOCK_N
    first, last = pid_m * BLOCK_M + off, pid_m * BLOCK_M + BLOCK_M - 1 + off  # positions of the rows
    hi = Skv
    full_hi = (Skv // BLOCK_N) * BLOCK_N
    if CAUSAL:
        hi = tl.minimum(Skv, tl.maximum(last + 1, 0))
        full_hi = tl.minimum(full_hi, (tl.maximum(first + 1, 0) // BLOCK_N) * BLOCK_N)
    lo = 0
    full_lo = 0
    if HAS_WINDOW:
        lo = (tl.maximum(first - WINDOW + 1, 0) // BLOCK_N) * BLOCK_N
        full_lo = tl.cdiv(tl.maximum(last - WINDOW + 1, 0), BLOCK_N) * BLOCK_N
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.maximum(tl.minimum(full_hi, hi), full_lo)

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, pos, offs_n, offs_d,
                                d_ok, full_lo, full_hi, Skv, qk_scale, WINDOW, False, CAUSAL, HAS_WINDOW,
                                BLOCK_N, UPCAST, TMA)
    acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, pos, offs_n, offs_d,
                                d_ok, lo, full_lo, Skv, qk_scale, WINDOW, True, CAUSAL, HAS_WINDOW,
                                BLOCK_N, UPCAST, TMA)
    acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, pos, offs_n, offs_d,
                                d_ok, full_hi, hi, Skv, qk_scale, WINDOW, True, CAUSAL, HAS_WINDOW,
                                BLOCK_N, UPCAST, TMA)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # a row with no visible key outputs 0
    row_ok = offs_m < Sq
    tl.store(LSE + bh * Sq + offs_m, m_i + tl.math.log2(l_safe), mask=row_ok)
    o = acc / l_safe[:, None]
    tl.store(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :],
             o.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _attn_bwd_delta(O, DO, DELTA, Sq, H, stride_ob, stride_oh, stride_om, stride_db, stride_dh, stride_dm,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta[bh, i] = sum_d O[i, d] * dO[i, d]."""
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_m < Sq)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :], mask=ok, other=0.0)
    do = tl.load(DO + b * stride_db + h * stride_dh + offs_m[:, None] * stride_dm + offs_d[None, :], mask=ok, other=0.0)
    tl.store(DELTA + bh * Sq + offs_m, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=offs_m < Sq)


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, qk_scale, sm_scale, Sq, Skv, H, HKV, GROUP, WINDOW,
                   stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                   stride_vb, stride_vh, stride_vn, stride_db, stride_dh, stride_dm,
                   stride_gb, stride_gh, stride_gn,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, UPCAST: tl.constexpr):
    """dK, dV for BLOCK_N keys of one KV head, summed over the GROUP query heads that share it.

    dV = sum_i P^T dO; dS = P * (dO V^T - delta); dK = scale * dS^T Q (all from recomputed P).
    DK / DV ([B, Hkv, Skv, D]) share strides (stride_g*).
    """
    bhk = tl.program_id(1)
    b, hk = bhk // HKV, bhk % HKV
    off = Skv - Sq
    start_n = tl.program_id(0) * BLOCK_N
    cols = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    kv_ok = (cols < Skv)[:, None] & d_ok[None, :]
    k = tl.load(K + b * stride_kb + hk * stride_kh + cols[:, None] * stride_kn + offs_d[None, :], mask=kv_ok, other=0.0)
    v = tl.load(V + b * stride_vb + hk * stride_vh + cols[:, None] * stride_vn + offs_d[None, :], mask=kv_ok, other=0.0)
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    # query rows that can see this key block
    lo = 0
    hi = Sq
    if CAUSAL:
        lo = (tl.maximum(start_n - off, 0) // BLOCK_M) * BLOCK_M
    if HAS_WINDOW:
        hi = tl.minimum(Sq, tl.maximum(start_n + BLOCK_N - 1 + WINDOW - off, 0))
    offs_mb = tl.arange(0, BLOCK_M)
    for g in range(GROUP):
        h = hk * GROUP + g
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_db + h * stride_dh
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + offs_mb
            row_ok = offs_m < Sq
            q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            do = tl.load(do_base + offs_m[:, None] * stride_dm + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            lse = tl.load(LSE + (b * H + h) * Sq + offs_m, mask=row_ok, other=0.0)
            delta = tl.load(DELTA + (b * H + h) * Sq + offs_m, mask=row_ok, other=0.0)
            qk_t = _dot(k, tl.trans(q), tl.zeros((BLOCK_N, BLOCK_M), tl.float32), UPCAST) * qk_scale
            keep = tl.trans(_keep(offs_m + off, cols, Skv, WINDOW, CAUSAL, HAS_WINDOW)) & row_ok[None, :]
            p_t = tl.where(keep, tl.math.exp2(qk_t - lse[None, :]), 0.0)
            dv = _dot(p_t.to(do.dtype), do, dv, UPCAST)
            dp_t = _dot(v, tl.trans(do), tl.zeros((BLOCK_N, BLOCK_M), tl.float32), UPCAST)
            ds_t = p_t * (dp_t - delta[None, :])
            dk = _dot(ds_t.to(q.dtype), q, dk, UPCAST)
    out = b * stride_gb + hk * stride_gh + cols[:, None] * stride_gn + offs_d[None, :]
    tl.store(DK + out, (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_ok)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=kv_ok)


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, qk_scale, sm_scale, Sq, Skv, H, GROUP, WINDOW,
                 stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                 stride_vb, stride_vh, stride_vn, stride_db, stride_dh, stride_dm,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, UPCAST: tl.constexpr):
    """dQ = scale * dS K for BLOCK_M queries of one head (DQ shares Q's strides)."""
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    hk = h // GROUP
    off = Skv - Sq
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    row_ok = offs_m < Sq
    qo = offs_m[:, None] * stride_qm + offs_d[None, :]
    q = tl.load(Q + b * stride_qb + h * stride_qh + qo, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    do = tl.load(DO + b * stride_db + h * stride_dh + offs_m[:, None] * stride_dm + offs_d[None, :],
                 mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    lse = tl.load(LSE + bh * Sq + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + bh * Sq + offs_m, mask=row_ok, other=0.0)
    first = tl.program_id(0) * BLOCK_M + off
    lo = 0
    hi = Skv
    if CAUSAL:
        hi = tl.minimum(Skv, tl.maximum(first + BLOCK_M, 0))
    if HAS_WINDOW:
        lo = (tl.maximum(first - WINDOW + 1, 0) // BLOCK_N) * BLOCK_N
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        kv_ok = (cols < Skv)[:, None] & d_ok[None, :]
        k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :], mask=kv_ok, other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :], mask=kv_ok, other=0.0)
        qk = _dot(q, tl.trans(k), tl.zeros((BLOCK_M, BLOCK_N), tl.float32), UPCAST) * qk_scale
        keep = _keep(offs_m + off, cols, Skv, WINDOW, CAUSAL, HAS_WINDOW) & row_ok[:, None]
        p = tl.where(keep, tl.math.exp2(qk - lse[:, None]), 0.0)
        dp = _dot(do, tl.trans(v), tl.zeros((BLOCK_M, BLOCK_N), tl.float32), UPCAST)
        ds = p * (dp - delta[:, None])
        dq = _dot(ds.to(k.dtype), k, dq, UPCAST)
    tl.store(DQ + b * stride_qb + h * stride_qh + qo, (dq * sm_scale).to(DQ.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])


# int8 -> fp16 for four codes in one 32-bit register: the byte x + 128 under an 0x64 high byte reads,
# as fp16, 1152 + x (exact); the paired subtraction leaves x. Selector 0x5140 puts bytes 0 and 1 under
# 0x64 (codes 0, 1 in the low/high half), 0x7362 bytes 2 and 3.
_I8X4_TO_F16_PTX = tl.constexpr("""{
    .reg .b32 b, bias;
    xor.b32 b, $2, 0x80808080;
    prmt.b32 $0, b, 0x64646464, 0x5140;
    prmt.b32 $1, b, 0x64646464, 0x7362;
    mov.b32 bias, 0x64806480;
    sub.f16x2 $0, $0, bias;
    sub.f16x2 $1, $1, bias;
}""")


@triton.jit
def _i8_to_f16(x, MODE: tl.constexpr):
    """int8 -> fp16 without an int-to-float convert.

    MODE 0 (and always under the interpreter, which runs no PTX): element-wise integer ops.
    MODE 1 / 2: _I8X4_TO_F16_PTX, four codes a register, 1.25 instructions a code; 2 marks it
    impure so the compiler converts the tile as loaded (16 contiguous bytes a thread) and copies
    fp16 to the MMA operand, instead of reading a tile that is not contiguous along the MMA's K
    dimension (V) from shared memory a byte at a time. INT8_CONVERT 3 (not a MODE here) gives K mode
    1 and V mode 2. Which is fastest is measured per Triton version (scripts/sweep_decode.py
    --modes, results/kernels.md): INT8_CONVERT picks it."""
    if MODE == 0:
        u = (x.to(tl.uint8, bitcast=True) ^ 0x80).to(tl.int16)
        return (u | 0x6400).to(tl.float16, bitcast=True) - 1152.0
    return tl.inline_asm_elementwise(_I8X4_TO_F16_PTX, "=r,=r,r", [x], dtype=tl.float16, is_pure=MODE == 1, pack=4)


@triton.jit
def _decode_split(Q, K, V, KS, VS, O_PART, LSE_PART, LENS, OUT, LOCK, qk_scale, HKV, GROUP, T, SPLIT_LEN, NUM_SPLITS,
                  stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                  stride_vd, stride_sb, stride_sh, stride_ob, stride_oh, stride_ot,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
                  QUANT: tl.constexpr, UPCAST: tl.constexpr, FUSED_MERGE: tl.constexpr, CVT: tl.constexpr,
                  QK_INT8: tl.constexpr, V_T: tl.constexpr, MERGE_R: tl.constexpr,
                  MERGE_CHUNK: tl.constexpr, PDL: tl.constexpr = 0):
    """Attention of the T query tokens of the GROUP query heads of KV head hk over one slice of the cache.

    Row r of the MMA is query token t = r % T of head g = r // T. The T tokens are the last T of
    the LENS[b] valid slots, so token t sees slots < LENS[b] - (T - 1 - t) (causal within the step).
    Writes the slice's normalised output O_PART[b, h, t, split, :] (fp32) and its log2-sum-exp.
    QUANT: K and V are int8 with one scale per (batch, head, token) in KS / VS (strides
    stride_sb, stride_sh, 1): q.k = (q.k_int) * ks and p.v = (p * vs).v_int, in fp16.
    QK_INT8 (with QUANT): q is quantized per row to int8 as well (scale max|q| / 127, rounded half
    up) and q.k runs on int8 tensor cores, exact in int32, so K needs no conversion at all; an
    approximation beyond the cache's own (SageAttention quantizes Q the same way). QK_INT8 2: q is
    split into two int8 slices, q = (127 q_hi + q_lo) max|q| / 127^2 (the second holds the first's
    rounding residual, as the Ozaki scheme splits operands for integer units), two int8 MMAs; q's error is
    at most max|q| / (2 * 127^2) an element, ~127 times below what the int8 K cache's rounding already puts
    into q.k (max|k| / 254 an element).
    V_T (with QUANT): V is stored [D, S] per head (stride_vd between rows of one dimension, slots
    contiguous, S a multiple of 16). p.v sums over slots, so each code pair the MMA takes is then two
    adjacent bytes: offline sm_90 SASS (Triton 3.6, 128-slot blocks) has no byte loads from shared memory,
    982 instructions per block against 1367 and 148 registers against 242. Slots are read in whole
    16-slot groups (a mask that vectorises); a read past `end` meets p = 0 and finite codes.
    FUSED_MERGE: the last program of a (batch, KV head) to finish merges every split into OUT (an
    arrival counter per (batch, KV head) in LOCK, re-armed after), saving the merge launch, which is
    a visible share of a small cache's decode. It merges the GROUP * T rows (MERGE_R, a power of two)
    MERGE_CHUNK splits at a time, so that the partials of a chunk are read in one round trip.
    PDL (CUDA, merge launch): 1: let the merge kernel, launched as a programmatic dependent, start once
    every program here has begun (it waits, `gdc_wait`, for this grid's writes before reading them);
    2: also launched as a dependent of whatever ran before, so this grid is scheduled during that one's
    tail and waits for its writes (q, the cache) before reading anything.
    """
    if PDL == 2:
        gdc_wait()
    if PDL >= 1:
        gdc_launch_dependents()
    bhk, split = tl.program_id(0), tl.program_id(1)
    b, hk = bhk // HKV, bhk % HKV
    length = tl.load(LENS + b)
    start = split * SPLIT_LEN
    end = tl.minimum(start + SPLIT_LEN, length)
    offs_r = tl.arange(0, BLOCK_R)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    r_ok = offs_r < GROUP * T
    t = offs_r % T
    h = hk * GROUP + offs_r // T
    limit = length - (T - 1 - t)  # per row: slots [0, limit) are visible
    q = tl.load(Q + b * stride_qb + h[:, None] * stride_qh + t[:, None] * stride_qt + offs_d[None, :],
                mask=r_ok[:, None] & d_ok[None, :], other=0.0)
    if QUANT:
        q = q.to(tl.float16)
    if QK_INT8:
        q_abs_max = tl.maximum(tl.max(tl.abs(q.to(tl.float32)), 1), 1e-30)
        q_hi = tl.minimum(tl.maximum(tl.floor(q.to(tl.float32) * (127.0 / q_abs_max)[:, None] + 0.5), -127.0), 127.0)
        q_i8 = q_hi.to(tl.int8)
        row_scale = q_abs_max * (qk_scale / 127.0)
        if QK_INT8 == 2:  # the rounding residual (<= half a step) as a second slice, 127 times finer
            resid = q.to(tl.float32) * (127.0 / q_abs_max)[:, None] - q_hi  # in [-0.5, 0.5] steps
            q_lo = tl.minimum(tl.maximum(tl.floor(resid * 127.0 + 0.5), -127.0), 127.0).to(tl.int8)
            row_scale = q_abs_max * (qk_scale / (127.0 * 127.0))
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    m_i = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_R,), tl.float32)
    acc = tl.zeros((BLOCK_R, BLOCK_D), tl.float32)
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + offs_n
        c_ok = cols < end
        kt = tl.load(k_base + cols[None, :] * stride_kn + offs_d[:, None], mask=d_ok[:, None] & c_ok[None, :], other=0)
        if V_T:
            c16 = cols < tl.cdiv(end, 16) * 16
            vt = tl.load(v_base + cols[None, :] + offs_d[:, None] * stride_vd, mask=c16[None, :] & d_ok[:, None],
                         other=0)
            v = tl.trans(vt)
        else:
            v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :], mask=c_ok[:, None] & d_ok[None, :],
                        other=0)
        if QUANT:
            ks = tl.load(KS + b * stride_sb + hk * stride_sh + cols, mask=c_ok, other=0.0).to(tl.float32)
            vs = tl.load(VS + b * stride_sb + hk * stride_sh + cols, mask=c_ok, other=0.0).to(tl.float32)
            if QK_INT8 == 2:  # 127 q_hi.k + q_lo.k is exact in int32 (|.| < 2^28 at D = 128)
                qk_i = tl.dot(q_i8, kt, out_dtype=tl.int32) * 127 + tl.dot(q_lo, kt, out_dtype=tl.int32)
                qk = qk_i.to(tl.float32) * row_scale[:, None] * ks[None, :]
            elif QK_INT8:
                qk = tl.dot(q_i8, kt, out_dtype=tl.int32).to(tl.float32) * row_scale[:, None] \
                    * ks[None, :]
            else:
                k16 = _i8_to_f16(kt, 1 if CVT == 3 else CVT)
                qk = _dot(q, k16, tl.zeros((BLOCK_R, BLOCK_N), tl.float32), UPCAST) * (ks * qk_scale)[None, :]
        else:
            qk = _dot(q, kt, tl.zeros((BLOCK_R, BLOCK_N), tl.float32), UPCAST) * qk_scale
        qk = tl.where(c_ok[None, :] & (cols[None, :] < limit[:, None]), qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no visible slot yet: p = alpha = 0
        p = tl.math.exp2(qk - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if QUANT:
            v16 = _i8_to_f16(v, 2 if CVT == 3 else CVT)
            acc = _dot((p * vs[None, :]).to(tl.float16), v16, acc * alpha[:, None], UPCAST)
        else:
            acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], UPCAST)
        m_i = m_new
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # an empty slice: lse = -inf, output 0
    part = ((b * HKV * GROUP + h) * T + t) * NUM_SPLITS + split
    tl.store(LSE_PART + part, m_i + tl.math.log2(l_safe), mask=r_ok)
    tl.store(O_PART + part[:, None] * HEAD_DIM + offs_d[None, :], acc / l_safe[:, None],
             mask=r_ok[:, None] & d_ok[None, :])
    if FUSED_MERGE:
        tl.debug_barrier()  # every thread's partial is written before the arrival is counted
        if tl.atomic_add(LOCK + bhk, 1, sem="acq_rel", scope="gpu") == NUM_SPLITS - 1:
            rows = tl.arange(0, MERGE_R)
            rows_ok = rows < GROUP * T
            t_m, h_m = rows % T, hk * GROUP + rows // T
            first = ((b * HKV * GROUP + h_m) * T + t_m) * NUM_SPLITS
            out = _merge_splits(O_PART, LSE_PART, first, NUM_SPLITS, rows_ok, offs_d, d_ok, HEAD_DIM, MERGE_R,
                                BLOCK_D, MERGE_CHUNK)
            tl.store(OUT + b * stride_ob + h_m[:, None] * stride_oh + t_m[:, None] * stride_ot + offs_d[None, :],
                     out.to(OUT.dtype.element_ty), mask=rows_ok[:, None] & d_ok[None, :])
            tl.atomic_xchg(LOCK + bhk, 0)  # re-arm the counter for the next launch


@triton.jit
def _merge_splits(O_PART, LSE_PART, first, NUM_SPLITS, r_ok, offs_d, d_ok, HEAD_DIM: tl.constexpr,
                  BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr):
    """sum_s w_s O_s / sum_s w_s with w_s = 2^(lse_s - max lse), for rows whose splits start at
    `first` [BLOCK_R]; reads through L2 (.cg), as other programs wrote the partials. CHUNK splits
    a trip, rescaled as the running maximum grows (one pass, one round trip a chunk)."""
    offs_c = tl.arange(0, CHUNK)
    m = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    acc = tl.zeros((BLOCK_R, BLOCK_D), tl.float32)
    total = tl.zeros((BLOCK_R,), tl.float32)
    for s0 in range(0, NUM_SPLITS, CHUNK):
        ok = r_ok[:, None] & (s0 + offs_c < NUM_SPLITS)[None, :]
        part = first[:, None] + s0 + offs_c[None, :]  # [BLOCK_R, CHUNK]
        lse = tl.load(LSE_PART + part, mask=ok, other=float("-inf"), cache_modifier=".cg")
        o = tl.load(O_PART + part[:, :, None] * HEAD_DIM + offs_d[None, None, :],
                    mask=ok[:, :, None] & d_ok[None, None, :], other=0.0, cache_modifier=".cg")
        m_new = tl.maximum(m, tl.max(lse, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no finite lse yet: weights and rescale 0
        w = tl.where(lse > float("-inf"), tl.math.exp2(lse - m_safe[:, None]), 0.0)
        rescale = tl.math.exp2(m - m_safe)
        acc = acc * rescale[:, None] + tl.sum(o * w[:, :, None], 1)
        total = total * rescale + tl.sum(w, 1)
        m = m_new
    return acc / tl.maximum(total, 1e-30)[:, None]


@triton.jit
def _decode_merge(O_PART, LSE_PART, OUT, NUM_SPLITS, stride_ob, stride_oh, stride_ot, H, T, N_ROWS,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr, CHUNK: tl.constexpr,
                  PDL: tl.constexpr = False):
    """OUT[b, h, t] = sum_s w_s O_s / sum_s w_s with w_s = 2^(lse_s - max lse), for ROWS (b, h, t) rows a
    program, CHUNK splits a trip (`_merge_splits`)."""
    if PDL:  # launched early as a programmatic dependent of the split kernel: wait for its writes
        gdc_wait()
    bht = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    r_ok = bht < N_ROWS
    b, h, t = bht // (H * T), (bht // T) % H, bht % T
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    out = _merge_splits(O_PART, LSE_PART, bht * NUM_SPLITS, NUM_SPLITS, r_ok, offs_d, d_ok, HEAD_DIM, ROWS, BLOCK_D,
                        CHUNK)
    tl.store(OUT + b[:, None] * stride_ob + h[:, None] * stride_oh + t[:, None] * stride_ot + offs_d[None, :],
             out.to(OUT.dtype.element_ty), mask=r_ok[:, None] & d_ok[None, :])


# ----------------------------------------------------------------------------------------------
# Wrappers
# ----------------------------------------------------------------------------------------------
def _check_qkv(q, k, v):
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"expected q [B, H, Sq, D] and k, v [B, Hkv, Skv, D]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3] or q.shape[1] % k.shape[1]:
        raise ValueError(f"batch / head dim mismatch or H={q.shape[1]} not a multiple of Hkv={k.shape[1]}")
    if q.dtype not in (torch.float16, torch.bfloat16) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must all be fp16 or bf16, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[3] > 256:
        raise ValueError(f"head dim {q.shape[3]} > 256 is not supported")
    if not (q.is_cuda or interpreting()):
        raise ValueError("the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU)")


def _unit_last(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _set_tma_allocator():
    """Device-side tensor descriptors (TMA) need global scratch from the launcher: torch provides it."""
    triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device="cuda"))


def _fwd_cfgs(D, tma: bool, ws: bool = False):
    """(BLOCK_M, BLOCK_N, warps, stages, TMA) to time; the first is the default (it does not spill on
    sm_90). The TMA copies come next, offered when `tma` (see `_tma_ok`); with `ws`, last, ("ws", stages,
    overlap, pingpong): the warp-specialized Gluon kernels (`kernels.attention_ws`, Hopper only, EFFOPT_ATTN_WS=0
    leaves them out; the overlapped one fits an SM's shared memory with 2 slots)."""
    if interpreting():
        return [(32, 32, 4, 1, False)]
    tiles = [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3)] if D <= 64 else \
        [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3)]
    return ([t + (False,) for t in tiles] + ([t + (True,) for t in tiles] if tma else [])
            + ([("ws", 2, False, False), ("ws", 3, False, False), ("ws", 2, True, False),
                  ("ws", 2, True, True)] if ws else []))


def _tma_ok(*tensors) -> bool:
    """Tensor descriptors can read these [B, H, S, D] CUDA tensors: D of 64 or 128 (the whole tile),
    unit last stride, 16-byte aligned data and row strides (bulk-copy rules)."""
    t0 = tensors[0]  # the CPU interpreter runs descriptors too (tests)
    return (t0.is_cuda or interpreting()) and t0.shape[-1] in (64, 128) and all(
        t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and all(st * t.element_size() % 16 == 0 for st in t.stride()[:-1])
        for t in tensors)


def _attn_forward(q, k, v, causal, sm_scale, window, cfg=None, o=None, lse=None):
    """o [B, H, Sq, D] and lse [B*H, Sq] (log2 units); o / lse may be passed in (tests poison them)."""
    B, H, Sq, D = q.shape
    Hkv, Skv = k.shape[1], k.shape[2]
    if o is None:
        o = torch.empty(B, H, Sq, D, device=q.device, dtype=q.dtype)
        lse = torch.empty(B * H, Sq, device=q.device, dtype=torch.float32)
    bd = max(16, triton.next_power_of_2(D))

    tma_ok = _tma_ok(k, v)
    ws_ok = attention_ws.ENABLED and attention_ws.available(q)

    def run(c):
        if c[0] == "ws":
            return attention_ws.forward(q, k, v, causal, sm_scale, window, o, lse, stages=c[1], overlap=c[2],
                                       pingpong=c[3])
        bm, bn, warps, stages, tma = (*c, False)[:5]
        tma = tma and tma_ok  # the tuner's pick is per shape; a misaligned view of one falls back
        if tma and q.is_cuda:
            _set_tma_allocator()
        _attn_fwd[(triton.cdiv(Sq, bm), B * H)](
            q, k, v, o, lse, sm_scale * LOG2E, Sq, Skv, H, H // Hkv, window or 0,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
            HEAD_DIM=D, BLOCK_D=bd, BLOCK_M=bm, BLOCK_N=bn, CAUSAL=causal, HAS_WINDOW=bool(window),
            UPCAST=not q.is_cuda, TMA=tma, num_warps=warps, num_stages=stages)

    if cfg is None:
        key = ("fwd", q.device, D, q.dtype, causal, bool(window), triton.next_power_of_2(Sq), triton.next_power_of_2(Skv))
        cfg = choose(key, _fwd_cfgs(D, tma_ok, ws_ok), run)
    run(cfg)
    return o, lse


def _bwd_cfgs(D):
    """Candidates (BLOCK_M, BLOCK_N, warps, stages) for the dK/dV and the dQ kernel."""
    if interpreting():
        return [(32, 32, 4, 1)], [(32, 32, 4, 1)]
    if D <= 64:
        return [(64, 64, 4, 2), (32, 128, 8, 2), (32, 64, 4, 3)], [(64, 64, 4, 3), (128, 64, 8, 2), (64, 32, 4, 2)]
    return [(32, 64, 4, 2), (64, 64, 8, 2), (32, 128, 8, 2)], [(64, 64, 4, 3), (128, 64, 8, 2), (128, 32, 8, 2)]


def _attn_backward(do, q, k, v, o, lse, causal, sm_scale, window, cfg=None, grads=None):
    """dq, dk, dv; cfg = ((dK/dV tiles), (dQ tiles)) forces the tiles, default: timed once per shape.

    grads: optional preallocated (dq, dk, dv) (tests poison them)."""
    B, H, Sq, D = q.shape
    Hkv, Skv = k.shape[1], k.shape[2]
    do = _unit_last(do)
    bd = max(16, triton.next_power_of_2(D))
    delta = torch.empty_like(lse)
    _attn_bwd_delta[(triton.cdiv(Sq, 64), B * H)](
        o, do, delta, Sq, H, o.stride(0), o.stride(1), o.stride(2), do.stride(0), do.stride(1), do.stride(2),
        HEAD_DIM=D, BLOCK_D=bd, BLOCK_M=64)
    if grads is None:
        grads = (torch.empty_like(q), torch.empty(k.shape, device=k.device, dtype=k.dtype),
                 torch.empty(v.shape, device=v.device, dtype=v.dtype))
    dq, dk, dv = grads
    common = dict(HEAD_DIM=D, BLOCK_D=bd, CAUSAL=causal, HAS_WINDOW=bool(window), UPCAST=not q.is_cuda)
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2))

    def run_dkdv(c):
        bm, bn, warps, stages = c
        _attn_bwd_dkdv[(triton.cdiv(Skv, bn), B * Hkv)](
            q, k, v, do, lse, delta, dk, dv, sm_scale * LOG2E, sm_scale, Sq, Skv, H, Hkv, H // Hkv, window or 0,
            *strides, dk.stride(0), dk.stride(1), dk.stride(2),
            BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages, **common)

    def run_dq(c):
        bm, bn, warps, stages = c
        _attn_bwd_dq[(triton.cdiv(Sq, bm), B * H)](
            q, k, v, do, lse, delta, dq, sm_scale * LOG2E, sm_scale, Sq, Skv, H, H // Hkv, window or 0,
            *strides, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages, **common)

    if cfg is None:
        key = (q.device, D, q.dtype, causal, bool(window), H // Hkv, triton.next_power_of_2(Sq))
        cands = _bwd_cfgs(D)
        cfg = (choose(("dkdv",) + key, cands[0], run_dkdv), choose(("dq",) + key, cands[1], run_dq))
    run_dkdv(cfg[0])
    run_dq(cfg[1])
    return dq, dk, dv


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, sm_scale, window, cfg):
        o, lse = _attn_forward(q, k, v, causal, sm_scale, window, cfg)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.args = (causal, sm_scale, window)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _attn_backward(do, q, k, v, o, lse, *ctx.args)
        return dq, dk, dv, None, None, None, None


def flash_attention(q, k, v, causal: bool = True, sm_scale: float = None, window: int = None, *, cfg=None):
    """softmax(q k^T * sm_scale + mask) v with a fused Triton kernel; differentiable.

    Args:
        q: [B, H, Sq, D]; k, v: [B, Hkv, Skv, D] with H % Hkv == 0 (GQA/MQA), fp16 or bf16.
        causal: bottom-right aligned causal mask (query i at position i + Skv - Sq).
        sm_scale: default 1/sqrt(D).
        window: sliding window W (causal only): keys with q_pos - W < k_pos <= q_pos.
        cfg: force (BLOCK_M, BLOCK_N, num_warps, num_stages) (tests); default: timed once per shape.
    Returns o [B, H, Sq, D] (contiguous).
    """
    _check_qkv(q, k, v)
    if window is not None and (not causal or window < 1):
        raise ValueError("window needs causal=True and window >= 1")
    sm_scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    return _FlashAttention.apply(q, k, v, causal, sm_scale, window, cfg)


def quantize_kv(x):
    """Symmetric int8 per (batch, head, token): x [B, Hkv, S, D] -> (int8 [B, Hkv, S, D], fp32 scale [B, Hkv, S])."""
    scale = x.float().abs().amax(-1).clamp_min(1e-8) * (1.0 / 127.0)  # not / 127: the same codes on every device
    q = torch.round(x.float() / scale[..., None]).clamp(-127, 127).to(torch.int8)
    return q, scale


DEBUG_POISON = False  # tests: fill the per-slice partial results with NaN before the launch
MERGE_CHUNK = 8  # splits the fused merge reads a trip (a power of two)
# The merge kernel: (batch, head, token) rows a program; its warps (0: by the splits a trip, 1 to 4: on an H200 one
# warp for up to 32 splits was 0.6-0.8 us faster than 4 at bf16 B = 8, 4k in two runs, results/kernels.md); at most
# this many splits x rows a trip (one trip up to 256 splits at one row a program)
MERGE_ROWS, MERGE_WARPS, MERGE_SPLITS_MAX = 1, 0, 256
INT8_CONVERT = 1  # _i8_to_f16's MODE on a GPU (3: K 1, V 2): 1 measured fastest of 0-2 with Triton 3.6 on the H200


def _decode(q, k, v, k_scale, v_scale, cache_seqlens, sm_scale, block_n, num_splits, out, fused_merge=None, cfg=None,
            qk_int8=False):
    squeeze = q.dim() == 3  # [B, H, D]: one token, returned as [B, H, D]
    if squeeze:
        q = q[:, :, None]
    if q.dim() != 4:
        raise ValueError(f"decode attention takes q [B, H, D] or [B, H, T, D], got {tuple(q.shape)}")
    B, H, T, D = q.shape
    if k.dim() != 4 or v.shape != k.shape or k.shape[0] != B or k.shape[3] != D or H % k.shape[1]:
        raise ValueError(f"q {tuple(q.shape)} does not match caches {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.is_cuda or interpreting()):
        raise ValueError("the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU)")
    v_t = k_scale is not None and v.stride(2) == 1 and v.shape[2] % 16 == 0  # int8 V stored [B, Hkv, D, S]
    q, k, v = _unit_last(q), _unit_last(k), v if v_t else _unit_last(v)
    Hkv, S = k.shape[1], k.shape[2]
    group = H // Hkv
    if cache_seqlens is None:
        lens = _full_lengths(q.device, B, S)
    else:
        lens = cache_seqlens.to(device=q.device, dtype=torch.int32)
    sm_scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(D)
    quant = k_scale is not None
    ks = k_scale if quant else lens
    vs = v_scale if quant else lens
    if quant and (k_scale.stride(-1) != 1 or v_scale.stride() != k_scale.stride()):
        ks, vs = k_scale.contiguous(), v_scale.contiguous()
    shape = (B, H, D) if squeeze else (B, H, T, D)
    if out is None:
        out = torch.empty(shape, device=q.device, dtype=q.dtype)
    elif out.shape != shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError(f"out must be {list(shape)} in {q.dtype}")
    out4 = out[:, :, None] if squeeze else out
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 8
    bd = max(16, triton.next_power_of_2(D))
    rows = max(16, triton.next_power_of_2(T * group))  # every (token, head) pair of a KV group: one MMA

    def run(c):
        bn, per_sm, warps, stages, fused, cap, pdl = decode_cfg_fields(c)
        pdl = int(pdl) if not fused and pdl_ok(q.device) else 0
        splits = num_splits or max(1, min(triton.cdiv(per_sm * sms, B * Hkv), triton.cdiv(S, 2 * bn)))
        split_len = triton.cdiv(triton.cdiv(S, splits), bn) * bn
        splits = triton.cdiv(S, split_len)
        o_part = torch.empty(B * H * T * splits, D, device=q.device, dtype=torch.float32)
        lse_part = torch.empty(B * H * T * splits, device=q.device, dtype=torch.float32)
        if DEBUG_POISON:
            o_part.fill_(float("nan"))
            lse_part.fill_(float("nan"))
        # the fused merge's arrival counters, one per (batch, KV head): zero between launches (they re-arm)
        counters = device_buffer("decode counters", q.device, B * Hkv, torch.int32, 4096, zeroed=True)
        _decode_split[(B * Hkv, splits)](
            q, k, v, ks, vs, o_part, lse_part, lens, out4, counters,
            sm_scale * LOG2E, Hkv, group, T, split_len, splits,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), v.stride(3), ks.stride(0) if quant else 0,
            ks.stride(1) if quant else 0,
            out4.stride(0), out4.stride(1), out4.stride(2),
            HEAD_DIM=D, BLOCK_D=bd, BLOCK_R=rows, BLOCK_N=bn,
            QUANT=quant, UPCAST=not q.is_cuda, FUSED_MERGE=fused, CVT=INT8_CONVERT if q.is_cuda else 0,
            QK_INT8=qk_int8, V_T=v_t, MERGE_R=max(2, triton.next_power_of_2(T * group)),
            MERGE_CHUNK=MERGE_CHUNK, PDL=pdl, num_warps=warps, num_stages=stages,
            **({"maxnreg": cap} if cap else {}), **({"launch_pdl": True} if pdl == 2 else {}))
        if not fused:
            chunk = max(2, min(triton.next_power_of_2(splits), MERGE_SPLITS_MAX // MERGE_ROWS))
            merge_warps = MERGE_WARPS or min(4, max(1, chunk * MERGE_ROWS // 32))  # <= 128 fp32 partials a thread
            _decode_merge[(triton.cdiv(B * H * T, MERGE_ROWS),)](
                o_part, lse_part, out4, splits, out4.stride(0), out4.stride(1), out4.stride(2), H, T, B * H * T,
                HEAD_DIM=D, BLOCK_D=bd, ROWS=MERGE_ROWS, CHUNK=chunk, PDL=bool(pdl), num_warps=merge_warps,
                **({"launch_pdl": True} if pdl else {}))

    if cfg is None and block_n is not None:  # forced tiles: ~2 programs per SM unless num_splits is given
        cfg = (block_n, 2, 4, 3 if q.is_cuda else 1, bool(fused_merge))
    elif cfg is None:
        cands = [c for c in _decode_cfgs(q.device) if fused_merge is None or c[4] == fused_merge]
        cfg = choose(_decode_key(q, k, quant, qk_int8, fused_merge, v_t), cands, run)
    run(cfg)
    return out


def decode_cfg_fields(cfg) -> tuple:
    """A decode config with its optional fields filled in: (BLOCK_N, programs per SM, warps, stages,
    fused merge, register cap (0: none), PDL mode (0: none))."""
    return (*cfg, 0, 0)[:7]


def _decode_key(q4, k, quant: bool, qk_int8: bool, fused_merge, v_t: bool) -> tuple:
    """The tuner's key of a decode call: q4 [B, H, T, D], k [B, Hkv, S, D]."""
    B, H, T, D = q4.shape
    Hkv, S = k.shape[1], k.shape[2]
    return ("decode", q4.device, D, q4.dtype, quant, qk_int8, v_t, H // Hkv, T, triton.next_power_of_2(B * Hkv),
            triton.next_power_of_2(S), fused_merge)


def decode_choice(q, k_cache, quant: bool = False, qk_int8: bool = False, v_t: bool = False):
    """(BLOCK_N, programs per SM, warps, stages, fused merge) the tuner picked for this shape, or None."""
    from kernels._tune import chosen

    return chosen(_decode_key(q if q.dim() == 4 else q[:, :, None], k_cache, quant, qk_int8, None, v_t))


_FULL_LENS: dict = {}


def _full_lengths(device, batch: int, length: int) -> torch.Tensor:
    """int32 [batch] of `length` (no cache_seqlens given), made once per (device, batch, length), so that a call
    does not launch a fill kernel each time. Not kept when made during CUDA-graph capture (its memory would
    belong to that graph's pool)."""
    key = (device, batch, length)
    lens = _FULL_LENS.get(key)
    if lens is None:
        lens = torch.full((batch,), length, device=device, dtype=torch.int32)
        if not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            if len(_FULL_LENS) >= 64:
                _FULL_LENS.clear()
            _FULL_LENS[key] = lens
    return lens


def _decode_cfgs(device):
    """(BLOCK_N, programs per SM, warps, stages, fused merge[, register cap (0: none)[, PDL]]); the first is
    the default. PDL 1: the merge launched as a programmatic dependent of the split kernel, 2: the split
    kernel too, of whatever ran before (sm_90 on; ignored with the fused merge or an older GPU)."""
    if interpreting():
        return [(64, 2, 4, 1, False), (64, 2, 4, 1, True)]
    tiles = [(64, 2, 4, 3), (64, 4, 4, 3), (128, 2, 4, 3), (32, 4, 4, 4), (64, 8, 4, 2), (128, 4, 8, 3),
             # the sweep of 2026-11-30 (results/kernels.md): best for int8 at B = 8, 16k and bf16 at B = 32, 4k
             (128, 4, 4, 3), (64, 2, 4, 2), (64, 4, 4, 2)]
    # capped at 128 registers (int8: 148-162 uncapped), so that 4 programs of 4 warps fit an SM: int8 Vᵀ at
    # B = 32, 4k 79.5 -> 76.0 us on an H200 (results/kernels.md, 2026-11-30 late)
    capped = [(128, 2, 4, 2, fused, 128) for fused in (False, True)]
    # the split and merge kernels as programmatic dependent launches (PDL 2): bf16 B = 8, 4k 38.3 -> 37.5 us and
    # B = 1, 32k 38.8 -> 37.8 on an H200 (PDL 1, the merge only: 37.9 / 38.4), mixed at B = 32, 4k, no change
    # for int8 (results/kernels.md, session of 2026-11-30 20:38): offered for the usual picks
    pdl = [t + (False, 0, 2) for t in [(64, 4, 4, 2), (64, 2, 4, 3), (64, 2, 4, 2), (64, 8, 4, 2), (128, 2, 4, 3)]]
    pdl += [(128, 2, 4, 2, False, 128, 2)]
    return [t + (fused,) for fused in (False, True) for t in tiles] + capped + (pdl if pdl_ok(device) else [])


def decode_attention(q, k_cache, v_cache, cache_seqlens=None, sm_scale=None, *, block_n=None, num_splits=None,
                     out=None, fused_merge=None, cfg=None):
    """A few query tokens per sequence against a KV cache, split along the cache length.

    Args:
        q: [B, H, D] (one token) or [B, H, T, D] (T small: a speculative verify step), causal within
            the step: the T tokens are the last T valid slots and token t sees slots < len - (T - 1 - t).
        k_cache, v_cache: [B, Hkv, S, D], same dtype as q.
        cache_seqlens: int [B], valid cache length of each sequence, this step's tokens included
            (default: all S).
        block_n, num_splits: keys per inner step and cache slices (default: timed once per shape).
        out: optional result tensor, shaped like q.
        fused_merge: merge the slices in the last program of each KV head (True) or in a second
            launch (False); default: timed once per shape with the tiles.
        cfg: a whole config (BLOCK_N, programs per SM, warps, stages, fused merge[, maxnreg (0: none)[,
            PDL: 1 the merge, 2 the merge and the split kernel as dependent launches]]), untimed.
    Returns q's shape ([B, H, D] or [B, H, T, D]) in q.dtype.
    """
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype or q.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"q and the caches must share one of fp16/bf16, got {q.dtype}, {k_cache.dtype}")
    return _decode(q, k_cache, v_cache, None, None, cache_seqlens, sm_scale, block_n, num_splits, out, fused_merge,
                   cfg)


def decode_attention_int8(q, k_cache, v_cache, k_scale, v_scale, cache_seqlens=None, sm_scale=None, *,
                          block_n=None, num_splits=None, out=None, fused_merge=None, cfg=None, qk_int8=False):
    """decode_attention over an int8 cache (see quantize_kv): K = k_cache * k_scale[..., None].

    Args:
        k_cache, v_cache: int8 [B, Hkv, S, D]; k_scale, v_scale: [B, Hkv, S] (per head, per token).
            Faster: v_cache as the transposed view of an int8 [B, Hkv, D, S] buffer with S a multiple
            of 16 (`v_t.transpose(2, 3)`), so p.v reads slot pairs as adjacent bytes (see
            `_decode_split`'s V_T); any other layout is read as [B, Hkv, S, D] (copied if need be).
        qk_int8: also quantize q per (head, token) to int8 (max|q| / 127, rounded half up) and take
            q.k on int8 tensor cores: no K conversion, one more rounding than the cache's own. 2: q as two
            int8 slices (two MMAs): q's error at most max|q| / 32258 an element, ~127x below the K cache's.
    The products run in fp16 (int8 values are exact there) unless qk_int8; returns q's shape in q.dtype.
    """
    if k_cache.dtype != torch.int8 or v_cache.dtype != torch.int8:
        raise ValueError("k_cache and v_cache must be int8")
    if k_scale.shape != k_cache.shape[:3] or v_scale.shape != v_cache.shape[:3]:
        raise ValueError(f"scales must be [B, Hkv, S] = {tuple(k_cache.shape[:3])}")
    return _decode(q, k_cache, v_cache, k_scale, v_scale, cache_seqlens, sm_scale, block_n, num_splits, out,
                   fused_merge, cfg, qk_int8)


# ----------------------------------------------------------------------------------------------
# transformers integration
# ----------------------------------------------------------------------------------------------
def _hf_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                  sliding_window=None, softcap=None, **kwargs):
    """transformers AttentionInterface function: query [B, H, S, D] -> ([B, S, H, D], None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q_len, kv_len, d = query.shape[2], key.shape[2], query.shape[3]
    usable = (
        attention_mask is None  # a materialised mask means padding, packing or a custom pattern
        and (query.is_cuda or interpreting())
        and query.dtype in (torch.float16, torch.bfloat16)
        and key.dtype == query.dtype and value.shape == key.shape and d <= 256
        and query.shape[1] % key.shape[1] == 0
        and not (dropout > 0.0 and module.training)
        and softcap is None and not kwargs.get("output_attentions", False)
    )
    if not usable:
        # Fallback: SDPA. This covers padding masks (batched generation with left padding),
        # packed sequences, chunked/sliding masks that transformers materialised, dropout and softcap.
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    causal = (is_causal if is_causal is not None else getattr(module, "is_causal", True)) and q_len > 1
    if causal and kv_len > q_len:
        # transformers drops the mask here only for a prefill into an empty static cache, whose extra
        # slots are future positions: slice them off, as its SDPA integration does.
        key, value = key[:, :, :q_len], value[:, :, :q_len]
    window = sliding_window if (causal and sliding_window) else None
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    if q_len == 1 and not grad:
        out = decode_attention(query, key, value, sm_scale=scaling)  # [B, H, 1, D]
    else:
        out = flash_attention(query, key, value, causal=causal, sm_scale=scaling, window=window)
    return out.transpose(1, 2).contiguous(), None


def register_with_transformers(name: str = "effopt_triton") -> str:
    """Register the fused attention with transformers (5.x) as attn_implementation=`name`.

    Registers the function with AttentionInterface and SDPA's mask builder with
    AttentionMaskInterface, so transformers passes mask=None exactly when SDPA would rely on
    is_causal (no padding), and a boolean 4-D mask otherwise, which `_hf_attention` hands to SDPA.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(name, _hf_attention)
    AttentionMaskInterface.register(name, sdpa_mask)
    return name
