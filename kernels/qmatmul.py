"""Weight-only quantized matmul: y = x @ dequant(W).T (+ bias), W4A16 / W8A16 (and W2A16).

Reads effopt's packed layout (kernels/LAYOUT.md): `qweight` uint8 [N, ceil(K*b/8)] holding one
little-endian bit stream of b-bit codes per row, `scales` / `zeros` [N, ceil(K/g)], and
W[n, k] = (q[n, k] - zeros[n, k // g]) * scales[n, k // g].

Three Triton kernels, picked per shape by timing them once (`kernels._tune.choose`):
  * `_qmm_kernel`   tensor-core kernel for every M. It computes out^T = W @ x^T, so the output
                    features fill the MMA's 64-row side and the few tokens of a decode step sit on
                    the narrow side (16 at least). Optional split-K with an in-kernel reduction
                    (the last split of a tile sums the partials), so one launch serves small M.
  * `_gemv_kernel`  CUDA-core kernel for M <= 4 (no padding of M to 16).
  * `_dequant_kernel` + torch.matmul (cuBLAS) for large M where that wins.
Codes become floats through an exponent-bit trick instead of int->float converts:
`0x6400 | q` read as fp16 is 1024 + q (bf16: `0x4300 | q` is 128 + q), exact for small q. The offset
is removed after the MMA together with the zero point: sum_k s (q_k - z) x_k =
s * (sum_k (1024 + q_k) x_k - (1024 + z) * sum_k x_k), so each weight element costs a shift and a
bitwise op before the MMA.
"""
import dataclasses
import math

import torch
import triton
import triton.language as tl

from kernels._tune import choose, interpreting

KERNEL_BITS = (2, 4, 8)  # 3-bit codes straddle bytes: served by dequantize + matmul


# ----------------------------------------------------------------------------------------------
# Pure-torch reference (CPU or GPU). Tests compare the kernels against this.
# ----------------------------------------------------------------------------------------------
def unpack_codes(qweight: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Unpack the little-endian b-bit codes of every row: uint8 [N, ceil(K*b/8)] -> int32 [N, K]."""
    k = torch.arange(in_features, device=qweight.device)
    byte, shift = (k * bits) // 8, (k * bits) % 8
    q = torch.nn.functional.pad(qweight.to(torch.int32), (0, 1))  # a zero byte for straddling codes
    window = q[:, byte] | (q[:, byte + 1] << 8)
    return (window >> shift) & ((1 << bits) - 1)


def dequantize(qweight, scales, zeros, bits: int, group_size: int, in_features: int, dtype=None):
    """Dense weight [N, K] from the packed layout, in `dtype` (default: scales.dtype). Pure torch.

    Args:
        group_size: g; -1, 0 or >= in_features means per-channel (one group per row).
    """
    _check_layout(qweight, scales, zeros, bits, group_size, in_features)
    g = _norm_group(group_size, in_features)
    codes = unpack_codes(qweight, bits, in_features).float()
    gidx = torch.arange(in_features, device=qweight.device) // g
    w = (codes - zeros[:, gidx].float()) * scales[:, gidx].float()
    return w.to(dtype or scales.dtype)


def _norm_group(group_size: int, in_features: int) -> int:
    return in_features if group_size <= 0 or group_size >= in_features else group_size


def _check_layout(qweight, scales, zeros, bits, group_size, in_features):
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"bits must be 2, 3, 4 or 8, got {bits}")
    if qweight.dtype != torch.uint8 or qweight.dim() != 2:
        raise ValueError(f"qweight must be a 2-D uint8 tensor, got {qweight.dtype} {tuple(qweight.shape)}")
    n = qweight.shape[0]
    groups = -(-in_features // _norm_group(group_size, in_features))
    if qweight.shape[1] != -(-in_features * bits // 8):
        raise ValueError(f"qweight has {qweight.shape[1]} bytes per row, expected ceil({in_features}*{bits}/8)")
    for name, t in (("scales", scales), ("zeros", zeros)):
        if tuple(t.shape) != (n, groups):
            raise ValueError(f"{name} must be [{n}, {groups}], got {tuple(t.shape)}")


# ----------------------------------------------------------------------------------------------
# Prepared weights: a cached device-friendly copy (scales/zeros stored group-major so the kernels
# read the scales of one group for BLOCK_N consecutive rows as one contiguous load).
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class QuantWeight:
    """Packed weight ready for the kernels; `quant_matmul(x, prepared)` accepts it."""

    qweight: torch.Tensor  # uint8 [N, ceil(K*b/8)], contiguous
    scales: torch.Tensor  # [N, G] view (any strides)
    zeros: torch.Tensor  # [N, G] view
    bits: int
    group_size: int  # normalised: K for per-channel
    in_features: int

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    @property
    def row_bytes(self) -> int:
        return self.qweight.shape[1]


def prepare_weight(qweight, scales, zeros, bits: int, group_size: int, in_features: int) -> QuantWeight:
    """Re-lay out the packed tensors once for speed (group-major scales/zeros); cache the result."""
    _check_layout(qweight, scales, zeros, bits, group_size, in_features)
    return QuantWeight(
        qweight.contiguous(),
        scales.t().contiguous().t(),
        zeros.t().contiguous().t(),
        bits,
        _norm_group(group_size, in_features),
        in_features,
    )


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _codes_to_float(code, DQ: tl.constexpr):
    """int32 codes -> OFFSET + code as a float without an int->float convert.

    DQ 1: fp16, OFFSET 1024 (0x6400 | q). DQ 2: bf16, OFFSET 128 (0x4300 | q, q < 128).
    DQ 0: fp32, OFFSET 0 (2**23 + q minus 2**23).
    """
    if DQ == 1:
        return (code.to(tl.int16) | 0x6400).to(tl.float16, bitcast=True)
    elif DQ == 2:
        return (code.to(tl.int16) | 0x4300).to(tl.bfloat16, bitcast=True)
    else:
        return (code.to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _mma(a, b, acc, UPCAST: tl.constexpr):
    # The CPU interpreter of triton 3.9 mis-computes bf16 dots (and bf16 arithmetic): UPCAST is
    # set there and the operands go in as fp32.
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    return tl.dot(a, b, acc)


@triton.jit
def _store_out(acc, out_ptr, bias_ptr, offs_n, offs_m, N, M, stride_om, HAS_BIAS: tl.constexpr):
    """acc is [BLOCK_N, BLOCK_M] (features x tokens); out is [M, N]."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[:, None]
    ptrs = out_ptr + offs_m[None, :] * stride_om + offs_n[:, None]
    tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=(offs_n < N)[:, None] & (offs_m < M)[None, :])


