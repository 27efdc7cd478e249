"""Weight-only quantized matmul: y = x @ dequant(W).T (+ bias), W4A16 / W8A16 (and W2A16).

Reads effopt's packed layout (kernels/LAYOUT.md): `qweight` uint8 [N, ceil(K*b/8)] holding one
little-endian bit stream of b-bit codes per row, `scales` / `zeros` [N, ceil(K/g)], and
W[n, k] = (q[n, k] - zeros[n, k // g]) * scales[n, k // g].

Triton kernels (and dequantize + cuBLAS), picked per shape by timing them once (`kernels._tune.choose`):
  * `_qmm_kernel`   tensor-core kernel for every M. It computes out^T = W @ x^T, so the output
                    features fill the MMA's 64-row side and the few tokens of a decode step sit on
                    the narrow side (16 at least). Optional split-K with an in-kernel reduction
                    (the last split of a tile sums the partials), so one launch serves small M.
  * `_qmm_xw_kernel` tensor-core kernel in the plain orientation, out = x W^T, offered for
                    M >= XW_MIN_M (`xw_configs`): x is the MMA's A operand, the dequantized
                    weight tile the B operand, stored to shared memory once per K-step instead of
                    being converted into the A operand's register layout. Same split-K finish.
  * `_gemv_kernel`  CUDA-core kernel for M <= 4 (no padding of M to 16).
  * `_gemv2_kernel` CUDA-core kernel for decode (M <= 16; offered for M <= 2) over a re-packed
                    int32 copy of the codes: on an H200 at M = 1 it takes 15.8 us for W4 g128
                    8192x8192, against 30 us for `_qmm_kernel` and 38 us for cuBLAS fp16.
  * `_qmm_swz_kernel` `_qmm_kernel`'s product for 4-bit codes over a third copy of them in the MMA
                    operand's own order (`shuffle_w4`): one LOP3 per code pair, no shared-memory
                    round trip. Opt-in (EFFOPT_QMM_SWZ=1): fastest at M = 64-128 on an H200, but
                    a third copy of the codes.
  * `kernels.qmatmul_wgmma` (Gluon, Hopper) asynchronous wgmma over the plain codes, the dequantized
                    tile of step k + 1 made while the MMA of step k runs. Opt-in (EFFOPT_QMM_WG=1):
                    slower than the kernels above at M = 16-128 on an H200 (results/kernels.md).
  * `_dequant_kernel` + torch.matmul (cuBLAS) for large M where that wins.
Codes become floats through an exponent-bit trick instead of int->float converts:
`0x6400 | q` read as fp16 is 1024 + q (bf16: `0x4300 | q` is 128 + q), exact for small q. The offset
is removed after the MMA together with the zero point: sum_k s (q_k - z) x_k =
s * (sum_k (1024 + q_k) x_k - (1024 + z) * sum_k x_k), so each weight element costs a shift and a
bitwise op before the MMA; the subtraction is made per K-block, as the offset summed over all of K
would cost fp32 precision. The `zero_in_tile` configs subtract 1024 + z in the tile instead (q - z,
exact in 16 bits), trading the sums of x for one subtraction per code; `ptx` configs convert four
bytes of codes per register with PTX (`_plane_to_half`).
"""
import dataclasses
import math
import os

import torch
import triton
import triton.language as tl

from kernels._tune import choose, device_buffer, interpreting, mma_sync

KERNEL_BITS = (2, 4, 8)  # 3-bit codes straddle bytes: served by dequantize + matmul
# Tensor-core configs with the PTX code conversion (`_plane_to_half`) join the tuner's candidates on
# CUDA (timed and checked on an H200, results/kernels.md); EFFOPT_QMM_PTX=0 leaves them out.
PTX_CANDIDATES = os.environ.get("EFFOPT_QMM_PTX", "1") == "1"
# `_qmm_swz_kernel` over a third copy of 4-bit codes in an MMA-ready order (`shuffle_w4`). Timed on an H200
# (2026-11-30 19:25 UTC): the tuner's pick at M = 64 (41.9-42.4 us against 47.7 for the mma kernel, 8192^2) and
# M = 128 on some runs, slower at M = 16; it costs a third copy of the codes, so it stays opt-in
# (EFFOPT_QMM_SWZ=1 builds the copy, the tuner times it)
SWZ_CODES = os.environ.get("EFFOPT_QMM_SWZ", "0") == "1"
# Copies of the mma candidates for up to 16 tokens compiled with mma.sync instead of wgmma on sm_90
# (`_tune.mma_sync`): sm_90 SASS of the M = 16 pick, 480 loop instructions against 615 (no LDS.U16 byte
# gathers, 138 PRMT against 202); on an H200 the M = 16 pick at 22.0 against 25.0 us (8192^2) and 21.1 against
# 22.8 (4096x14336), results/kernels.md. The xw and swz kernels were slower with it (M = 16 and 64), so only
# the mma kind gets copies. Appended to the candidates (the tuner times them); EFFOPT_QMM_V2=0 leaves them out.
MMA_V2_CANDIDATES = os.environ.get("EFFOPT_QMM_V2", "1") == "1"
# `kernels.qmatmul_mma`, a Gluon W4 kernel for up to 64 tokens that moves the codes straight into the mma.sync
# operand. On an H200 (results/kernels.md, 2026-12-01) 8192^2: 17.7 us at M = 16 against 22.3 for the mma.sync
# pick, 39.9 at M = 64 against 48.0; appended to the candidates, EFFOPT_QMM_MS=0 leaves them out.
MS_CANDIDATES = os.environ.get("EFFOPT_QMM_MS", "1") == "1"
# With fp16 x the wgmma-form candidates read x as it lies (`Cfg.natural`): no gather a call, one more
# instruction a code pair. On an H200 (results/kernels.md, 2026-12-01 10:24 session) the natural pick against
# the gathered one: 8192^2 20.1 against 22.7 us at 64 tokens, 177.9 against 188.9 at 1024; 4096x14336 29.1
# against 30.9 at 128, 150.9 against 169.4 at 1024; a tie at 256 tokens (50.3 / 50.2). EFFOPT_QMM_NATURAL=0
# gives the gathered form back, "both" times both. bf16 x is always gathered (the conversion is fp16's).
NATURAL_MODE = os.environ.get("EFFOPT_QMM_NATURAL", "1")
if NATURAL_MODE not in ("0", "1", "both"):
    raise ValueError(f"EFFOPT_QMM_NATURAL={NATURAL_MODE!r}: expected 0, 1 or both")
# The warp-specialized `kernels.qmatmul_mma` configs up to 16 tokens launch as programmatic dependents (`Cfg.pdl`):
# scheduled during the previous kernel's tail, they wait for it before their first copy (1), or copy their first
# trips' weights before that wait (2: the weight must not be written by the kernel launched right before). On an
# H200 timed back to back over rotating weights, as a decode step runs its layers (scripts/pdl_chain.py,
# results/kernels.md, 2026-12-01 10:24 session): 8192^2 one token 12.7 -> 12.1 (1) / 11.6 us (2), 16 tokens
# 14.7 -> 14.2; 4096x14336 16 tokens 14.7 -> 13.9 / 13.8. EFFOPT_QMM_PDL=0 launches them plainly, 2 copies weights
# first. From 32 tokens it was not faster (timed after an L2 flush) and is not used.
PDL_MODE = os.environ.get("EFFOPT_QMM_PDL", "1")
if PDL_MODE not in ("0", "1", "2"):
    raise ValueError(f"EFFOPT_QMM_PDL={PDL_MODE!r}: expected 0, 1 or 2")
PDL_MODE = int(PDL_MODE)
# prepare_weight's second copy of the codes for `_gemv2_kernel` (the decode GEMV): as large as the codes, so a
# W4 layer on the GPU holds its codes twice. On an H200 the Gluon kernel above beat gemv2 at one token on every
# shape timed (8192^2 12.5 against 14.4 us, 4096^2 8.1 / 10.0, 14336x4096 10.8 / 13.4, 4096x14336 12.2 / 13.7;
# results/kernels.md), so "auto" keeps the copy only where that kernel cannot take the weight (not Hopper, or not
# 4-bit with groups of whole 64-code blocks). EFFOPT_QMM_GEMV2_COPY=1 always keeps it, 0 never (then gemv2 is
# never a candidate): without it a W4 layer's weight memory is halved.
GEMV2_COPY = os.environ.get("EFFOPT_QMM_GEMV2_COPY", "auto")


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
    qwords: torch.Tensor = None  # int32 [N, 32 * chunks] for `_gemv2_kernel` (see pack_words), or None
    qswz: torch.Tensor = None  # int32 [N, K / 8] for `_qmm_swz_kernel` (see shuffle_w4), or None

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    @property
    def row_bytes(self) -> int:
        return self.qweight.shape[1]


def _keep_gemv2_copy(device, bits: int, group: int, in_features: int) -> bool:
    """Whether prepare_weight keeps gemv2's copy of the codes (GEMV2_COPY: "1", "0", or "auto": unless the Gluon
    W4 kernel, faster at one token on an H200, takes this weight on this device)."""
    if GEMV2_COPY not in ("auto", "0", "1"):
        raise ValueError(f"EFFOPT_QMM_GEMV2_COPY must be auto, 0 or 1; got {GEMV2_COPY!r}")
    if GEMV2_COPY != "auto":
        return GEMV2_COPY == "1"
    from kernels import qmatmul_mma, qmatmul_wgmma

    return not (MS_CANDIDATES and qmatmul_wgmma.available(device) and qmatmul_mma.fits(bits, group, in_features, 1))


