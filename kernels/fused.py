"""Small fused kernels for the decode step: each replaces several tiny torch launches.

A W4 Llama-3-8B decode step on the H200 spends ~1.5 of its ~3.6 ms of GPU time outside the
matmuls, over ~650 launches of elementwise kernels of a microsecond or two each (results/inference.md).
Inside a CUDA graph a launch still costs its own latency, so fewer launches is the whole point here:

  * `add_rms_norm`: residual add + Llama RMSNorm (fp32 statistics, normalized value cast to the
    input dtype, then times the weight, as transformers computes it) -- one launch instead of five.
  * `rope`: x * cos + rotate_half(x) * sin over [B, T, H, D] (the caller passes sin with the sign of
    rotate_half folded in) -- one launch instead of four; `rope_store_kv` also writes the rotated
    keys and the values into a static KV cache -- one launch instead of six.
  * `silu_mul`: silu(gate) * up over a fused [..., 2F] gate/up output -- one launch instead of two.

Each has a torch reference (`*_reference`) that the tests compare against. Rows are processed
whole (one program per row), so the hidden size must fit one block (<= 16384 elements).
"""
import torch
import triton
import triton.language as tl

MAX_ROW = 16384


@triton.jit
def _add_rms_norm_kernel(x_ptr, d_ptr, w_ptr, sum_ptr, y_ptr, N, eps, HAS_DELTA: tl.constexpr,
                         BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    ok = offs < N
    x = tl.load(x_ptr + row * N + offs, mask=ok, other=0.0)
    if HAS_DELTA:
        x = (x.to(tl.float32) + tl.load(d_ptr + row * N + offs, mask=ok, other=0.0).to(tl.float32))
        x = x.to(sum_ptr.dtype.element_ty, fp_downcast_rounding="rtne")  # rounded like a torch add
        tl.store(sum_ptr + row * N + offs, x, mask=ok)
    xf = x.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / N + eps)
    normed = (xf * inv).to(y_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * N + offs, (normed * w).to(y_ptr.dtype.element_ty), mask=ok)


def add_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, delta: torch.Tensor | None = None):
    """(x + delta, rms_norm(x + delta) * weight) in x's dtype; without delta, (x, rms_norm(x) * weight)."""
    n = x.shape[-1]
    if n > MAX_ROW:
        raise ValueError(f"add_rms_norm handles rows of at most {MAX_ROW} elements, got {n}")
    if weight.shape != (n,) or (delta is not None and delta.shape != x.shape):
        raise ValueError("weight must be [hidden] and delta shaped like x")
    x = x.contiguous()
    total = torch.empty_like(x) if delta is not None else x
    y = torch.empty_like(x)
    rows = x.numel() // n
    _add_rms_norm_kernel[(rows,)](x, delta.contiguous() if delta is not None else x, weight, total, y, n, eps,
                                  HAS_DELTA=delta is not None, BLOCK=triton.next_power_of_2(n))
    return total, y


def add_rms_norm_reference(x, weight, eps, delta=None):
    total = x + delta if delta is not None else x
    y = torch.nn.functional.rms_norm(total.float(), (total.shape[-1],), eps=eps)
    return total, weight * y.to(total.dtype)


@triton.jit
def _rotate_half_pair(x_ptr, cos_ptr, sin_ptr, offs_d, HALF: tl.constexpr):
    # x * cos + roll(x, D/2) * signed_sin for one head vector: the first half gets b * s1, the second a * s2
    a = tl.load(x_ptr + offs_d).to(tl.float32)
    b = tl.load(x_ptr + HALF + offs_d).to(tl.float32)
    c1 = tl.load(cos_ptr + offs_d).to(tl.float32)
    c2 = tl.load(cos_ptr + HALF + offs_d).to(tl.float32)
    s1 = tl.load(sin_ptr + offs_d).to(tl.float32)
    s2 = tl.load(sin_ptr + HALF + offs_d).to(tl.float32)
    return a * c1 + b * s1, b * c2 + a * s2