@triton.jit
def _finish(acc, out_ptr, bias_ptr, ws_ptr, lock_ptr, tile, pid_k, offs_n, offs_m, N, M, stride_om,
            HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    """Write the tile; with split-K, park the partial and let the last split to arrive sum them."""
    if SPLIT_K == 1:
        _store_out(acc, out_ptr, bias_ptr, offs_n, offs_m, N, M, stride_om, HAS_BIAS)
    else:
        offs = tl.arange(0, BLOCK_N)[:, None] * BLOCK_M + tl.arange(0, BLOCK_M)[None, :]
        ws_tile = ws_ptr + tile * (SPLIT_K * BLOCK_N * BLOCK_M)
        tl.store(ws_tile + pid_k * (BLOCK_N * BLOCK_M) + offs, acc)
        tl.debug_barrier()  # every thread's partial is written before the arrival is counted
        arrived = tl.atomic_add(lock_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:
            total = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
            for s in tl.static_range(SPLIT_K):  # .cg: read from L2, never a stale L1 line
                total += tl.load(ws_tile + s * (BLOCK_N * BLOCK_M) + offs, cache_modifier=".cg")
            _store_out(total, out_ptr, bias_ptr, offs_n, offs_m, N, M, stride_om, HAS_BIAS)
            tl.atomic_xchg(lock_ptr + tile, 0)  # re-arm the counter for the next launch


@triton.jit
def _qmm_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, ws_ptr, lock_ptr,
    M, N, K, KB, GROUP,
    stride_xm, stride_qn, stride_sn, stride_sg, stride_om,
    BITS: tl.constexpr,  # 2, 4 or 8
    GROUP_MODE: tl.constexpr,  # 0: scales per element, 1: one group per K-block, 2: one group per row
    DQ: tl.constexpr,  # code->float trick, see _codes_to_float
    POST_ZERO: tl.constexpr,  # apply scale/zero to the MMA result (needs GROUP_MODE 1 or 2)
    X_SPLIT: tl.constexpr,  # BITS == 4 only: load x contiguously and de-interleave in registers
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KB: tl.constexpr, SPLIT_K: tl.constexpr,
    STEP_BLOCKS: tl.constexpr,  # K-blocks per loop trip (unrolled), e.g. two 128-code groups
):
    """out[M, N] = x[M, K] @ W[N, K]^T computed as acc[BLOCK_N, BLOCK_M] += W_tile @ x_tile^T.

    One program owns BLOCK_N output features x BLOCK_M tokens and the K-blocks of split pid_k.
    Per K-block it reads BLOCK_KB bytes of every row (CPB = 8 // BITS codes per byte); code c of
    byte j is k = j * CPB + c, so for each c the matching x columns are a stride-CPB slice.
    """
    CPB: tl.constexpr = 8 // BITS
    CODE_MASK: tl.constexpr = (1 << BITS) - 1
    OFFSET: tl.constexpr = 1024.0 if DQ == 1 else (128.0 if DQ == 2 else 0.0)
    dt = x_ptr.dtype.element_ty

    pid, pid_k = tl.program_id(0), tl.program_id(1)
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = pid // num_n, pid % num_n
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_ok, m_ok = offs_n < N, offs_m < M
    offs_j = tl.arange(0, BLOCK_KB)

    n_iters = tl.cdiv(KB, BLOCK_KB * STEP_BLOCKS)
    per_split = tl.cdiv(n_iters, SPLIT_K)
    it0 = pid_k * per_split
    it1 = tl.minimum(it0 + per_split, n_iters)

    acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    xsum = tl.zeros((BLOCK_M,), tl.float32)
    s = tl.load(s_ptr + offs_n * stride_sn, mask=n_ok, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + offs_n * stride_sn, mask=n_ok, other=0.0).to(tl.float32)
    for step in range(it0, it1):
        for sub in tl.static_range(STEP_BLOCKS):  # unrolled: STEP_BLOCKS K-blocks' loads in flight
            it = step * STEP_BLOCKS + sub
            kb = it * BLOCK_KB + offs_j
            wb = tl.load(qw_ptr + offs_n[:, None] * stride_qn + kb[None, :],
                         mask=n_ok[:, None] & (kb < KB)[None, :], other=0)
            if GROUP_MODE == 1:  # the whole K-block lies in group g
                # an unrolled trip may run past the last group: clamp (its codes and x are masked)
                g = tl.minimum((it * BLOCK_KB * CPB) // GROUP, tl.cdiv(K, GROUP) - 1)
                s = tl.load(s_ptr + offs_n * stride_sn + g * stride_sg, mask=n_ok, other=0.0).to(tl.float32)
                z = tl.load(z_ptr + offs_n * stride_sn + g * stride_sg, mask=n_ok, other=0.0).to(tl.float32)
            part = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
            if X_SPLIT:  # 4-bit: one contiguous x load, split into the even / odd columns in registers
                kk = it * BLOCK_KB * 2 + tl.arange(0, 2 * BLOCK_KB)
                x_full = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :],
                                 mask=m_ok[:, None] & (kk < K)[None, :], other=0.0)
                x_even, x_odd = tl.split(tl.reshape(x_full, (BLOCK_M, BLOCK_KB, 2)))
            for c in tl.static_range(CPB):
                code = ((wb >> (c * BITS)) & CODE_MASK).to(tl.int16)
                k_idx = kb * CPB + c
                if X_SPLIT:
                    xt = tl.trans(x_even) if c == 0 else tl.trans(x_odd)
                else:  # column k_idx = j * CPB + c of x: a stride-CPB slice
                    xt = tl.load(x_ptr + offs_m[None, :] * stride_xm + k_idx[:, None],
                                 mask=(k_idx < K)[:, None] & m_ok[None, :], other=0.0)
                if POST_ZERO:
                    w = _codes_to_float(code, DQ).to(dt)  # OFFSET + q, exact
                    xsum += tl.sum(xt.to(tl.float32), axis=0)
                    if GROUP_MODE == 1:
                        part = _mma(w, xt, part, UPCAST)
                    else:
                        acc = _mma(w, xt, acc, UPCAST)
                else:
                    if GROUP_MODE == 0:  # groups smaller than the K-block: gather per element
                        gi = (k_idx // GROUP)[None, :]
                        ok = n_ok[:, None] & (k_idx < K)[None, :]
                        se = tl.load(s_ptr + offs_n[:, None] * stride_sn + gi * stride_sg, mask=ok, other=0.0)
                        ze = tl.load(z_ptr + offs_n[:, None] * stride_sn + gi * stride_sg, mask=ok, other=0.0)
                        w = ((_codes_to_float(code, 0) - ze.to(tl.float32)) * se.to(tl.float32)).to(dt)
                    elif DQ == 0:
                        w = ((_codes_to_float(code, 0) - z[:, None]) * s[:, None]).to(dt)
                    elif UPCAST:  # the interpreter's bf16 arithmetic is broken; fp32 rounds the same
                        w = ((_codes_to_float(code, DQ).to(tl.float32) - (z + OFFSET)[:, None]) * s[:, None]).to(dt)
                    else:  # (OFFSET + q) - (OFFSET + z) is exact in 16 bits; one rounding for * s
                        w = (_codes_to_float(code, DQ) - (z + OFFSET).to(dt)[:, None]) * s.to(dt)[:, None]
                    acc = _mma(w, xt, acc, UPCAST)
            if POST_ZERO and GROUP_MODE == 1:
                acc += s[:, None] * (part - (z + OFFSET)[:, None] * xsum[None, :])
                xsum = tl.zeros((BLOCK_M,), tl.float32)
    if POST_ZERO and GROUP_MODE == 2:
        acc = s[:, None] * (acc - (z + OFFSET)[:, None] * xsum[None, :])
    _finish(acc, out_ptr, bias_ptr, ws_ptr, lock_ptr, pid, pid_k, offs_n, offs_m, N, M, stride_om,
            HAS_BIAS, SPLIT_K, BLOCK_N, BLOCK_M)


@triton.jit
def _gemv_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, ws_ptr, lock_ptr,
    M, N, K, KB, GROUP,
    stride_xm, stride_qn, stride_sn, stride_sg, stride_om,
    BITS: tl.constexpr, GROUP_MODE: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KB: tl.constexpr, SPLIT_K: tl.constexpr,
):
    """CUDA-core matrix-vector product for M <= BLOCK_M <= 4 tokens, fp32 throughout.

    Per K-block: part[m, n] = sum_j q[n, j] x[m, j] and xs[m] = sum_j x[m, j], then
    acc += s[n] (part - z[n] xs) (GROUP_MODE 1: the block lies in one group; 2: one group per row).
    """
    CPB: tl.constexpr = 8 // BITS
    CODE_MASK: tl.constexpr = (1 << BITS) - 1
    pid, pid_k = tl.program_id(0), tl.program_id(1)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    n_ok, m_ok = offs_n < N, offs_m < M
    offs_j = tl.arange(0, BLOCK_KB)
    n_iters = tl.cdiv(KB, BLOCK_KB)
    per_split = tl.cdiv(n_iters, SPLIT_K)
    it0 = pid_k * per_split
    it1 = tl.minimum(it0 + per_split, n_iters)

    acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    xsum = tl.zeros((BLOCK_M,), tl.float32)
    s = tl.load(s_ptr + offs_n * stride_sn, mask=n_ok, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + offs_n * stride_sn, mask=n_ok, other=0.0).to(tl.float32)
    for it in range(it0, it1):
        kb = it * BLOCK_KB + offs_j
        wb = tl.load(qw_ptr + offs_n[:, None] * stride_qn + kb[None, :],
                     mask=n_ok[:, None] & (kb < KB)[None, :], other=0).to(tl.int32)
        part = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
        xs = tl.zeros((BLOCK_M,), tl.float32)
        for c in tl.static_range(CPB):
            q = _codes_to_float((wb >> (c * BITS)) & CODE_MASK, 0)  # [BLOCK_N, BLOCK_KB] fp32
            k_idx = kb * CPB + c
            xv = tl.load(x_ptr + offs_m[:, None] * stride_xm + k_idx[None, :],
                         mask=m_ok[:, None] & (k_idx < K)[None, :], other=0.0).to(tl.float32)
            part += tl.sum(q[:, None, :] * xv[None, :, :], axis=2)
            xs += tl.sum(xv, axis=1)
        if GROUP_MODE == 1:
            g = (it * BLOCK_KB * CPB) // GROUP
            s = tl.load(s_ptr + offs_n * stride_sn + g * stride_sg, mask=n_ok, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + offs_n * stride_sn + g * stride_sg, mask=n_ok, other=0.0).to(tl.float32)
            acc += s[:, None] * (part - z[:, None] * xs[None, :])
        else:
            acc += part
            xsum += xs
    if GROUP_MODE == 2:
        acc = s[:, None] * (acc - z[:, None] * xsum[None, :])
    _finish(acc, out_ptr, bias_ptr, ws_ptr, lock_ptr, pid, pid_k, offs_n, offs_m, N, M, stride_om,
            HAS_BIAS, SPLIT_K, BLOCK_N, BLOCK_M)