def prepare_weight(qweight, scales, zeros, bits: int, group_size: int, in_features: int) -> QuantWeight:
    """Re-lay out the packed tensors once for speed (group-major scales/zeros); cache the result.

    Where `_gemv2_kernel` applies (bits 2/4/8, g a multiple of 32 or per-channel) the result also
    holds the codes re-packed into int32 words (`pack_words`): a second copy of the codes, as
    large as qweight, kept so the decode kernel can read 16-byte words in its own order (unless
    `_keep_gemv2_copy` says no: then gemv2 is not a candidate).
    """
    _check_layout(qweight, scales, zeros, bits, group_size, in_features)
    g = _norm_group(group_size, in_features)
    keep = _gemv2_fits(bits, g, in_features) and _keep_gemv2_copy(qweight.device, bits, g, in_features)
    words = pack_words(qweight, bits, in_features) if keep else None
    swz = shuffle_w4(qweight, in_features) if SWZ_CODES and swz_fits(bits, g, in_features) else None
    return QuantWeight(
        qweight.contiguous(),
        _group_major(scales),
        _group_major(zeros),
        bits,
        g,
        in_features,
        words,
        swz,
    )


GROUP_MAJOR_PAD = 256  # rows of zeros after the last one: a 256-row tile reads its scales without a mask


