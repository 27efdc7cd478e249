"""W8A8 for SmoothQuant layers: int8 activations (per token, dynamic) x int8 weights (per channel).

y[m, n] = (sum_k xq[m, k] wq[n, k]) * xs[m] * ws[n] + bias[n], the sum exact in int32
(|xq|, |wq| <= 127, so K up to 133 000 cannot overflow).

  * `quantize_rows`      one program per row: absmax, scale = max(absmax, 1e-8) * fp32(1/127),
                         codes = clamp(round_half_even(x / scale), -127, 127). The same operations
                         and roundings as effopt's `quantize_per_token`, so the codes are identical.
  * `int8_matmul_scaled` tensor-core int8 x int8 -> int32 tiles, rescale + bias + cast fused in the
                         epilogue. For few tokens (decode) it computes out^T = W @ x^T so the output
                         features fill the MMA's wide side and the tokens sit on the 16-wide one.
                         The weight may be int8, or uint8 codes with zero point 128 (kernels/LAYOUT.md,
                         8-bit symmetric, as ActQuantLinear stores it): those are turned into int8 in
                         registers (q ^ 0x80 read as int8 is q - 128), so no int8 copy is kept.
  * `w8a8_linear`        both, for x [..., K] in fp16 / bf16 / fp32.
Tile configs are picked per shape by timing them once (`kernels._tune.choose`). On CPU the
functions fall back to torch, unless TRITON_INTERPRET=1 (then the kernels run interpreted).
"""
import dataclasses

import torch
import triton
import triton.language as tl

from kernels._tune import choose, interpreting

QMAX = 127
INV_QMAX = 1.0 / QMAX  # scales are absmax * fp32(1/127) (see quantize_rows_ref)
MIN_ABSMAX = 1e-8  # all-zero rows: scale 1e-8/127, codes 0
# the same as constexprs for the kernels; _ROUND = 1.5 * 2^23: (v + C) - C rounds |v| < 2^22 to an
# integer, ties to even, as torch.round does
_QMAX, _INV_QMAX, _MIN_ABSMAX, _ROUND = (tl.constexpr(v) for v in (QMAX, INV_QMAX, MIN_ABSMAX, 12582912.0))