@triton.jit
def _dequant_kernel(qw_ptr, s_ptr, z_ptr, w_ptr, N, K, KB, GROUP,
                    stride_qn, stride_sn, stride_sg, stride_wn,
                    BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """W[n, k] = (q - z) * s for any bits <= 8 (a code may straddle two bytes when 8 % BITS != 0)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    ok = (offs_n < N)[:, None] & (offs_k < K)[None, :]
    byte = (offs_k * BITS) // 8
    shift = (offs_k * BITS) % 8
    row = qw_ptr + offs_n[:, None] * stride_qn
    word = tl.load(row + byte[None, :], mask=ok, other=0).to(tl.int32)
    if 8 % BITS != 0:
        hi_ok = ok & (byte + 1 < KB)[None, :]
        word = word | (tl.load(row + byte[None, :] + 1, mask=hi_ok, other=0).to(tl.int32) << 8)
    q = ((word >> shift[None, :]) & ((1 << BITS) - 1)).to(tl.float32)
    sg = offs_n[:, None] * stride_sn + (offs_k // GROUP)[None, :] * stride_sg
    s = tl.load(s_ptr + sg, mask=ok, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + sg, mask=ok, other=0.0).to(tl.float32)
    w = (q - z) * s
    tl.store(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :], w.to(w_ptr.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Cfg:
    """One way to run the product: kind 'mma' | 'gemv' | 'dequant' and its tile sizes."""

    kind: str
    block_m: int = 16
    block_n: int = 64
    block_kb: int = 64  # bytes of a row per K-step
    split_k: int = 1
    step_blocks: int = 1  # K-blocks per (unrolled) loop trip of the mma kernel
    post_zero: bool = True
    x_split: bool = False
    warps: int = 4
    stages: int = 3


_SCRATCH: dict = {}
DEBUG_POISON = False  # tests: fill the split-K workspace with NaN before every launch


def _scratch(device, ws_elems: int, tiles: int):
    """Per-device fp32 workspace and int32 arrival counters for split-K (counters self-reset)."""
    ws, lock = _SCRATCH.get(device, (None, None))
    if ws is None or ws.numel() < ws_elems:
        ws = torch.empty(max(ws_elems, 1 << 16), device=device, dtype=torch.float32)
    if lock is None or lock.numel() < tiles:
        lock = torch.zeros(max(tiles, 4096), device=device, dtype=torch.int32)
    _SCRATCH[device] = (ws, lock)
    if DEBUG_POISON:
        ws.fill_(float("nan"))
    return ws, lock


def _group_mode(w: QuantWeight, block_kb: int) -> int:
    codes = block_kb * 8 // w.bits
    if w.group_size >= w.in_features:
        return 2
    return 1 if w.group_size % codes == 0 else 0


def _dq_mode(dtype, bits) -> int:
    if dtype == torch.float16:
        return 1
    return 2 if bits <= 7 else 0


def _launch(cfg: Cfg, x2, w: QuantWeight, bias, out):
    """Run one configuration: x2 [M, K] (row stride any, unit column stride) -> out [M, N]."""
    M, K = x2.shape
    N = w.out_features
    has_bias = bias is not None
    bias_arg = bias if has_bias else out
    if cfg.kind == "dequant":
        dense = torch.empty(N, K, device=x2.device, dtype=x2.dtype)
        grid = (triton.cdiv(N, 32), triton.cdiv(K, 128))
        _dequant_kernel[grid](w.qweight, w.scales, w.zeros, dense, N, K, w.row_bytes, w.group_size,
                              w.qweight.stride(0), w.scales.stride(0), w.scales.stride(1), dense.stride(0),
                              BITS=w.bits, BLOCK_N=32, BLOCK_K=128, num_warps=4)
        torch.matmul(x2, dense.t(), out=out)
        if has_bias:
            out += bias.to(out.dtype)
        return out
    mode = _group_mode(w, cfg.block_kb)
    block_m = triton.next_power_of_2(M) if cfg.kind == "gemv" else cfg.block_m
    tiles = triton.cdiv(M, block_m) * triton.cdiv(N, cfg.block_n)
    ws, lock = _scratch(x2.device, tiles * cfg.split_k * block_m * cfg.block_n, tiles)
    common = (x2, w.qweight, w.scales, w.zeros, bias_arg, out, ws, lock, M, N, K, w.row_bytes,
              w.group_size, x2.stride(0), w.qweight.stride(0), w.scales.stride(0), w.scales.stride(1),
              out.stride(0))
    if cfg.kind == "gemv":
        if mode == 0:
            raise ValueError("gemv needs K-blocks that do not straddle groups")
        grid = (triton.cdiv(N, cfg.block_n), cfg.split_k)
        _gemv_kernel[grid](*common, BITS=w.bits, GROUP_MODE=mode, HAS_BIAS=has_bias,
                           BLOCK_M=block_m, BLOCK_N=cfg.block_n,
                           BLOCK_KB=cfg.block_kb, SPLIT_K=cfg.split_k,
                           num_warps=cfg.warps, num_stages=cfg.stages)
        return out
    grid = (tiles, cfg.split_k)
    _qmm_kernel[grid](*common, BITS=w.bits, GROUP_MODE=mode, DQ=_dq_mode(x2.dtype, w.bits),
                      POST_ZERO=cfg.post_zero and mode != 0, X_SPLIT=cfg.x_split and w.bits == 4,
                      HAS_BIAS=has_bias,
                      UPCAST=not x2.is_cuda, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                      BLOCK_KB=cfg.block_kb, SPLIT_K=cfg.split_k, STEP_BLOCKS=cfg.step_blocks,
                      num_warps=cfg.warps, num_stages=cfg.stages)
    return out


# ----------------------------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------------------------
def _sms(device) -> int:
    """Multiprocessor count (132 on an H200); only shapes the split-K candidates."""
    if device.type != "cuda":
        return 132
    return torch.cuda.get_device_properties(device).multi_processor_count


def _uniform_kbs(w: QuantWeight, hi: int) -> list:
    """Bytes-per-row K-steps (powers of two, >= 16 for the MMA) whose K-blocks never straddle groups."""
    cpb = 8 // w.bits
    opts = [kb for kb in (16, 32, 64, 128, 256) if kb <= hi]
    if w.group_size < w.in_features:
        opts = [kb for kb in opts if w.group_size % (kb * cpb) == 0]
    return opts


def _splits(tiles: int, iters: int, target: int) -> list:
    """Split-K factors bringing the number of programs near `target`, each split >= 2 K-steps."""
    ok = [s for s in (1, 2, 4, 8, 16, 32) if s == 1 or iters // s >= 2]
    ok.sort(key=lambda s: abs(math.log2(tiles * s / target)))
    return sorted(ok[:2])


def candidates(M: int, w: QuantWeight, dtype) -> list:
    """Launch configs worth timing for M tokens; the first is the untimed default."""
    N = w.out_features
    if w.bits not in KERNEL_BITS or dtype not in (torch.float16, torch.bfloat16):
        return [Cfg("dequant")]
    sms = _sms(w.qweight.device)
    if M <= 64:  # memory-bound: split K until ~3 programs per SM, zero/scale after the MMA
        kbs = _uniform_kbs(w, 128)[-2:] or [32]
        bm = max(16, triton.next_power_of_2(M))
        cands = []
        for bn in (64, 128):
            for kb, step in [(kb, 1) for kb in kbs[::-1]] + [(kbs[-1], 2)]:
                tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
                for sk in _splits(tiles, triton.cdiv(w.row_bytes, kb * step), 3 * sms):
                    cands.append(Cfg("mma", bm, bn, kb, sk, step, x_split=True, warps=4, stages=4 if step == 1 else 3))
        if M <= 4:
            for bn in (16, 32):
                kb = (_uniform_kbs(w, 256) or [0])[-1]
                if kb:
                    sk = _splits(triton.cdiv(N, bn), triton.cdiv(w.row_bytes, kb), 4 * sms)[0]
                    cands.append(Cfg("gemv", M, bn, kb, sk, warps=4, stages=3))
        if M > 16:
            cands.append(Cfg("dequant"))
        return cands
    kb = min(64, (_uniform_kbs(w, 128) or [32])[-1])  # x tile of 128 x 2*kb fp16 per stage
    return [Cfg("mma", 128, 128, kb, 1, post_zero=False, x_split=True, warps=8, stages=3),
            Cfg("mma", 128, 128, max(16, kb // 2), 1, post_zero=False, x_split=True, warps=8, stages=4),
            Cfg("mma", 64, 128, kb, 1, post_zero=False, x_split=True, warps=4, stages=4),
            Cfg("mma", 128, 64, kb, 1, post_zero=False, x_split=True, warps=4, stages=4),
            Cfg("dequant")]


def _as_weight(qweight, scales, zeros, bits, group_size, in_features) -> QuantWeight:
    if isinstance(qweight, QuantWeight):
        return qweight
    if None in (scales, zeros, bits, group_size, in_features):
        raise ValueError("pass scales, zeros, bits, group_size and in_features, or a prepare_weight() result")
    _check_layout(qweight, scales, zeros, bits, group_size, in_features)
    return QuantWeight(qweight.contiguous(), scales, zeros, bits, _norm_group(group_size, in_features), in_features)


def quant_matmul(x, qweight, scales=None, zeros=None, bits=None, group_size=None, in_features=None,
                 bias=None, *, cfg: Cfg = None, out=None):
    """y = x @ dequantize(W).T + bias for x [..., K] fp16/bf16; returns [..., N] in x.dtype.

    Args:
        qweight: uint8 [N, ceil(K*bits/8)] (LAYOUT.md), or a `prepare_weight` result (then the
            next five arguments may be omitted).
        group_size: g, or -1 / K for per-channel.
        cfg: force one launch config (tests, benchmarks); default: the fastest for this shape,
            timed once on first use (see `candidates`).
        out: optional contiguous [..., N] result tensor in x.dtype.
    On CPU this is dequantize + torch.matmul, unless `cfg` is given under TRITON_INTERPRET=1
    (the tests run the kernels that way).
    """
    w = _as_weight(qweight, scales, zeros, bits, group_size, in_features)
    K, N = w.in_features, w.out_features
    if x.shape[-1] != K:
        raise ValueError(f"x has {x.shape[-1]} features, the weight expects {K}")
    if x.device != w.qweight.device:
        raise ValueError(f"x is on {x.device}, the weight on {w.qweight.device}")
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"bias must be [{N}], got {tuple(bias.shape)}")
    if out is not None and (out.shape != (*x.shape[:-1], N) or out.dtype != x.dtype or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous {x.dtype} tensor of shape {(*x.shape[:-1], N)}")
    use_kernels = x.is_cuda or (interpreting() and cfg is not None)
    if not use_kernels or x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        dense = dequantize(w.qweight, w.scales, w.zeros, w.bits, w.group_size, K, dtype=x.dtype)
        y = torch.nn.functional.linear(x, dense, bias)
        return y if out is None else out.copy_(y)
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    out2 = torch.empty(M, N, device=x.device, dtype=x.dtype) if out is None else out.view(M, N)
    if M > 0:
        if cfg is None:
            key = (x.device, M if M <= 4 else triton.next_power_of_2(M), N, K, w.bits, w.group_size,
                   x.dtype, w.scales.stride(), bias is not None)
            cfg = choose(key, candidates(M, w, x.dtype), lambda c: _launch(c, x2, w, bias, out2))
        _launch(cfg, x2, w, bias, out2)
    return out2.view(*x.shape[:-1], N)