@triton.jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, y_ptr, H, stride_row, stride_head, D: tl.constexpr, HALF: tl.constexpr):
    # one program per (b*t row, head) of x [B, T, H, D]; y contiguous [B, T, H, D]; cos/sin contiguous [B, T, D]
    row, h = tl.program_id(0), tl.program_id(1)
    offs_d = tl.arange(0, HALF)
    lo, hi = _rotate_half_pair(x_ptr + row * stride_row + h * stride_head, cos_ptr + row * D, sin_ptr + row * D,
                               offs_d, HALF)
    dst = y_ptr + (row * H + h) * D
    tl.store(dst + offs_d, lo.to(y_ptr.dtype.element_ty))
    tl.store(dst + HALF + offs_d, hi.to(y_ptr.dtype.element_ty))


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, D] rotated: x * cos + roll(x, D/2) * sin, with cos / signed sin [B, T, D].

    x may be a strided view (e.g. the q/k columns of a fused qkv output) as long as D is contiguous
    and B, T merge into one row index; the result is contiguous.
    """
    b, t, h, d = x.shape
    _check_rope(x, cos, sin)
    if x.stride(-1) != 1 or (b > 1 and x.stride(0) != t * x.stride(1)):
        x = x.contiguous()
    y = torch.empty(b, t, h, d, dtype=x.dtype, device=x.device)
    _rope_kernel[(b * t, h)](x, cos.contiguous(), sin.contiguous(), y, h, x.stride(1), x.stride(2), D=d, HALF=d // 2)
    return y


def _check_rope(x, cos, sin):
    b, t, _, d = x.shape
    if d % 2 or d & (d - 1) or cos.shape != (b, t, d) or sin.shape != (b, t, d):
        raise ValueError(f"rope needs a power-of-two head dim and cos/sin [{b}, {t}, {d}]")


@triton.jit
def _round_half_even(y):
    """torch.round's rounding (ties to even) of float32 y."""
    r = tl.floor(y + 0.5)
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where(((r - y) == 0.5) & odd, r - 1.0, r)


@triton.jit
def _store_int8(dst, scale_ptr, lo, hi, offs_d, HALF: tl.constexpr, ELEM_STRIDE):
    """Symmetric int8 codes of the vector (lo, hi) (scale max|x| * fp32(1/127), as kernels.attention.quantize_kv)
    at dst + d * ELEM_STRIDE, and its float32 scale at scale_ptr."""
    amax = tl.maximum(tl.max(tl.abs(lo), 0), tl.max(tl.abs(hi), 0))
    scale = tl.maximum(amax, 1e-8) * (1.0 / 127.0)  # times fp32(1/127), as quantize_kv (torch's CUDA division)
    lo_codes = tl.minimum(tl.maximum(_round_half_even(tl.math.div_rn(lo, scale)), -127.0), 127.0)
    hi_codes = tl.minimum(tl.maximum(_round_half_even(tl.math.div_rn(hi, scale)), -127.0), 127.0)
    tl.store(dst + offs_d * ELEM_STRIDE, lo_codes.to(tl.int8))
    tl.store(dst + (HALF + offs_d) * ELEM_STRIDE, hi_codes.to(tl.int8))
    tl.store(scale_ptr, scale)