# ----------------------------------------------------------------------------------------------
# Pure-torch reference (CPU fallback; the tests compare the kernels against it)
# ----------------------------------------------------------------------------------------------
def quantize_rows_ref(x: torch.Tensor):
    """(int8 codes [M, K], float32 scales [M, 1]) with the kernel's arithmetic, in torch."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp_min(MIN_ABSMAX) * INV_QMAX
    return torch.clamp(torch.round(xf / scale), -QMAX, QMAX).to(torch.int8), scale


def int8_weight(w: torch.Tensor) -> torch.Tensor:
    """Signed int8 view of a weight given as int8, or as uint8 codes with zero point 128."""
    return w if w.dtype == torch.int8 else (w.to(torch.int16) - 128).to(torch.int8)


def int8_matmul_scaled_ref(xq, xs, w, ws, bias=None, out_dtype=torch.float32):
    """What `int8_matmul_scaled` computes, in torch (the integer product in float64: exact)."""
    acc = (xq.double() @ int8_weight(w).double().t()).to(torch.int32)
    y = acc.float() * xs.reshape(-1, 1).float() * ws.reshape(1, -1).float()
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, stride_qm,
                          BLOCK_K: tl.constexpr, ONE_PASS: tl.constexpr):
    """Row pid: absmax over K, then codes. ONE_PASS (K <= BLOCK_K) keeps the row in registers;
    otherwise the row is read twice (the second read mostly from L1/L2)."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_K)
    x_row = x_ptr + row * stride_xm
    if ONE_PASS:
        xv = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
        amax = tl.max(tl.abs(xv), axis=0)
    else:
        amax = tl.zeros((BLOCK_K,), tl.float32)
        for k0 in range(0, K, BLOCK_K):
            v = tl.load(x_row + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(v))
        amax = tl.max(amax, axis=0)
    scale = tl.maximum(amax, _MIN_ABSMAX) * _INV_QMAX
    tl.store(s_ptr + row, scale)
    # IEEE division (plain `/` may lower to an approximate one) and ties-to-even rounding, as
    # torch.round(x / scale): any other rounding would give different codes for some inputs
    if ONE_PASS:
        v = tl.math.div_rn(xv, tl.broadcast_to(scale, (BLOCK_K,)))
        code = tl.minimum(tl.maximum((v + _ROUND) - _ROUND, -_QMAX), _QMAX)
        tl.store(q_ptr + row * stride_qm + offs, code.to(tl.int8), mask=offs < K)
    else:
        for k0 in range(0, K, BLOCK_K):
            xv = tl.load(x_row + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
            v = tl.math.div_rn(xv, tl.broadcast_to(scale, (BLOCK_K,)))
            code = tl.minimum(tl.maximum((v + _ROUND) - _ROUND, -_QMAX), _QMAX)
            tl.store(q_ptr + row * stride_qm + k0 + offs, code.to(tl.int8), mask=k0 + offs < K)


@triton.jit
def _w8a8_kernel(
    x_ptr, xs_ptr, w_ptr, ws_ptr, bias_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_wn, stride_om,
    W_U8: tl.constexpr,  # w holds uint8 codes with zero point 128: flip the sign bit in registers
    SWAP: tl.constexpr,  # acc is [BLOCK_N, BLOCK_M] = W @ x^T (few tokens), else [BLOCK_M, BLOCK_N]
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no masks in the loop
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """out[M, N] = (xq @ wq^T) * xs[:, None] * ws[None, :] + bias, one output tile per program.

    Rows past M / N are clamped to the last valid one rather than masked (their results are
    dropped at the store), so only K needs a mask, and only when BLOCK_K does not divide it.
    """
    pid = tl.program_id(0)
    num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    # GROUP_M row-tiles side by side walk the N tiles together: their weight tiles are shared in L2
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_m = tl.minimum(offs_m, M - 1).to(tl.int64)
    rows_n = tl.minimum(offs_n, N - 1).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows_m[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + rows_n[:, None] * stride_wn + offs_k[None, :]
    W_PAD: tl.constexpr = 128 if W_U8 else 0  # a masked weight code that reads as 0

    if SWAP:
        acc = tl.zeros((BLOCK_N, BLOCK_M), tl.int32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.int32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(x_ptrs)
            b = tl.load(w_ptrs)
        else:
            k_ok = (offs_k < K - k0)[None, :]
            a = tl.load(x_ptrs, mask=k_ok, other=0)
            b = tl.load(w_ptrs, mask=k_ok, other=W_PAD)
        if W_U8:
            b = (b ^ 0x80).to(tl.int8, bitcast=True)
        if SWAP:
            acc = tl.dot(b, tl.trans(a), acc, out_dtype=tl.int32)
        else:
            acc = tl.dot(a, tl.trans(b), acc, out_dtype=tl.int32)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    xs = tl.load(xs_ptr + rows_m)
    ws = tl.load(ws_ptr + rows_n).to(tl.float32)
    if SWAP:  # (acc * xs) * ws + bias: the order of the torch path
        y = acc.to(tl.float32) * xs[None, :] * ws[:, None]
        if HAS_BIAS:
            y += tl.load(bias_ptr + rows_n).to(tl.float32)[:, None]
        ptrs = out_ptr + offs_m[None, :] * stride_om + offs_n[:, None]
        mask = (offs_m < M)[None, :] & (offs_n < N)[:, None]
    else:
        y = acc.to(tl.float32) * xs[:, None] * ws[None, :]
        if HAS_BIAS:
            y += tl.load(bias_ptr + rows_n).to(tl.float32)[None, :]
        ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
        mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    tl.store(ptrs, y.to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Launch configs
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Cfg:
    """Tile of one program: block_m tokens x block_n features, block_k int8 codes per K-step."""

    block_m: int
    block_n: int
    block_k: int
    swap: bool = False  # compute out^T tiles (tokens on the MMA's narrow side)
    warps: int = 4
    stages: int = 3
    group_m: int = 8


SMALL_M = 16  # decode: the swapped (out^T) tiles


def candidates(M: int, N: int, K: int) -> list:
    """Launch configs worth timing for M tokens; the first is the untimed default.

    Few tokens: the weight stream is the cost, so the tiles are narrow in N to give every SM
    programs to run (N = 4096 with 32 features a tile is 128 programs for an H200's 132 SMs) and
    long in K (256 bytes a row per step). Many tokens: the usual compute-bound square tiles.
    `choose` times them per shape; results/kernels.md's W8A8 table names the pick (H200).
    """
    if interpreting():  # the CPU interpreter: one small tile, either orientation
        return [Cfg(16, 32, 32, swap=M <= SMALL_M, stages=1)]
    if M <= SMALL_M:
        return [Cfg(16, 32, 256, swap=True, warps=4, stages=4),
                Cfg(16, 64, 256, swap=True, warps=4, stages=4),
                Cfg(16, 16, 512, swap=True, warps=4, stages=3),
                Cfg(16, 64, 128, swap=True, warps=4, stages=5),
                Cfg(16, 128, 128, swap=True, warps=4, stages=4)]
    if M <= 64:
        bm = triton.next_power_of_2(M)
        return [Cfg(bm, 64, 256, swap=True, warps=4, stages=4),
                Cfg(bm, 128, 128, swap=True, warps=4, stages=4),
                Cfg(bm, 32, 256, swap=True, warps=4, stages=4),
                Cfg(64, 64, 256, warps=4, stages=4),
                Cfg(64, 128, 128, warps=4, stages=4)]
    return [Cfg(128, 128, 128, warps=8, stages=3),
            Cfg(128, 256, 128, warps=8, stages=3),
            Cfg(256, 128, 128, warps=8, stages=3),
            Cfg(64, 128, 128, warps=4, stages=4),
            Cfg(128, 128, 64, warps=4, stages=5),
            Cfg(64, 64, 256, warps=4, stages=4)]


def _launch(cfg: Cfg, xq, xs, w, ws, bias, out):
    M, K = xq.shape
    N = w.shape[0]
    grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n),)
    _w8a8_kernel[grid](
        xq, xs, w, ws, bias if bias is not None else out, out,
        M, N, K, xq.stride(0), w.stride(0), out.stride(0),
        W_U8=w.dtype == torch.uint8, SWAP=cfg.swap, EVEN_K=K % cfg.block_k == 0, HAS_BIAS=bias is not None,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        num_warps=cfg.warps, num_stages=cfg.stages)
    return out


# ----------------------------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------------------------
def _use_kernels(t: torch.Tensor) -> bool:
    return t.is_cuda or interpreting()


def quantize_rows(x: torch.Tensor, *, out=None):
    """Per-row symmetric int8 quantization of x [M, K] (fp16 / bf16 / fp32).

    Returns (codes int8 [M, K], scales float32 [M, 1]); `out` may give that pair (contiguous) to
    write into. The codes equal `quantize_rows_ref`'s (and effopt's `quantize_per_token`'s) exactly.
    """
    if x.dim() != 2:
        raise ValueError(f"x must be [M, K], got {tuple(x.shape)}")
    M, K = x.shape
    if out is None:
        q = torch.empty(M, K, device=x.device, dtype=torch.int8)
        s = torch.empty(M, 1, device=x.device, dtype=torch.float32)
    else:
        q, s = out
        if q.shape != (M, K) or q.dtype != torch.int8 or s.shape != (M, 1) or s.dtype != torch.float32 \
                or not (q.is_contiguous() and s.is_contiguous()):
            raise ValueError(f"out must be contiguous (int8 [{M}, {K}], float32 [{M}, 1])")
    if not _use_kernels(x) or x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        rq, rs = quantize_rows_ref(x)
        return q.copy_(rq), s.copy_(rs)
    if M == 0:
        return q, s
    if x.stride(-1) != 1:
        x = x.contiguous()
    block_k = min(triton.next_power_of_2(K), 2048 if interpreting() else 16384)
    _quantize_rows_kernel[(M,)](x, q, s, K, x.stride(0), q.stride(0), BLOCK_K=block_k,
                                ONE_PASS=K <= block_k, num_warps=4 if block_k <= 4096 else 8)
    return q, s


def int8_matmul_scaled(xq, xs, w, ws, bias=None, out_dtype=torch.float16, *, cfg: Cfg = None, out=None):
    """(xq @ w^T) * xs * ws^T + bias, the product exact in int32, cast to out_dtype.

    Args:
        xq: int8 [M, K] (unit column stride).
        xs: float32 [M, 1] (or [M]): per-row scales of xq.
        w: [N, K] int8, or uint8 codes with zero point 128 (ActQuantLinear.qweight as stored).
        ws: [N] or [N, 1] per-row scales of w, any float dtype (read as float32).
        bias: [N] or None, any float dtype.
        out_dtype: fp16 / bf16 / fp32.
        cfg: force one launch config (tests, benchmarks); default: timed once per shape.
        out: optional contiguous [M, N] result in out_dtype.
    """
    M, K = xq.shape
    N = w.shape[0]
    if xq.dtype != torch.int8 or w.dtype not in (torch.int8, torch.uint8) or w.shape != (N, K):
        raise ValueError(f"need int8 xq [M, K] and int8/uint8 w [N, {K}], got {xq.dtype} {tuple(xq.shape)}, "
                         f"{w.dtype} {tuple(w.shape)}")
    if xs.numel() != M or ws.numel() != N or (bias is not None and bias.numel() != N):
        raise ValueError(f"xs must have {M} elements, ws and bias {N}")
    if out is None:
        out = torch.empty(M, N, device=xq.device, dtype=out_dtype)
    elif out.shape != (M, N) or out.dtype != out_dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {out_dtype} tensor of shape {(M, N)}")
    if not _use_kernels(xq):
        return out.copy_(int8_matmul_scaled_ref(xq, xs, w, ws, bias, out_dtype))
    if M == 0 or N == 0:
        return out
    if xq.stride(-1) != 1:
        xq = xq.contiguous()
    if w.stride(-1) != 1:
        w = w.contiguous()
    xs = xs.reshape(-1).to(torch.float32).contiguous()
    ws, bias = ws.reshape(-1).contiguous(), None if bias is None else bias.reshape(-1).contiguous()
    if cfg is None:
        key = ("w8a8", xq.device, M if M <= SMALL_M else triton.next_power_of_2(M), N, K, w.dtype, out_dtype,
               bias is not None)
        cfg = choose(key, candidates(M, N, K), lambda c: _launch(c, xq, xs, w, ws, bias, out))
    return _launch(cfg, xq, xs, w, ws, bias, out)


def w8a8_linear(x: torch.Tensor, w: torch.Tensor, ws: torch.Tensor, bias=None, *, cfg: Cfg = None, out=None):
    """y = quantize_rows(x) @ w (int8 / uint8-with-zero-128 [N, K]), rescaled: [..., N] in x.dtype."""
    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    xq, xs = quantize_rows(x2)
    out2 = None if out is None else out.view(-1, w.shape[0])
    y = int8_matmul_scaled(xq, xs, w, ws, bias, x.dtype, cfg=cfg, out=out2)
    return y.view(*x.shape[:-1], w.shape[0])