def _group_major(t: torch.Tensor) -> torch.Tensor:
    """[N, G] with the rows of a group contiguous (strides (1, N_pad)), stored over zero padding to a
    multiple of GROUP_MAJOR_PAD rows so that `kernels.qmatmul_wgmma` can copy a tile's scales in 16-byte runs."""
    n, g = t.shape
    buf = t.new_zeros(g, -(-n // GROUP_MAJOR_PAD) * GROUP_MAJOR_PAD)
    buf[:, :n] = t.t()
    return buf[:, :n].t()


def swz_fits(bits: int, group: int, in_features: int) -> bool:
    """`_qmm_swz_kernel` takes 4-bit codes, K a multiple of 64 and groups of whole 64-code blocks."""
    return bits == 4 and in_features % 64 == 0 and group % 64 == 0


def shuffle_w4(qweight: torch.Tensor, in_features: int, rows: int = 2048) -> torch.Tensor:
    """4-bit codes in the order the MMA's A operand takes them: int32 [N, K / 8].

    Per row, each 64-code block is 8 words; word (c, wd) holds in its nibble 4a + 16b the code of
    k = 32 wd + 8 a + 2 c + b. A thread of the MMA owns k pairs 2c, 2c + 1 (+ 8, + 16, ...), so its
    codes are two adjacent words, and one LOP3 of a word shifted by 4a gives a half2 of a code pair
    (`_swz_pair`); the kernel restores the k order with one transpose (scripts/preshuffle_probe.py).
    """
    n = qweight.shape[0]
    out = torch.empty(n, in_features // 8, dtype=torch.int32, device=qweight.device)
    shifts = ((4 * torch.arange(4))[:, None] + (16 * torch.arange(2))[None, :]).to(qweight.device)
    for r0 in range(0, n, rows):  # bounded temporaries for large layers
        codes = unpack_codes(qweight[r0:r0 + rows], 4, in_features).to(torch.int64)
        c = codes.view(-1, in_features // 64, 2, 4, 4, 2).permute(0, 1, 4, 2, 3, 5)  # [n, kb, c, wd, a, b]
        words = (c << shifts).sum((-1, -2))  # < 2^32
        out[r0:r0 + rows] = (words - ((words >> 31) << 32)).reshape(-1, in_features // 8).to(torch.int32)
    return out


def _gemv2_fits(bits: int, group: int, in_features: int) -> bool:
    """Whether every 32-code segment of the word layout lies in one group and the kernel's scale
    flushes line up with group ends: per-channel, or g <= 1024 with g/32 and codes per word dividing
    one another (g = 32, 64, 128, 256, ...)."""
    if bits not in KERNEL_BITS:
        return False
    if group >= in_features:
        return True
    segs, cpw = group // 32, 32 // bits
    return group % 32 == 0 and group <= 1024 and (cpw % segs == 0 or segs % cpw == 0)


def pack_words(qweight: torch.Tensor, bits: int, in_features: int, rows: int = 2048) -> torch.Tensor:
    """Re-pack the codes into int32 words for `_gemv2_kernel`: int32 [N, 32 * R].

    The row is cut into R chunks of 32 words (CPW = 32 // bits codes each, 32 * CPW codes per
    chunk, K padded with zero codes). Code c * 32 + t of chunk r sits at bits [c*b, (c+1)*b) of
    word r * 32 + t, so segment c of a chunk (codes c*32 .. c*32+31) is one field of 32
    consecutive words: a 16-byte load gives a thread 4 consecutive codes of each segment, whose x
    values are 4 consecutive columns, and a segment never straddles a group when 32 | g.
    """
    n = qweight.shape[0]
    cpw = 32 // bits
    chunks = -(-in_features // (32 * cpw))
    out = torch.empty(n, 32 * chunks, dtype=torch.int32, device=qweight.device)
    shifts = (torch.arange(cpw, device=qweight.device, dtype=torch.int64) * bits)[None, None, :, None]
    for r0 in range(0, n, rows):  # bounded temporaries for large layers
        codes = unpack_codes(qweight[r0:r0 + rows], bits, in_features).to(torch.int64)
        codes = torch.nn.functional.pad(codes, (0, 32 * cpw * chunks - in_features))
        words = (codes.view(-1, chunks, cpw, 32) << shifts).sum(2)  # [rows, R, 32] < 2^32
        out[r0:r0 + rows] = (words - ((words >> 31) << 32)).view(-1, 32 * chunks).to(torch.int32)
    return out


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


def _bytes_to_half_ptx(select: str, fill: int) -> tl.constexpr:
    """PTX taking four uint8 elements in one register to four 16-bit floats OFFSET + code: `select`
    leaves the codes of the plane in the low bits of each byte (in t), then one byte permute per two
    codes sets `fill` as each one's high byte (0x64: fp16 1024 + q; 0x43: bf16 128 + q, q < 128).
    Selector 0x5140 takes bytes 0, 1 (elements 0, 1: low / high half of $0), 0x7362 bytes 2, 3."""
    return tl.constexpr("{\n.reg .b32 t;\n" + select + f"prmt.b32 $0, t, {fill:#x}, 0x5140;\n"
                        f"prmt.b32 $1, t, {fill:#x}, 0x7362;\n}}")


_LOW_NIBBLES = "and.b32 t, $2, 0x0f0f0f0f;\n"
_HIGH_NIBBLES = "shr.b32 t, $2, 4;\nand.b32 t, t, 0x0f0f0f0f;\n"
_WHOLE_BYTES = "mov.b32 t, $2;\n"
_PTX_F16_LO4 = _bytes_to_half_ptx(_LOW_NIBBLES, 0x64646464)
_PTX_F16_HI4 = _bytes_to_half_ptx(_HIGH_NIBBLES, 0x64646464)
_PTX_BF16_LO4 = _bytes_to_half_ptx(_LOW_NIBBLES, 0x43434343)
_PTX_BF16_HI4 = _bytes_to_half_ptx(_HIGH_NIBBLES, 0x43434343)
_PTX_F16_B8 = _bytes_to_half_ptx(_WHOLE_BYTES, 0x64646464)
PTX_OK = ((4, 1), (4, 2), (8, 1))  # (bits, DQ) the PTX conversion serves


@triton.jit
def _plane_to_half(wb, C: tl.constexpr, BITS: tl.constexpr, DQ: tl.constexpr):
    """OFFSET + q for code plane C of the uint8 tile wb (what `_codes_to_float` gives for
    (wb >> C*BITS) & mask), four bytes per 32-bit register in PTX: ~1 instruction a code, where the
    element-wise form spends ~3 on shifting, widening and moving bytes. GPU only; (BITS, DQ) in
    PTX_OK. In sm_90 SASS (Triton 3.6, M = 16 tile, 2 K-blocks a trip) the loop went from 775 to
    709 instructions and 124 to 94 registers; the tuner picks it at M = 16 on an H200 (results/kernels.md)."""
    asm: tl.constexpr = _PTX_F16_B8 if BITS == 8 else (
        (_PTX_F16_LO4 if C == 0 else _PTX_F16_HI4) if DQ == 1 else (_PTX_BF16_LO4 if C == 0 else _PTX_BF16_HI4))
    return tl.inline_asm_elementwise(asm, "=r,=r,r", [wb], dtype=tl.float16 if DQ == 1 else tl.bfloat16,
                                     is_pure=True, pack=4)


@triton.jit
def _scaled_codes(code, offset_q, k_idx, s, z, x_ptr, s_ptr, z_ptr, offs_n, n_ok, stride_sn, stride_sg, K, GROUP,
                  GROUP_MODE: tl.constexpr, DQ: tl.constexpr, UPCAST: tl.constexpr):
    """(q - z) * s of a code tile [BLOCK_N, BLOCK_K] in x's dtype: the weight tile with scale and zero
    point folded in. code: int codes; offset_q: `_codes_to_float(code, DQ)` (or `_plane_to_half`);
    k_idx: the tile's K index per column; s, z: per-row scale / zero of the tile's group."""
    OFFSET: tl.constexpr = 1024.0 if DQ == 1 else (128.0 if DQ == 2 else 0.0)
    dt = x_ptr.dtype.element_ty
    if GROUP_MODE == 0:  # groups smaller than the K-block: gather per element
        gi = (k_idx // GROUP)[None, :]
        ok = n_ok[:, None] & (k_idx < K)[None, :]
        se = tl.load(s_ptr + offs_n[:, None] * stride_sn + gi * stride_sg, mask=ok, other=0.0)
        ze = tl.load(z_ptr + offs_n[:, None] * stride_sn + gi * stride_sg, mask=ok, other=0.0)
        return ((_codes_to_float(code, 0) - ze.to(tl.float32)) * se.to(tl.float32)).to(dt)
    elif DQ == 0:
        return ((_codes_to_float(code, 0) - z[:, None]) * s[:, None]).to(dt)
    elif UPCAST:  # the interpreter's bf16 arithmetic is broken; fp32 rounds the same
        return ((offset_q.to(tl.float32) - (z + OFFSET)[:, None]) * s[:, None]).to(dt)
    else:  # (OFFSET + q) - (OFFSET + z) is exact in 16 bits; one rounding for * s
        return (offset_q - (z + OFFSET).to(dt)[:, None]) * s.to(dt)[:, None]


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
def _swapped_tile(pid, N, M, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    """Output features and tokens of program pid's tile of out^T (features fastest), with their masks."""
    num_n = tl.cdiv(N, BLOCK_N)
    offs_n = (pid % num_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = (pid // num_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    return offs_n, offs_m, offs_n < N, offs_m < M


@triton.jit
def _split_range(n_iters, pid_k, SPLIT_K: tl.constexpr):
    """[it0, it1): the loop trips split pid_k of SPLIT_K runs (the last split may get fewer)."""
    per_split = tl.cdiv(n_iters, SPLIT_K)
    it0 = pid_k * per_split
    return it0, tl.minimum(it0 + per_split, n_iters)


@triton.jit
def _scale_zero(s_ptr, z_ptr, offs_n, n_ok, stride_sn, col):
    """fp32 scale and zero point of rows offs_n at column offset `col` (g * stride_sg) of the group axis."""
    s = tl.load(s_ptr + offs_n * stride_sn + col, mask=n_ok, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + offs_n * stride_sn + col, mask=n_ok, other=0.0).to(tl.float32)
    return s, z


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
    PTX: tl.constexpr = False,  # codes to OFFSET + q with `_plane_to_half` (GPU, (BITS, DQ) in PTX_OK)
    ZERO_IN_TILE: tl.constexpr = False,  # with POST_ZERO: subtract the zero point in the tile, exactly
    MMA_V2: tl.constexpr = False,  # compiled under `_tune.mma_sync` (only keys the compile cache)
):
    """out[M, N] = x[M, K] @ W[N, K]^T computed as acc[BLOCK_N, BLOCK_M] += W_tile @ x_tile^T.

    One program owns BLOCK_N output features x BLOCK_M tokens and the K-blocks of split pid_k.
    Per K-block it reads BLOCK_KB bytes of every row (CPB = 8 // BITS codes per byte); code c of
    byte j is k = j * CPB + c, so for each c the matching x columns are a stride-CPB slice.
    POST_ZERO applies the scale after the MMA and, by default, the zero point too, through the
    per-group sums of x that every program computes; ZERO_IN_TILE instead subtracts OFFSET + z from
    the tile's OFFSET + q (q - z, exact in 16 bits), which drops those sums (the SASS of the M = 16
    tile spent ~140 of 775 instructions a trip on them).
    """
    CPB: tl.constexpr = 8 // BITS
    CODE_MASK: tl.constexpr = (1 << BITS) - 1
    OFFSET: tl.constexpr = 1024.0 if DQ == 1 else (128.0 if DQ == 2 else 0.0)
    dt = x_ptr.dtype.element_ty

    pid, pid_k = tl.program_id(0), tl.program_id(1)
    offs_n, offs_m, n_ok, m_ok = _swapped_tile(pid, N, M, BLOCK_N, BLOCK_M)
    offs_j = tl.arange(0, BLOCK_KB)

    n_iters = tl.cdiv(KB, BLOCK_KB * STEP_BLOCKS)
    it0, it1 = _split_range(n_iters, pid_k, SPLIT_K)

    acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    xsum = tl.zeros((BLOCK_M,), tl.float32)
    s, z = _scale_zero(s_ptr, z_ptr, offs_n, n_ok, stride_sn, 0)
    for step in range(it0, it1):
        for sub in tl.static_range(STEP_BLOCKS):  # unrolled: STEP_BLOCKS K-blocks' loads in flight
            it = step * STEP_BLOCKS + sub
            kb = it * BLOCK_KB + offs_j
            wb = tl.load(qw_ptr + offs_n[:, None] * stride_qn + kb[None, :],
                         mask=n_ok[:, None] & (kb < KB)[None, :], other=0)
            if GROUP_MODE == 1:  # the whole K-block lies in group g
                # an unrolled trip may run past the last group: clamp (its codes and x are masked)
                g = tl.minimum((it * BLOCK_KB * CPB) // GROUP, tl.cdiv(K, GROUP) - 1)
                s, z = _scale_zero(s_ptr, z_ptr, offs_n, n_ok, stride_sn, g * stride_sg)
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
                if PTX:
                    offset_q = _plane_to_half(wb, c, BITS, DQ)
                else:
                    offset_q = _codes_to_float(code, DQ)
                if POST_ZERO:
                    if not ZERO_IN_TILE:
                        w = offset_q.to(dt)  # OFFSET + q, exact
                        xsum += tl.sum(xt.to(tl.float32), axis=0)
                    elif DQ == 0 or UPCAST:  # q - z, exact in fp32 and in dt
                        w = (offset_q.to(tl.float32) - (z + OFFSET)[:, None]).to(dt)
                    else:  # (OFFSET + q) - (OFFSET + z) = q - z, exact in 16 bits
                        w = offset_q - (z + OFFSET).to(dt)[:, None]
                    if GROUP_MODE == 1 or not ZERO_IN_TILE:
                        part = _mma(w, xt, part, UPCAST)
                    else:
                        acc = _mma(w, xt, acc, UPCAST)
                else:
                    w = _scaled_codes(code, offset_q, k_idx, s, z, x_ptr, s_ptr, z_ptr, offs_n, n_ok, stride_sn,
                                      stride_sg, K, GROUP, GROUP_MODE, DQ, UPCAST)
                    acc = _mma(w, xt, acc, UPCAST)
            if POST_ZERO:
                if not ZERO_IN_TILE:
                    # the offset leaves each K-block's fp32 partial: summed over all of K it would cost
                    # OFFSET * K * eps, several times q - z at 2 bits (per-channel, K = 4096: 3e-3 rel. err)
                    part -= (z + OFFSET)[:, None] * xsum[None, :]
                    xsum = tl.zeros((BLOCK_M,), tl.float32)
                if GROUP_MODE == 1:
                    acc += s[:, None] * part
                elif not ZERO_IN_TILE:  # one group: s at the end
                    acc += part
    if POST_ZERO and GROUP_MODE == 2:
        acc = s[:, None] * acc
    _finish(acc, out_ptr, bias_ptr, ws_ptr, lock_ptr, pid, pid_k, offs_n, offs_m, N, M, stride_om,
            HAS_BIAS, SPLIT_K, BLOCK_N, BLOCK_M)


def _swz_ptx(fill: int) -> tl.constexpr:
    """(w & 0x000f000f) | fill (LOP3 table 0xea = a & b | c), split into its two 16-bit halves."""
    return tl.constexpr(f"{{\n.reg .b32 r;\nlop3.b32 r, $2, 0x000f000f, {fill:#010x}, 0xea;\n"
                        "mov.b32 {$0, $1}, r;\n}")


_SWZ_F16 = _swz_ptx(0x64006400)  # fp16 1024 + q
_SWZ_BF16 = _swz_ptx(0x43004300)  # bf16 128 + q


@triton.jit
def _swz_pair(w, DQ: tl.constexpr, PTX: tl.constexpr):
    """(OFFSET + bits [0, 4), OFFSET + bits [16, 20)) of int32 w as two fp16 (DQ 1) / bf16 (DQ 2): one LOP3."""
    if not PTX:
        lo, hi = _codes_to_float(w & 0xF, DQ), _codes_to_float((w >> 16) & 0xF, DQ)
    elif DQ == 1:
        lo, hi = tl.inline_asm_elementwise(_SWZ_F16, "=h,=h,r", [w], dtype=(tl.float16, tl.float16), is_pure=True,
                                           pack=1)
    else:
        lo, hi = tl.inline_asm_elementwise(_SWZ_BF16, "=h,=h,r", [w], dtype=(tl.bfloat16, tl.bfloat16),
                                           is_pure=True, pack=1)
    return lo, hi


@triton.jit
def _qmm_swz_kernel(
    x_ptr, qs_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, ws_ptr, lock_ptr,
    M, N, K,
    stride_xm, stride_qn, stride_sn, stride_sg, stride_om,
    GROUP: tl.constexpr,  # codes per group (a constexpr: the group of a block is a shift, not a division)
    GROUP_MODE: tl.constexpr,  # 1: groups of whole 64-code blocks, 2: one group per row
    DQ: tl.constexpr,  # 1: fp16 x, 2: bf16 x
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, PTX: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr,
    STEP: tl.constexpr,  # 64-code blocks per loop trip (unrolled)
    SCALE_IN_TILE: tl.constexpr = False,  # (q - z) * s in x's dtype, one MMA chain: for many tokens
):
    """out = x @ W^T like `_qmm_kernel` (acc[BLOCK_N, BLOCK_M] += W_tile @ x_tile^T) over `shuffle_w4` codes.

    Per 64-code block a thread loads its two words of each of its rows (the MMA operand's own
    order, no shared-memory round trip and no byte permutes in sm_90 SASS), turns each shifted word
    into half2 code pairs with one LOP3, subtracts OFFSET + z (q - z, exact in 16 bits) and runs the
    MMA; the scale is applied to each block's fp32 partial (GROUP_MODE 1) or at the end (2), or, with
    SCALE_IN_TILE, to the tile (one rounding to x's dtype; cheaper once BLOCK_M x BLOCK_N FMAs a block
    outnumber the tile's code pairs).
    """
    OFFSET: tl.constexpr = 1024.0 if DQ == 1 else 128.0
    dt = x_ptr.dtype.element_ty
    pid, pid_k = tl.program_id(0), tl.program_id(1)
    offs_n, offs_m, n_ok, m_ok = _swapped_tile(pid, N, M, BLOCK_N, BLOCK_M)
    rows = tl.minimum(offs_n, N - 1)  # rows past N read a valid row; dropped at the store
    word_ptrs = (qs_ptr + rows[:, None, None] * stride_qn + tl.arange(0, 4)[None, :, None] * 2
                 + tl.arange(0, 2)[None, None, :])  # [BLOCK_N, c, wd] of block 0
    shifts = 4 * tl.arange(0, 4)
    offs_k = tl.arange(0, 64)
    n_blocks = K // 64
    it0, it1 = _split_range(tl.cdiv(n_blocks, STEP), pid_k, SPLIT_K)

    acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    s, z = _scale_zero(s_ptr, z_ptr, offs_n, n_ok, stride_sn, 0)
    for step in range(it0, it1):
        for sub in tl.static_range(STEP):
            blk = step * STEP + sub
            kk = blk * 64 + offs_k  # past K (an unrolled trip's tail) x reads as 0
            xt = tl.load(x_ptr + offs_m[None, :] * stride_xm + kk[:, None], mask=(kk < K)[:, None] & m_ok[None, :],
                         other=0.0)
            blk = tl.minimum(blk, n_blocks - 1)
            words = tl.load(word_ptrs + blk * 8)
            if GROUP_MODE == 1:
                s, z = _scale_zero(s_ptr, z_ptr, offs_n, n_ok, stride_sn, ((blk * 64) // GROUP) * stride_sg)
            lo, hi = _swz_pair(words[:, :, :, None] >> shifts[None, None, None, :], DQ, PTX)  # [BLOCK_N, c, wd, a]
            lo = tl.trans(lo.reshape(BLOCK_N, 4, 8), 0, 2, 1)  # [BLOCK_N, (wd, a), c]
            hi = tl.trans(hi.reshape(BLOCK_N, 4, 8), 0, 2, 1)
            w = tl.join(lo, hi).reshape(BLOCK_N, 64)  # OFFSET + q in k order: k = 8 (wd, a) + 2 c + b
            if UPCAST:  # the interpreter's bf16 arithmetic is broken; fp32 rounds the same
                w = w.to(tl.float32) - (z + OFFSET)[:, None]
                if SCALE_IN_TILE:
                    w = (w * s[:, None]).to(dt)
            else:
                w = w - (z + OFFSET).to(dt)[:, None]
                if SCALE_IN_TILE:
                    w = w * s.to(dt)[:, None]
            if GROUP_MODE == 1 and not SCALE_IN_TILE:
                acc += s[:, None] * _mma(w, xt, tl.zeros((BLOCK_N, BLOCK_M), tl.float32), UPCAST)
            else:
                acc = _mma(w, xt, acc, UPCAST)
    if GROUP_MODE == 2 and not SCALE_IN_TILE:
        acc = s[:, None] * acc
    _finish(acc, out_ptr, bias_ptr, ws_ptr, lock_ptr, pid, pid_k, offs_n, offs_m, N, M, stride_om,
            HAS_BIAS, SPLIT_K, BLOCK_N, BLOCK_M)


@triton.jit
def _unpack_tile(wb, BITS: tl.constexpr, ROWS: tl.constexpr, BLOCK_KB: tl.constexpr):
    """uint8 [ROWS, BLOCK_KB] bytes -> int16 [ROWS, BLOCK_KB * 8 // BITS] codes in K order.

    Code c of byte j lands in column j * CPB + c: the CPB code planes are interleaved with
    tl.join (the new, innermost axis stays inside a thread) and merged by a reshape.
    """
    if BITS == 8:
        return wb.to(tl.int16)
    elif BITS == 4:
        lo = (wb & 15).to(tl.int16)
        hi = (wb >> 4).to(tl.int16)
        return tl.reshape(tl.join(lo, hi), (ROWS, BLOCK_KB * 2))
    else:  # 2 bits: join(join(c0, c2), join(c1, c3))[..., l, i] is code 2 l + i of the byte
        c0 = (wb & 3).to(tl.int16)
        c1 = ((wb >> 2) & 3).to(tl.int16)
        c2 = ((wb >> 4) & 3).to(tl.int16)
        c3 = (wb >> 6).to(tl.int16)
        return tl.reshape(tl.join(tl.join(c0, c2), tl.join(c1, c3)), (ROWS, BLOCK_KB * 4))


@triton.jit
def _qmm_xw_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, ws_ptr, lock_ptr,
    M, N, K, KB, GROUP,
    stride_xm, stride_qn, stride_sn, stride_sg, stride_om,
    BITS: tl.constexpr,  # 2, 4 or 8
    GROUP_MODE: tl.constexpr,  # 0: scales per element, 1: one group per K-block, 2: one group per row
    DQ: tl.constexpr,  # code->float trick, see _codes_to_float
    POST_ZERO: tl.constexpr,  # apply scale/zero to the MMA result (needs GROUP_MODE 1 or 2)
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KB: tl.constexpr, SPLIT_K: tl.constexpr,
):
    """out[M, N] = x[M, K] @ W[N, K]^T in the plain orientation: acc[BLOCK_M, BLOCK_N] += x_tile @ W_tile^T.

    The x tile [BLOCK_M, BLOCK_K] (BLOCK_K = BLOCK_KB * CPB codes, contiguous columns) is the A
    operand as loaded; the weight tile is unpacked to [BLOCK_N, BLOCK_K] codes in K order
    (`_unpack_tile`), dequantized, and transposed into the [BLOCK_K, BLOCK_N] B operand, which
    the MMA reads from shared memory: one store per K-step, no conversion into the A operand's
    register layout as in `_qmm_kernel` (in the sm_90 TTGIR of triton 3.9 the tile is one
    local_alloc and the transpose a view of it, feeding one warp_group_dot). One MMA of depth
    BLOCK_K per K-step. Scale / zero point as in `_qmm_kernel`: POST_ZERO keeps OFFSET + q in the
    tile, subtracts (OFFSET + z) sum_k x from each K-block's fp32 partial and applies s per group
    (GROUP_MODE 1) or once at the end (2); otherwise (q - z) * s is folded into the 16-bit tile.
    Programs walk the M tiles of one N tile consecutively (pid_m fastest), so the weight tile is
    read from HBM about once and from L2 by the other M tiles.
    """
    CPB: tl.constexpr = 8 // BITS
    BLOCK_K: tl.constexpr = BLOCK_KB * CPB
    OFFSET: tl.constexpr = 1024.0 if DQ == 1 else (128.0 if DQ == 2 else 0.0)
    dt = x_ptr.dtype.element_ty

    pid, pid_k = tl.program_id(0), tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    pid_m, pid_n = pid % num_m, pid // num_m
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_ok, m_ok = offs_n < N, offs_m < M
    offs_j = tl.arange(0, BLOCK_KB)
    offs_k = tl.arange(0, BLOCK_K)

    n_iters = tl.cdiv(KB, BLOCK_KB)
    it0, it1 = _split_range(n_iters, pid_k, SPLIT_K)

    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    s, z = _scale_zero(s_ptr, z_ptr, offs_n, n_ok, stride_sn, 0)
    for it in range(it0, it1):
        kb = it * BLOCK_KB + offs_j
        wb = tl.load(qw_ptr + offs_n[:, None] * stride_qn + kb[None, :],
                     mask=n_ok[:, None] & (kb < KB)[None, :], other=0)
        kk = it * BLOCK_K + offs_k
        xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :],
                     mask=m_ok[:, None] & (kk < K)[None, :], other=0.0)
        code = _unpack_tile(wb, BITS, BLOCK_N, BLOCK_KB)  # [BLOCK_N, BLOCK_K]; padding codes are 0
        if GROUP_MODE == 1:  # the whole K-block lies in group g
            g = (it * BLOCK_K) // GROUP
            s, z = _scale_zero(s_ptr, z_ptr, offs_n, n_ok, stride_sn, g * stride_sg)
        if POST_ZERO:
            w = _codes_to_float(code, DQ).to(dt)  # OFFSET + q, exact
            part = _mma(xt, tl.trans(w), tl.zeros((BLOCK_M, BLOCK_N), tl.float32), UPCAST)
            part -= (z + OFFSET)[None, :] * tl.sum(xt.to(tl.float32), axis=1)[:, None]  # per K-block: see _qmm_kernel
            if GROUP_MODE == 1:
                acc += s[None, :] * part
            else:
                acc += part
        else:
            w = _scaled_codes(code, _codes_to_float(code, DQ), kk, s, z, x_ptr, s_ptr, z_ptr, offs_n, n_ok,
                              stride_sn, stride_sg, K, GROUP, GROUP_MODE, DQ, UPCAST)
            acc = _mma(xt, tl.trans(w), acc, UPCAST)
    if POST_ZERO and GROUP_MODE == 2:
        acc = s[None, :] * acc
    _finish(tl.trans(acc), out_ptr, bias_ptr, ws_ptr, lock_ptr, pid, pid_k, offs_n, offs_m, N, M, stride_om,
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
    it0, it1 = _split_range(n_iters, pid_k, SPLIT_K)

    acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    xsum = tl.zeros((BLOCK_M,), tl.float32)
    s, z = _scale_zero(s_ptr, z_ptr, offs_n, n_ok, stride_sn, 0)
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
            s, z = _scale_zero(s_ptr, z_ptr, offs_n, n_ok, stride_sn, g * stride_sg)
            acc += s[:, None] * (part - z[:, None] * xs[None, :])
        else:
            acc += part
            xsum += xs
    if GROUP_MODE == 2:
        acc = s[:, None] * (acc - z[:, None] * xsum[None, :])
    _finish(acc, out_ptr, bias_ptr, ws_ptr, lock_ptr, pid, pid_k, offs_n, offs_m, N, M, stride_om,
            HAS_BIAS, SPLIT_K, BLOCK_N, BLOCK_M)


@triton.jit
def _pow2(e: tl.constexpr):
    """2.0 ** e as an fp32 scalar, built from its bits (exact), for integer constexpr e in [-126, 128)."""
    return tl.full([], (e + 127) << 23, tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def _gemv2_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, ws_ptr, lock_ptr,
    M, N, K, R,
    stride_xm, stride_qn, stride_sn, stride_sg, stride_om,
    GROUP: tl.constexpr,  # g (a constexpr, so the group index is a shift); 1 when per-channel
    BITS: tl.constexpr,  # 2, 4 or 8
    GROUP_MODE: tl.constexpr,  # 1: scale every FLUSH segments, 2: one group per row (at the end)
    FLUSH: tl.constexpr,  # segments (32 codes) per scale flush: min(g / 32, codes per word)
    GPOW: tl.constexpr,  # next_power_of_2(g) (GROUP_MODE 1): the zero-point epilogue's tile
    MASK_K: tl.constexpr,  # False when K is whole chunks and R a multiple of STEP: no loop masks
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    STEP: tl.constexpr,  # chunks (32 words = 128 bytes of a row) per loop trip, unrolled
    SPLIT_K: tl.constexpr,
    STAGES: tl.constexpr,  # 1: load a trip's operands at its top; 2: one trip ahead (prefetch)
):
    """Decode GEMV on CUDA cores over `pack_words` codes: out[M, N] = x[M, K] @ W[N, K]^T.

    A program owns BLOCK_N rows and the chunks of split pid_k; per chunk it loads a [BLOCK_N, 32]
    tile of words (segment c of the chunk is field c of every word). What this kernel does about
    where the time goes:
      * No per-step reductions: per token, `parts[m]` / `accs[m]` are [BLOCK_N, 32] fp32 in
        registers, one lane per word column; the 32 columns are summed once, after the K loop.
        Tokens are a tuple of 2-D tensors rather than a 3-D tensor, so every x and scale load is
        smaller than the thread count and the compiler recomputes it in the words' register
        layout instead of converting through shared memory.
      * Code -> float in one AND: a b-bit field at bits [sh, sh+b), sh + b <= 23, read as fp32 is
        the denormal q * 2^(sh-149), exact and linear (no offset to remove, no I2F). Fields that
        reach the exponent bits are taken from the word shifted down by 16 (one shift per word).
        The 2^(149-sh) goes onto x (x * 2^(85-sh): one convert and one multiply per x element,
        shared by the rows a thread holds), so v * x' = q * x * 2^-64 exactly (<= 8 + 11
        significant bits) and one FFMA per token is the only other per-code instruction.
        |x| must stay below 2^42 (x * 2^85 < fp32 max).
      * Scale once per group and column: acc += s * part after the group's last segment.
      * Zero point out of the loop: sum_k s (q - z) x = s sum_k q x - s z sum_k x, and the second
        term needs only x, so an epilogue sums x per group over this split's K range (`_zero_term`).
      * Wide loads over several groups: a trip reads STEP chunks of 32 * (32 / BITS) codes per row;
        rows and tokens past N / M are clamped to valid ones (dropped at the store), so with
        MASK_K off the loop has no masks at all.
    Per code: ~1 AND and M FFMA, plus M FFMA per group and column (scale) and 2 M per x element
    (SASS at M=1, 64 rows, 4 chunks a trip: 1749 instructions per 512 codes a thread, 128 registers).
    Measured on an H200 (W4 g128, M=1): 15.8 us at 8192x8192 with 4 chunks a trip (2.3 TB/s, 53%
    of the copy bandwidth). ncu: 46% of DRAM bandwidth with a warp eligible in 60% of the cycles,
    so latency- and issue-bound together; the more loads a thread has in flight, the faster (1, 2, 4
    chunks a trip: 25.5, 17.1, 15.8 us). Prefetching a trip ahead (STAGES 2) needs ~240 registers (2
    programs per SM) and was slower; so were 8 rows a thread and staging through shared memory.
    At M = 4 the FFMAs dominate (2x slower than the MMA kernel).
    """
    CPW: tl.constexpr = 32 // BITS  # codes per word = segments per chunk
    CODE_MASK: tl.constexpr = (1 << BITS) - 1
    pid, pid_k = tl.program_id(0), tl.program_id(1)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.minimum(offs_n, N - 1)
    offs_t = tl.arange(0, 32)
    n_trips = tl.cdiv(R, STEP)
    it0, it1 = _split_range(n_trips, pid_k, SPLIT_K)
    w_ptrs = qw_ptr + rows[:, None] * stride_qn + offs_t[None, :]
    s_ptrs = s_ptr + rows * stride_sn

    parts = ()  # per token: sum q x 2^-64 since the last flush
    accs = ()  # per token: sum s q x 2^-64
    for m in tl.static_range(BLOCK_M):
        parts = parts + (tl.zeros((BLOCK_N, 32), tl.float32),)
        accs = accs + (tl.zeros((BLOCK_N, 32), tl.float32),)
    if STAGES >= 2:
        nxt = _gemv2_loads(w_ptrs, x_ptr, offs_t, tl.minimum(it0, n_trips - 1), R, K, M, stride_xm, CPW, BLOCK_M,
                           STEP, MASK_K)
    for it in range(it0, it1):
        if STAGES >= 2:  # trip it + 1's loads go out before trip it is computed
            cur = nxt
            if it + 1 < it1:  # (an `if` keeps ptxas from sinking them to the end of the trip)
                nxt = _gemv2_loads(w_ptrs, x_ptr, offs_t, it + 1, R, K, M, stride_xm, CPW, BLOCK_M, STEP, MASK_K)
        else:  # at the top of the trip: half the registers; other warps hide the latency
            cur = _gemv2_loads(w_ptrs, x_ptr, offs_t, it, R, K, M, stride_xm, CPW, BLOCK_M, STEP, MASK_K)
        for sub in tl.static_range(STEP):
            r = it * STEP + sub
            w = cur[0][sub]
            w_hi = w >> 16
            for c in tl.static_range(CPW):
                if c * BITS + BITS <= 23:
                    sh = c * BITS  # a constexpr: c is unrolled
                    v = (w & (CODE_MASK << sh)).to(tl.float32, bitcast=True)
                else:
                    sh = c * BITS - 16
                    v = (w_hi & (CODE_MASK << sh)).to(tl.float32, bitcast=True)
                new_parts = ()
                for m in tl.static_range(BLOCK_M):
                    xv = cur[1][(sub * CPW + c) * BLOCK_M + m].to(tl.float32) * _pow2(85 - sh)
                    new_parts = new_parts + (parts[m] + v * xv[None, :],)
                parts = new_parts
                if GROUP_MODE == 1 and (c + 1) % FLUSH == 0:
                    g = ((r * CPW + c) * 32) // GROUP  # the group of the last FLUSH segments
                    if MASK_K:  # past K (part = 0) any valid group will do
                        g = tl.minimum(g, tl.cdiv(K, GROUP) - 1)
                    s = tl.load(s_ptrs + g * stride_sg).to(tl.float32)[:, None]
                    new_accs = ()
                    new_parts = ()
                    for m in tl.static_range(BLOCK_M):
                        new_accs = new_accs + (accs[m] + s * parts[m],)
                        new_parts = new_parts + (tl.zeros((BLOCK_N, 32), tl.float32),)
                    accs = new_accs
                    parts = new_parts
    if GROUP_MODE == 2:
        accs = parts
    offs_m = tl.arange(0, BLOCK_M)
    res = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    for m in tl.static_range(BLOCK_M):
        res = tl.where(offs_m[None, :] == m, tl.sum(accs[m], axis=1)[:, None], res)
    res *= _pow2(64)
    if GROUP_MODE == 2:
        res *= tl.load(s_ptrs).to(tl.float32)[:, None]
    tokens = tl.minimum(offs_m, M - 1)
    k_lo = it0 * (STEP * CPW * 32)
    k_hi = tl.minimum(it1 * (STEP * CPW * 32), K)
    if GROUP_MODE == 1:
        zt = _zero_term(x_ptr, s_ptr, z_ptr, tokens, rows, k_lo, k_hi, stride_xm, stride_sn, stride_sg,
                        GROUP, GPOW, BLOCK_M)
    else:
        zt = _zero_term_channel(x_ptr, s_ptr, z_ptr, tokens, rows, k_lo, k_hi, stride_xm, stride_sn, BLOCK_M)
    res -= tl.trans(zt)
    _finish(res, out_ptr, bias_ptr, ws_ptr, lock_ptr, pid, pid_k, offs_n, offs_m, N, M, stride_om,
            HAS_BIAS, SPLIT_K, BLOCK_N, BLOCK_M)


@triton.jit
def _gemv2_loads(w_ptrs, x_ptr, offs_t, it, R, K, M, stride_xm, CPW: tl.constexpr, BLOCK_M: tl.constexpr,
                 STEP: tl.constexpr, MASK_K: tl.constexpr):
    """Trip `it`'s operands: ([BLOCK_N, 32] words of each of its STEP chunks,
    x[m, segment] for segment (sub * CPW + c) and token m at index (sub * CPW + c) * BLOCK_M + m)."""
    words = ()
    xs = ()
    for sub in tl.static_range(STEP):
        r = it * STEP + sub
        if MASK_K:
            words = words + (tl.load(w_ptrs + r * 32, mask=(r * 32 + offs_t < R * 32)[None, :], other=0),)
        else:
            words = words + (tl.load(w_ptrs + r * 32),)
        for c in tl.static_range(CPW):
            k = (r * CPW + c) * 32 + offs_t
            for m in tl.static_range(BLOCK_M):
                x_row = x_ptr + tl.minimum(m, M - 1) * stride_xm  # tokens past M: any valid row
                if MASK_K:
                    xs = xs + (tl.load(x_row + k, mask=k < K, other=0.0),)
                else:
                    xs = xs + (tl.load(x_row + k),)
    return words, xs


@triton.jit
def _zero_term(x_ptr, s_ptr, z_ptr, offs_m, offs_n, k_lo, k_hi, stride_xm, stride_sn, stride_sg,
               GROUP: tl.constexpr, GPOW: tl.constexpr, BLOCK_M: tl.constexpr):
    """sum_g s[n, g] z[n, g] sum_{k in g, k_lo <= k < k_hi} x[m, k] as [BLOCK_M, BLOCK_N].

    offs_m / offs_n are (clamped, valid) token and row indices. Runs once per program, after the
    K loop: per (row, group) a thread pays two loads and an FFMA instead of an FFMA per element.
    """
    GB: tl.constexpr = max(1, 2048 // (GPOW * BLOCK_M))  # groups per trip: <= 2048 x values
    offs_g = tl.arange(0, GB)
    offs_j = tl.arange(0, GPOW)[None, None, :]
    zt = tl.zeros((BLOCK_M, offs_n.shape[0]), tl.float32)
    for g0 in range(k_lo // GROUP, tl.cdiv(k_hi, GROUP), GB):
        gg = g0 + offs_g
        k = gg[None, :, None] * GROUP + offs_j  # [1, GB, GPOW]
        ok = (offs_j < GROUP) & (k >= k_lo) & (k < k_hi)
        xt = tl.load(x_ptr + offs_m[:, None, None] * stride_xm + k, mask=ok, other=0.0)
        xs = tl.sum(xt.to(tl.float32), axis=2)  # [BLOCK_M, GB]: this split's part of each group
        sz_off = offs_n[:, None] * stride_sn + gg[None, :] * stride_sg
        g_ok = (gg * GROUP < k_hi)[None, :]
        s = tl.load(s_ptr + sz_off, mask=g_ok, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + sz_off, mask=g_ok, other=0.0).to(tl.float32)
        zt += tl.sum(xs[:, None, :] * (s * z)[None, :, :], axis=2)
    return zt


@triton.jit
def _zero_term_channel(x_ptr, s_ptr, z_ptr, offs_m, offs_n, k_lo, k_hi, stride_xm, stride_sn,
                       BLOCK_M: tl.constexpr):
    """`_zero_term` for one group per row: s z times the sum of x over [k_lo, k_hi)."""
    offs = tl.arange(0, 1024)[None, :]
    xs = tl.zeros((BLOCK_M, 1), tl.float32)
    for kb in range(k_lo, k_hi, 1024):
        k = kb + offs
        xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + k, mask=k < k_hi, other=0.0)
        xs += tl.sum(xt.to(tl.float32), axis=1, keep_dims=True)
    s = tl.load(s_ptr + offs_n * stride_sn).to(tl.float32)
    z = tl.load(z_ptr + offs_n * stride_sn).to(tl.float32)
    return xs * (s * z)[None, :]


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
    """One way to run the product: kind 'mma' | 'xw' | 'gemv' | 'gemv2' | 'swz' | 'wg' | 'ms' | 'dequant' and its tile
    sizes.

    'mma' is `_qmm_kernel` (out^T = W x^T, weight tile as the MMA's A operand); 'xw' is
    `_qmm_xw_kernel` (out = x W^T, weight tile as the B operand; step_blocks, x_split, ptx and
    zero_in_tile unused); 'swz' is `_qmm_swz_kernel` (as 'mma', over `shuffle_w4` codes; block_n 64,
    step_blocks = 64-code blocks a trip, ptx = the one-LOP3 conversion); 'wg' is a Gluon kernel of
    `kernels.qmatmul_wgmma` (block_n weight rows, block_m tokens, stages = slots of its copy ring,
    specialized = the warp-specialized one fed by bulk copies); 'ms' is `kernels.qmatmul_mma` (Gluon, mma.sync,
    up to 64 tokens: block_n rows, block_m 8-64 tokens, step_blocks = 64-code blocks a trip, post_zero False =
    the scale in the tile, x_split = x put in the kernel's K order by one gather first, not by each warp;
    specialized = its warp-specialized form fed by bulk copies, stages = its ring slots, halves = 2: each program
    runs its K range as two halves side by side, one ring and 4 MMA warps each, summed in shared memory; wgmma =
    that form's block MMAs on wgmma, any number of tokens, block_m up to 256, 4 or 8 MMA warps).
    """

    kind: str
    block_m: int = 16
    block_n: int = 64
    block_kb: int = 64  # bytes of a row per K-step (gemv2: always one 128-byte chunk of words)
    split_k: int = 1
    step_blocks: int = 1  # K-blocks per (unrolled) loop trip of the mma and gemv2 kernels (xw: 1)
    post_zero: bool = True
    x_split: bool = False
    warps: int = 4
    stages: int = 3
    ptx: bool = False  # mma only: PTX code conversion (`_plane_to_half`)
    zero_in_tile: bool = False  # mma with post_zero: the zero point subtracted in the tile
    specialized: bool = False  # wg, ms: the warp-specialized kernel fed by bulk (TMA) copies
    mma_v2: bool = False  # mma only: tl.dot compiled as mma.sync, not wgmma (`_tune.mma_sync`; sm_90)
    halves: int = 1  # ms specialized: 2 = each program's K range in two halves side by side (`qmatmul_mma`)
    wgmma: bool = False  # ms specialized, scale in the tile: the block MMAs on wgmma, x read from shared memory
    natural: bool = False  # ms wgmma, fp16: x read as it lies (no gather), the codes converted in natural K order
    pdl: int = 0  # ms specialized: a programmatic dependent launch (1: copies after the grid before; 2: weights before)


DEBUG_POISON = False  # tests: fill the split-K workspace with NaN before every launch


def _scratch(device, ws_elems: int, tiles: int):
    """Per-device fp32 workspace and int32 arrival counters for split-K (counters self-reset)."""
    ws = device_buffer("split-k partials", device, ws_elems, torch.float32, 1 << 16)
    lock = device_buffer("split-k counters", device, tiles, torch.int32, 4096, zeroed=True)
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
    if cfg.mma_v2 and cfg.kind != "mma":
        raise ValueError(f"mma_v2 (mma.sync) is a variant of the mma kind only, not {cfg.kind!r}")
    if cfg.kind == "gemv2":
        return _launch_gemv2(cfg, x2, w, bias, out)
    if cfg.kind == "swz":
        return _launch_swz(cfg, x2, w, bias, out)
    if cfg.kind == "wg":
        return _launch_wg(cfg, x2, w, bias, out)
    if cfg.kind == "ms":
        return _launch_ms(cfg, x2, w, bias, out)
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
    if cfg.kind == "xw":
        if cfg.step_blocks != 1:
            raise ValueError("the xw kernel takes one K-block per loop trip (step_blocks=1)")
        _qmm_xw_kernel[grid](*common, BITS=w.bits, GROUP_MODE=mode, DQ=_dq_mode(x2.dtype, w.bits),
                             POST_ZERO=cfg.post_zero and mode != 0, HAS_BIAS=has_bias,
                             UPCAST=not x2.is_cuda, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                             BLOCK_KB=cfg.block_kb, SPLIT_K=cfg.split_k,
                             num_warps=cfg.warps, num_stages=cfg.stages)
        return out
    dq = _dq_mode(x2.dtype, w.bits)
    if cfg.ptx and (not x2.is_cuda or (w.bits, dq) not in PTX_OK):
        raise ValueError(f"ptx configs run on CUDA for (bits, code mode) in {PTX_OK}, not {(w.bits, dq)} on "
                         f"{x2.device.type}")
    with mma_sync(cfg.mma_v2):
        _qmm_kernel[grid](*common, BITS=w.bits, GROUP_MODE=mode, DQ=dq, PTX=cfg.ptx, ZERO_IN_TILE=cfg.zero_in_tile,
                          POST_ZERO=cfg.post_zero and mode != 0, X_SPLIT=cfg.x_split and w.bits == 4,
                          HAS_BIAS=has_bias,
                          UPCAST=not x2.is_cuda, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                          BLOCK_KB=cfg.block_kb, SPLIT_K=cfg.split_k, STEP_BLOCKS=cfg.step_blocks,
                          MMA_V2=cfg.mma_v2, num_warps=cfg.warps, num_stages=cfg.stages)
    return out


def _launch_swz(cfg: Cfg, x2, w: QuantWeight, bias, out):
    M, K = x2.shape
    N = w.out_features
    if w.qswz is None or x2.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError("swz configs need a prepare_weight() result with shuffled codes (EFFOPT_QMM_SWZ=1: "
                         "4-bit, K and the group a multiple of 64) and fp16/bf16 x")
    if cfg.ptx and not x2.is_cuda:
        raise ValueError("ptx configs run on CUDA")
    tiles = triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n)
    ws, lock = _scratch(x2.device, tiles * cfg.split_k * cfg.block_m * cfg.block_n, tiles)
    _qmm_swz_kernel[(tiles, cfg.split_k)](
        x2, w.qswz, w.scales, w.zeros, bias if bias is not None else out, out, ws, lock, M, N, K,
        x2.stride(0), w.qswz.stride(0), w.scales.stride(0), w.scales.stride(1), out.stride(0),
        GROUP=w.group_size if w.group_size < K else 1, GROUP_MODE=2 if w.group_size >= K else 1,
        DQ=_dq_mode(x2.dtype, 4), HAS_BIAS=bias is not None,
        UPCAST=not x2.is_cuda, PTX=cfg.ptx, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, SPLIT_K=cfg.split_k,
        STEP=cfg.step_blocks, SCALE_IN_TILE=not cfg.post_zero, num_warps=cfg.warps, num_stages=cfg.stages)
    return out


def _launch_wg(cfg: Cfg, x2, w: QuantWeight, bias, out):
    from kernels import qmatmul_wgmma

    M, K = x2.shape
    if not qmatmul_wgmma.fits(w.bits, w.group_size, K) or x2.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError("wg configs take 4-bit codes, K and the group a multiple of 64, and fp16/bf16 x")
    if not qmatmul_wgmma.available(x2.device):
        raise ValueError("wg configs run on a Hopper GPU with Triton's Gluon")
    tiles = triton.cdiv(M, cfg.block_m) * triton.cdiv(w.out_features, cfg.block_n)
    ws, lock = _scratch(x2.device, tiles * cfg.split_k * cfg.block_m * cfg.block_n, tiles)
    return qmatmul_wgmma.launch(x2, w.qweight, w.scales, w.zeros, w.group_size, bias, out, ws, lock,
                                block_n=cfg.block_n, block_m=cfg.block_m, split_k=cfg.split_k, warps=cfg.warps,
                                stages=cfg.stages, specialized=cfg.specialized)


def _launch_ms(cfg: Cfg, x2, w: QuantWeight, bias, out):
    from kernels import qmatmul_mma, qmatmul_wgmma

    M, K = x2.shape
    if not qmatmul_mma.fits(w.bits, w.group_size, K, M, cfg.wgmma) or x2.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError("ms configs take 4-bit codes, K and the group a multiple of 64, M <= 64 (any M on wgmma) and "
                         "fp16/bf16 x")
    if not qmatmul_wgmma.available(x2.device) or w.zeros.stride() != w.scales.stride():
        raise ValueError("ms configs run on a Hopper GPU with Triton's Gluon, over zeros strided like the scales")
    tiles = triton.cdiv(M, cfg.block_m) * triton.cdiv(w.out_features, cfg.block_n)
    ws, lock = _scratch(x2.device, tiles * cfg.split_k * cfg.block_m * cfg.block_n, tiles)
    return qmatmul_mma.launch(x2, w.qweight, w.scales, w.zeros, w.group_size, bias, out, ws, lock,
                              block_n=cfg.block_n, block_m=cfg.block_m, split_k=cfg.split_k, warps=cfg.warps,
                              step=cfg.step_blocks, scale_in_tile=not cfg.post_zero, stages=cfg.stages,
                              gather=cfg.x_split, specialized=cfg.specialized, halves=cfg.halves, wgmma=cfg.wgmma,
                              natural=cfg.natural, pdl=cfg.pdl)


def _launch_gemv2(cfg: Cfg, x2, w: QuantWeight, bias, out):
    M, K = x2.shape
    N = w.out_features
    if not _gemv2_fits(w.bits, w.group_size, K) or M > 16:
        raise ValueError(f"gemv2 needs M <= 16 and g a multiple of 32 (or per-channel); got M={M}, g={w.group_size}")
    words = w.qwords if w.qwords is not None else pack_words(w.qweight, w.bits, K)  # unprepared: per call
    chunks = words.shape[1] // 32
    cpw = 32 // w.bits
    per_channel = w.group_size >= K
    block_m = triton.next_power_of_2(M)
    tiles = triton.cdiv(N, cfg.block_n)
    ws, lock = _scratch(x2.device, tiles * cfg.split_k * block_m * cfg.block_n, tiles)
    _gemv2_kernel[(tiles, cfg.split_k)](
        x2, words, w.scales, w.zeros, bias if bias is not None else out, out, ws, lock,
        M, N, K, chunks,
        x2.stride(0), words.stride(0), w.scales.stride(0), w.scales.stride(1), out.stride(0),
        GROUP=1 if per_channel else w.group_size, BITS=w.bits, GROUP_MODE=2 if per_channel else 1,
        FLUSH=cpw if per_channel else min(w.group_size // 32, cpw),
        GPOW=1 if per_channel else triton.next_power_of_2(w.group_size),
        MASK_K=K % (32 * cpw) != 0 or chunks % cfg.step_blocks != 0,
        HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=cfg.block_n, STEP=cfg.step_blocks,
        SPLIT_K=cfg.split_k, STAGES=cfg.stages, num_warps=cfg.warps, num_stages=1)
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


GEMV2_MAX_M = 2  # candidates() offers gemv2 up to here (H200, W4 g128: 1.8x the MMA at M=1, 0.5x at M=4)


def gemv2_configs(M: int, w: QuantWeight) -> list:
    """gemv2 launch configs for M tokens, most promising first (the benchmark times them all).

    On an H200 (W4 g128, M = 1) what mattered was staying at <= 128 registers, so that 4
    programs of 4 warps fit an SM and the grid is one wave; split-K brings the programs near
    `per_sm` per SM, keeping >= 2 trips per split. Prefetching a trip ahead (stages 2) doubles the
    operand registers and was slower everywhere measured; it stays as a candidate for the benchmark.
    More chunks a trip (more loads in flight a thread) helped most: 1 -> 2 -> 4 chunks took 8192x8192
    from 25.5 to 17.1 to 15.8 us (4 chunks: 128 registers); 3 chunks, 128 rows, 3 or 5 programs per SM
    and staging the words through shared memory (Triton's pipeliner, cp.async or bulk copies) did not.
    """
    if w.qwords is None or M > 16:
        return []
    if M <= 2:  # (block_n, step, stages, programs per SM), 4 warps each
        shapes = [(64, 4, 1, 4), (64, 2, 1, 4), (32, 2, 1, 4), (64, 2, 2, 2), (64, 1, 1, 4)]
    elif M <= 4:
        shapes = [(32, 1, 1, 4), (32, 2, 1, 4), (16, 1, 1, 8)]
    else:  # correct, but FFMA-bound: the MMA kernel wins from here on
        shapes = [(16, 1, 1, 4)]
    return [gemv2_cfg(M, w, bn, step, stages, per_sm) for bn, step, stages, per_sm in shapes]


def gemv2_cfg(M: int, w: QuantWeight, block_n: int, step: int, stages: int, per_sm: int, warps: int = 4) -> Cfg:
    """A gemv2 config whose split-K brings the programs near `per_sm` per SM (>= 2 trips per split)."""
    tiles, trips = triton.cdiv(w.out_features, block_n), triton.cdiv(w.qwords.shape[1] // 32, step)
    sk = max(1, min(round(per_sm * _sms(w.qweight.device) / tiles), trips // 2, 32))
    return Cfg("gemv2", triton.next_power_of_2(M), block_n, 128, sk, step, warps=warps, stages=stages)


XW_MIN_M = 32  # candidates() offers the x @ W^T kernel (`_qmm_xw_kernel`) from here on

# (block_m, block_n, codes per K-step, warps, stages, post_zero, split-K options, programs per SM)
_XW_SHAPES_SMALL = [(64, 128, 128, 4, 4, False, 2, 1), (64, 64, 128, 4, 4, False, 1, 2),
                    (64, 128, 64, 4, 4, False, 1, 1), (64, 128, 128, 8, 3, True, 1, 1)]
_XW_SHAPES_LARGE = [(128, 128, 128, 8, 3, False, 2, 1), (128, 128, 64, 8, 4, False, 1, 1),
                    (128, 256, 64, 8, 3, False, 1, 1), (64, 128, 128, 4, 4, False, 1, 1)]


def xw_configs(M: int, w: QuantWeight) -> list:
    """`_qmm_xw_kernel` launch configs for M >= XW_MIN_M tokens (none below; the tuner times them).

    64-row tiles up to M = 64, 128-row tiles beyond; K-steps of 128 or 64 codes, or the longest
    step that stays inside one group when g is shorter (none when even 16 bytes straddle groups:
    2-bit g32); split-K brings the programs near one or two per SM (as `_splits`), since at M = 64
    a 4096-row layer has only 32 tiles of 128 columns.
    """
    if M < XW_MIN_M or w.bits not in KERNEL_BITS:
        return []
    cpb = 8 // w.bits
    kbs = _uniform_kbs(w, 128)
    sms = _sms(w.qweight.device)
    cfgs = []
    for bm, bn, codes, warps, stages, post, n_sk, per_sm in (_XW_SHAPES_SMALL if M <= 64 else _XW_SHAPES_LARGE):
        kb = max([k for k in kbs if k * cpb <= codes], default=0)
        if not kb:
            continue
        tiles = triton.cdiv(M, bm) * triton.cdiv(w.out_features, bn)
        target = per_sm * sms
        sks = _splits(tiles, triton.cdiv(w.row_bytes, kb), target)
        sks = sks if n_sk > 1 else [min(sks, key=lambda s: abs(math.log2(tiles * s / target)))]
        for sk in sks:
            cfg = Cfg("xw", bm, bn, kb, sk, post_zero=post, warps=warps, stages=stages)
            if cfg not in cfgs:
                cfgs.append(cfg)
    return cfgs


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
        if M <= GEMV2_MAX_M:  # CUDA-core gemv2 first: the untimed default for 1-2 tokens
            cands = gemv2_configs(M, w)[:2] + cands
        cands = cands + xw_configs(M, w) + _variants(cands, w, dtype) + swz_configs(M, w)  # no xw below XW_MIN_M
        return cands + wg_configs(M, w) + mma_v2_configs(cands, w) + ms_configs(M, w) + ms_wgmma_configs(M, w, dtype)
    kb = min(64, (_uniform_kbs(w, 128) or [32])[-1])  # x tile of 128 x 2*kb fp16 per stage
    cands = [Cfg("mma", 128, 128, kb, 1, post_zero=False, x_split=True, warps=8, stages=3),
             Cfg("mma", 128, 128, max(16, kb // 2), 1, post_zero=False, x_split=True, warps=8, stages=4),
             Cfg("mma", 64, 128, kb, 1, post_zero=False, x_split=True, warps=4, stages=4),
             Cfg("mma", 128, 64, kb, 1, post_zero=False, x_split=True, warps=4, stages=4),
             Cfg("dequant")]
    return (cands + xw_configs(M, w) + _variants(cands, w, dtype) + swz_configs(M, w) + wg_configs(M, w)
            + ms_wgmma_configs(M, w, dtype))


def mma_v2_configs(cands: list, w: QuantWeight) -> list:
    """On sm_90, for up to 16 tokens: the mma candidates again (of them, the PTX-conversion ones when there are
    any), compiled with mma.sync (appended: never the untimed default). An H200 sweep of other tiles, splits,
    stages and K-blocks a trip for them found none faster than these copies (results/kernels.md)."""
    dev = w.qweight.device
    if not MMA_V2_CANDIDATES or dev.type != "cuda" or torch.cuda.get_device_capability(dev)[0] != 9:
        return []
    mma = [c for c in cands if c.kind == "mma" and c.block_m == 16]
    return [dataclasses.replace(c, mma_v2=True) for c in ([c for c in mma if c.ptx] or mma)]


def ms_configs(M: int, w: QuantWeight) -> list:
    """`kernels.qmatmul_mma` configs for up to 64 tokens on a Hopper GPU (appended: never the untimed default),
    split-K near 4 programs per SM (2 from 32 tokens, where a thread holds 130-200 registers). Up to 16 tokens:
    two 16-row MMA tiles a warp (64 rows on 2 warps, 128 on 4) or one (64 rows on 4), 2 or 4 blocks of 64 codes
    a trip; one block a trip and 8 blocks were slower on an H200, and so was x reordered by a gather first
    (results/kernels.md). From 32 tokens: 64 rows on 4 warps, 1, 2 or 4 blocks a trip, x gathered, the scale
    in the tile or after the MMA. Then the same kernel fed by a producer warp's bulk copies (`specialized`),
    where the weight's scales are group-major (`prepare_weight`), also with each program's K range run as two
    halves side by side (`halves`: 8192^2 at 16 tokens 12.6 against 14.3 us on an H200, results/kernels.md); up to
    16 tokens those launch as programmatic dependents (PDL_MODE)."""
    from kernels import qmatmul_mma, qmatmul_wgmma

    K = w.in_features
    group = min(w.group_size, K)
    if not MS_CANDIDATES or not qmatmul_wgmma.available(w.qweight.device) or not qmatmul_mma.fits(w.bits, group, K, M):
        return []
    bm = max(8, triton.next_power_of_2(M))
    many = bm >= qmatmul_mma.X_GATHER_MIN_M
    gpb = group // 64
    fit = [s for s in (1, 2, 4) if (gpb % s == 0 or s % gpb == 0) and (K // 64) % s == 0]  # trips: whole groups
    steps = fit if many else ([s for s in fit if s > 1] or fit)
    cfgs = []
    for bn, warps in ((64, 4),) if many else ((64, 2), (64, 4), (128, 4)):
        tiles = triton.cdiv(w.out_features, bn)
        for step in steps:
            for sk in _splits(tiles, K // (64 * step), (2 if many else 4) * _sms(w.qweight.device)):
                for post in ((True, False) if many else (True,)):
                    cfgs.append(Cfg("ms", bm, bn, 32, sk, step, post_zero=post, x_split=many, warps=warps, stages=2))
    # the warp-specialized form (bulk copies through 3-4 ring slots, 4 MMA warps), over group-major scales:
    # 2 blocks a trip from 32 tokens (1 block was slower on an H200), split-K near 3 programs an SM; then each
    # program as two halves of its K range (one program an SM: split-K near 1 an SM, 2 trips a half at least)
    for bn in (64,) if many else (64, 128):
        if not qmatmul_wgmma.scale_pair_fits(w.scales, w.zeros, bn):
            continue
        tiles = triton.cdiv(w.out_features, bn)
        for step in [s for s in ((2,) if many else (2, 4)) if s in fit]:
            for sk in _splits(tiles, K // (64 * step), 3 * _sms(w.qweight.device)):
                for stages in (3, 4):
                    for post in ((True, False) if many else (True,)):
                        cfgs.append(Cfg("ms", bm, bn, 32, sk, step, post_zero=post, x_split=many, warps=4,
                                        stages=stages, specialized=True, pdl=0 if many else PDL_MODE))
    halves_steps = [s for s in ((2,) if many else (4,)) if s in fit]
    for step in halves_steps if qmatmul_wgmma.scale_pair_fits(w.scales, w.zeros, 64) else ():
        for sk in _splits(triton.cdiv(w.out_features, 64), K // (128 * step), _sms(w.qweight.device)):
            for stages in (3, 4):
                cfgs.append(Cfg("ms", bm, 64, 32, sk, step, post_zero=not many, x_split=many, warps=4,
                                stages=stages, specialized=True, halves=2, pdl=0 if many else PDL_MODE))
    return cfgs


def ms_wgmma_configs(M: int, w: QuantWeight, dtype=torch.float16) -> list:
    """The warp-specialized `kernels.qmatmul_mma` kernel on wgmma from 32 tokens (appended: never the untimed
    default): 64 rows on one warpgroup (from 128 tokens also 128 rows on two), token tiles of up to 128 (and 256
    from 256 tokens), 2 or 4 blocks a trip, split-K near 1 and 2 programs an SM, 3 or 4 ring slots where they
    fit. The tuner's picks on an H200 at 8192^2 (results/kernels.md): 64 tokens 24.2 us (32.4 on mma.sync), 128
    tokens 32.6 against cuBLAS fp16 40.0; at 16 tokens it was slower than the mma.sync form. With fp16 x each
    reads x as it lies (`Cfg.natural`; NATURAL_MODE "0": gathered, "both": both forms)."""
    from kernels import qmatmul_mma, qmatmul_wgmma

    K = w.in_features
    group = min(w.group_size, K)
    if (M < 32 or not MS_CANDIDATES or not qmatmul_wgmma.available(w.qweight.device)
            or not qmatmul_mma.fits(w.bits, group, K, M, wgmma=True)
            or not qmatmul_wgmma.scale_pair_fits(w.scales, w.zeros, 64)):
        return []
    gpb = group // 64
    steps = [s for s in (2, 4) if (gpb % s == 0 or s % gpb == 0) and (K // 64) % s == 0]
    sms = _sms(w.qweight.device)
    cfgs = []
    tiles_m = sorted({min(128, triton.next_power_of_2(M))} | ({256} if M >= 256 else set()))
    shapes = [(bm, 64, 4) for bm in tiles_m] + [(bm, 128, 8) for bm in tiles_m if M >= 128]  # rows, MMA warps
    for bm, bn, warps in shapes:
        tiles = triton.cdiv(M, bm) * triton.cdiv(w.out_features, bn)
        for step in steps:
            iters = K // (64 * step)
            for sk in sorted(set(_splits(tiles, iters, sms)) | set(_splits(tiles, iters, 2 * sms))):
                for stages in (3, 4):
                    if qmatmul_mma.ws_smem_bytes(bn, bm, step, stages, group) <= qmatmul_mma.SMEM_BYTES:
                        cfgs.append(Cfg("ms", bm, bn, 32, sk, step, post_zero=False, warps=warps, stages=stages,
                                        specialized=True, wgmma=True))
    if dtype == torch.float16 and NATURAL_MODE != "0":
        natural = [dataclasses.replace(c, natural=True) for c in cfgs]
        cfgs = cfgs + natural if NATURAL_MODE == "both" else natural
    return cfgs


def swz_configs(M: int, w: QuantWeight) -> list:
    """`_qmm_swz_kernel` configs for 3-256 tokens (appended: never the untimed default), when the weight
    has shuffled codes: 64 rows, up to 128 tokens a program, 1-4 blocks of 64 codes a trip (sm_90 SASS at
    M = 16, 4 blocks: 473 loop instructions per 128 codes a thread against 615 for the mma pick), split-K
    near 3 programs per SM, the scale after the MMA up to 64 tokens and in the tile beyond; on CUDA with
    the one-LOP3 conversion."""
    if w.qswz is None or not 2 < M <= 256:
        return []
    bm = min(128, max(16, triton.next_power_of_2(M)))
    tiles, blocks = triton.cdiv(M, bm) * triton.cdiv(w.out_features, 64), w.in_features // 64
    ptx = w.qswz.device.type == "cuda"
    # (blocks a trip, warps); 128 tokens, 8 warps, 2 blocks a trip: sm_90 SASS converts the tile through
    # shared memory (both warpgroups need it), so one block a trip there
    shapes = [(2, 4), (4, 4)] if bm <= 32 else ([(1, 4), (2, 4)] if bm == 64 else [(1, 8), (1, 4)])
    return [Cfg("swz", bm, 64, 32, sk, step, post_zero=bm <= 64, warps=warps, stages=3, ptx=ptx)
            for step, warps in shapes
            for sk in _splits(tiles, triton.cdiv(blocks, step), 3 * _sms(w.qweight.device))]


# The Gluon wgmma kernel is correct on an H200 but slower than the Triton kernels at every M timed
# (results/kernels.md, session of 2026-11-30 19:25-20:10 UTC), so its configs are offered only with EFFOPT_QMM_WG=1
WG_CANDIDATES = os.environ.get("EFFOPT_QMM_WG", "0") == "1"


def wg_configs(M: int, w: QuantWeight) -> list:
    """`kernels.qmatmul_wgmma` configs for M >= 16 on a Hopper GPU (appended: never the untimed default):
    up to 128 tokens a program; 64 weight rows a warpgroup, or 128 / 256 rows over two warpgroups,
    since each program reads its x tile once per K-step whatever its rows (at M = 128 and 64 rows
    x is read from L2 N / 64 times, 8x the codes' bytes); split-K near one or two programs per SM."""
    from kernels import qmatmul_wgmma

    if (not WG_CANDIDATES or M < 16 or not qmatmul_wgmma.available(w.qweight.device)
            or not qmatmul_wgmma.fits(w.bits, w.group_size, w.in_features)
            or not (qmatmul_wgmma.scales_fit(w.scales, 256) and qmatmul_wgmma.scales_fit(w.zeros, 256))):
        return []
    bm = min(128, triton.next_power_of_2(M))
    steps = w.in_features // qmatmul_wgmma.BLOCK_K
    sms = _sms(w.qweight.device)
    cfgs = []
    for bn, warps in ((64, 4), (128, 8), (256, 8)):
        tile_m = min(bm, 64) if bn == 256 else bm  # 256 x 128 would hold 128 accumulator registers a thread
        tiles = triton.cdiv(M, tile_m) * triton.cdiv(w.out_features, bn)
        for sk in _splits(tiles, steps, 2 * sms):
            for stages in (4, 6):  # cp.async: steps loaded 2 / 4 ahead; warp-specialized: 4 / 6 slots
                cfgs.append(Cfg("wg", tile_m, bn, 32, sk, warps=warps, stages=stages))
                cfgs.append(Cfg("wg", tile_m, bn, 32, sk, warps=warps, stages=stages, specialized=True))
    return cfgs


def _variants(cands: list, w: QuantWeight, dtype) -> list:
    """Copies of the mma candidates, appended so the untimed default never changes: the zero point
    subtracted in the tile (of post_zero configs), and, when PTX_CANDIDATES is set,
    the weight is on CUDA and (bits, code mode) is one PTX_OK serves, each with the PTX conversion."""
    mma = [c for c in cands if c.kind == "mma"]
    zero_in_tile = [dataclasses.replace(c, zero_in_tile=True) for c in mma if c.post_zero]
    if not PTX_CANDIDATES or w.qweight.device.type != "cuda" or (w.bits, _dq_mode(dtype, w.bits)) not in PTX_OK:
        return zero_in_tile
    return zero_in_tile + [dataclasses.replace(c, ptx=True) for c in mma + zero_in_tile]


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
                   x.dtype, w.scales.stride(), bias is not None, w.qswz is not None)  # swz: a candidate or not
            cfg = choose(key, candidates(M, w, x.dtype), lambda c: _launch(c, x2, w, bias, out2))
        _launch(cfg, x2, w, bias, out2)
    return out2.view(*x.shape[:-1], N)