@triton.jit
def _rope_store_kv_kernel(x_ptr, cos_ptr, sin_ptr, pos_ptr, q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, T, NH, NKV, L,
                          stride_row, stride_head, D: tl.constexpr, HALF: tl.constexpr, INT8: tl.constexpr):
    # program (b*t row, head) of qkv [B, T, NH + 2 NKV, D]: q heads are rotated into q [B, T, NH, D];
    # k heads rotated and v heads copied into the caches [B, NKV, L, D] at slot pos[b, t].
    # INT8: the caches hold int8 codes with a float32 scale per (b, head, slot) in ks / vs [B, NKV, L],
    # V stored [B, NKV, D, L] (the layout kernels.attention's int8 decode reads fastest)
    row, h = tl.program_id(0), tl.program_id(1)
    offs_d = tl.arange(0, HALF)
    src = x_ptr + row * stride_row + h * stride_head
    if h < NH + NKV:
        lo, hi = _rotate_half_pair(src, cos_ptr + row * D, sin_ptr + row * D, offs_d, HALF)
        if h < NH:
            dst = q_ptr + (row * NH + h) * D
            tl.store(dst + offs_d, lo.to(dst.dtype.element_ty))
            tl.store(dst + HALF + offs_d, hi.to(dst.dtype.element_ty))
        else:
            slot = tl.load(pos_ptr + row)
            cell = ((row // T) * NKV + h - NH) * L + slot
            if INT8:  # quantize k as the model dtype holds it, like the torch path
                _store_int8(k_ptr + cell * D, ks_ptr + cell, lo.to(x_ptr.dtype.element_ty).to(tl.float32),
                            hi.to(x_ptr.dtype.element_ty).to(tl.float32), offs_d, HALF, 1)
            else:
                tl.store(k_ptr + cell * D + offs_d, lo.to(k_ptr.dtype.element_ty))
                tl.store(k_ptr + cell * D + HALF + offs_d, hi.to(k_ptr.dtype.element_ty))
    else:
        slot = tl.load(pos_ptr + row)
        head = (row // T) * NKV + h - NH - NKV
        v_lo, v_hi = tl.load(src + offs_d), tl.load(src + HALF + offs_d)
        if INT8:
            _store_int8(v_ptr + head * D * L + slot, vs_ptr + head * L + slot, v_lo.to(tl.float32),
                        v_hi.to(tl.float32), offs_d, HALF, L)
        else:
            dst = v_ptr + (head * L + slot) * D
            tl.store(dst + offs_d, v_lo.to(dst.dtype.element_ty))
            tl.store(dst + HALF + offs_d, v_hi.to(dst.dtype.element_ty))


def rope_store_kv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor,
                  k_cache: torch.Tensor, v_cache: torch.Tensor, q_heads: int,
                  k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """RoPE for q and k of a fused qkv output and the cache write of k and v, in one launch.

    Args:
        qkv: [B, T, NH + 2 NKV, D] (q heads, then k, then v; D contiguous).
        cos, sin: [B, T, D] (sin signed as rotate_half needs). pos: [B, T] int64 cache slots.
        k_cache, v_cache: [B, NKV, L, D] contiguous; written at [b, :, pos[b, t]].
        k_scale, v_scale: given, the caches are int8 (symmetric codes, scale max|x| * fp32(1/127) per
            vector, as kernels.attention.quantize_kv) with float32 scales [B, NKV, L] (contiguous),
            and v_cache is the transposed view of a contiguous [B, NKV, D, L] buffer.
    Returns:
        rotated q, contiguous [B, T, NH, D].
    """
    b, t, heads, d = qkv.shape
    nkv = (heads - q_heads) // 2
    _check_rope(qkv, cos, sin)
    int8 = k_scale is not None
    v_ok = v_cache.transpose(2, 3).is_contiguous() if int8 else v_cache.is_contiguous()
    if q_heads + 2 * nkv != heads or k_cache.shape != v_cache.shape or k_cache.shape[:2] != (b, nkv) \
            or k_cache.shape[3] != d or not (k_cache.is_contiguous() and v_ok):
        raise ValueError(f"qkv {tuple(qkv.shape)} with {q_heads} query heads does not fit caches "
                         f"{tuple(k_cache.shape)} (contiguous [B, NKV, L, D] expected; int8 V: [B, NKV, D, L])")
    if int8 and (k_cache.dtype != torch.int8 or v_cache.dtype != torch.int8 or v_scale is None
                 or k_scale.shape != k_cache.shape[:3] or v_scale.shape != k_cache.shape[:3]
                 or k_scale.dtype != torch.float32 or not (k_scale.is_contiguous() and v_scale.is_contiguous())):
        raise ValueError("int8 caches need int8 codes and contiguous float32 scales [B, NKV, L]")
    if qkv.stride(-1) != 1 or (b > 1 and qkv.stride(0) != t * qkv.stride(1)):
        qkv = qkv.contiguous()
    q = torch.empty(b, t, q_heads, d, dtype=qkv.dtype, device=qkv.device)
    _rope_store_kv_kernel[(b * t, heads)](qkv, cos.contiguous(), sin.contiguous(), pos.contiguous(), q, k_cache,
                                          v_cache, k_scale if int8 else q, v_scale if int8 else q, t, q_heads, nkv,
                                          k_cache.shape[2], qkv.stride(1), qkv.stride(2), D=d, HALF=d // 2,
                                          INT8=int8)
    return q


def rope_reference(x, cos, sin):
    return x * cos.unsqueeze(2) + torch.roll(x, x.shape[-1] // 2, dims=-1) * sin.unsqueeze(2)


@triton.jit
def _silu_mul_kernel(gu_ptr, y_ptr, F, BLOCK: tl.constexpr):
    row, blk = tl.program_id(0), tl.program_id(1)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    ok = offs < F
    g = tl.load(gu_ptr + row * 2 * F + offs, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row * 2 * F + F + offs, mask=ok, other=0.0)
    act = (g / (1.0 + tl.exp(-g))).to(y_ptr.dtype.element_ty)  # silu rounded like torch's, then the product
    tl.store(y_ptr + row * F + offs, (act.to(tl.float32) * u.to(tl.float32)).to(y_ptr.dtype.element_ty), mask=ok)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up [..., 2F] holding gate then up."""
    f = gate_up.shape[-1] // 2
    gate_up = gate_up.contiguous()
    y = torch.empty(*gate_up.shape[:-1], f, dtype=gate_up.dtype, device=gate_up.device)
    rows = gate_up.numel() // (2 * f)
    block = min(1024, triton.next_power_of_2(f))
    _silu_mul_kernel[(rows, triton.cdiv(f, block))](gate_up, y, f, BLOCK=block)
    return y


def silu_mul_reference(gate_up):
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up
