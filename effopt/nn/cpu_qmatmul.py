"""QuantLinear's CPU fast path: torch's own CPU quantized-matmul ops (the ones torchao / gpt-fast use).

Why: dequantizing the whole packed weight on every call made 1-token decode ~6x slower than float.
These ops read a once-re-packed integer weight directly, so no float weight is ever materialized.

What the ops take (torch 2.13, checked by experiment; the tests pin it):
- `_weight_int4pack_mm_for_cpu(x, packed, g, sz)`: codes 0..15, w = (q - 8) * sz[..., 0] + sz[..., 1]
  per group of g in {32, 64, 128, 256} columns; N % 16 == 0 and K % g == 0.
- `_weight_int8pack_mm(x, w_int8, s)`: w = w_int8 * s[n], one scale per row. bf16 inputs need K % 16 == 0
  (other K give garbage or a crash).
- Both are fast only for bfloat16 activations: their float32/float16 paths are scalar loops ~15x slower
  than F.linear. So every input is computed in bfloat16 and cast back: the fast path has bfloat16 precision
  (max error 2e-3 .. 6e-3 of the output's scale against dequantize() + F.linear in float32, i.e. bf16
  rounding of x and y; the quantization error itself is ~10x larger).

Our layout (kernels/LAYOUT.md) is w = (q - z) * s per group, so each case is mapped exactly:
- "int4" (bits <= 4; 2/3-bit codes fit in 4 bits): zero term (8 - z) * s.
- "int8" (8 bits, one group per row): int8 = q - 128, plus sum(x) * (128 - z) * s when asymmetric.
- "int8x2" (8 bits, grouped): q = 16 h + l, two int4 matmuls (h with scale 16 s, l with scale s): about
  float32 speed at SmolLM2 sizes (one call per group with the int8 op was ~2x slower still).
The op's group size is any supported size dividing ours (scales repeat); K is zero-padded to a multiple
of it (x gets zero columns) and N to a multiple of 16. `prepare` returns None when no supported size
divides the group size (e.g. 16 or 48): the caller then dequantizes.

The re-packed copy costs as much memory as the packed weight itself (it lives beside it, never saved).
Set EFFOPT_CPU_QMATMUL=0 (or `cpu_qmatmul.ENABLED = False`) to always dequantize (exact float path).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# the *_for_cpu int4 ops arrived in torch 2.6 (pyproject allows 2.4): without them, always dequantize
ENABLED = (os.environ.get("EFFOPT_CPU_QMATMUL", "1") != "0" and hasattr(torch, "_weight_int4pack_mm_for_cpu")
           and hasattr(torch, "_weight_int8pack_mm"))
# Above this many rows (tokens) dequantize + F.linear is faster: the ops' cost grows with rows while
# dequantizing is paid once per call (crossovers measured at [1536, 576]: ~300, ~250, ~128 rows).
# Decode, speculative verify and short prompts stay below them.
MAX_ROWS = {"int4": 256, "int8": 192, "int8x2": 96}
OP_GROUPS = (256, 128, 64, 32)
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_COMPUTE = torch.bfloat16


@dataclass
class Prepared:
    kind: str  # "int4", "int8" or "int8x2"
    n: int  # output features
    k: int  # input features
    k_pad: int  # K the op sees (x is zero-padded up to it)
    group: int  # the op's group size (int4 kinds)
    weights: tuple  # int4: (packed,); int8x2: (packed_hi, packed_lo); int8: (w_int8,)
    scales: tuple  # int4: (sz,); int8x2: (sz_hi, sz_lo); int8: (s,) (all bfloat16)
    correction: torch.Tensor | None = None  # int8 asymmetric: (128 - z) * s [N], float32


def usable(x: torch.Tensor, in_features: int, bits: int, group_size: int) -> bool:
    """Whether the fast path may run for this input and beats dequantize + F.linear at its row count
    (checked before `prepare`, so a weight only ever called with many rows is never re-packed)."""
    op = kind(in_features, bits, group_size)
    return (ENABLED and op is not None and x.device.type == "cpu" and x.dtype in _DTYPES
            and x.shape[-1] == in_features and 0 < x.numel() // in_features <= MAX_ROWS[op])


def kind(k: int, bits: int, group_size: int) -> str | None:
    """The op `prepare` uses for a weight of K = k inputs: int8, int4 or int8x2 (None: none applies)."""
    if bits == 8 and (group_size <= 0 or group_size >= k):
        return "int8"
    if bits > 8 or op_group(k, group_size) is None:
        return None
    return "int4" if bits <= 4 else "int8x2"


def op_group(k: int, group_size: int) -> int | None:
    """The op group size (dividing ours, so scales just repeat) needing the least K padding; None if none."""
    g = k if group_size <= 0 else group_size
    candidates = [c for c in OP_GROUPS if g >= k or g % c == 0]  # one group per row: any size works
    if not candidates:
        return None
    return min(candidates, key=lambda c: (-(-k // c) * c, -c))


def _per_op_group(t: torch.Tensor, k: int, group_size: int, op_g: int, k_pad: int) -> torch.Tensor:
    """[N, G] per-group values -> [N, k_pad // op_g] per op group."""
    g = k if group_size <= 0 else group_size
    idx = torch.arange(0, k_pad, op_g, device=t.device) // g
    return t.float()[:, idx]


def _pack_int4(codes: torch.Tensor, scale: torch.Tensor, zero_term: torch.Tensor, n_pad: int, k_pad: int):
    """codes [N, K] in 0..15, per-op-group scale/zero term [N, J] -> (packed, sz [J, N_pad, 2] bf16)."""
    n, k = codes.shape
    q = torch.full((n_pad, k_pad), 8, dtype=torch.int32)
    q[:n, :k] = codes
    sz = torch.zeros(n_pad, scale.shape[1], 2)
    sz[:n, :, 0], sz[:n, :, 1] = scale, zero_term
    return torch._convert_weight_to_int4pack_for_cpu(q, 2), sz.transpose(0, 1).contiguous().to(_COMPUTE)


@torch.no_grad()
def prepare(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
            group_size: int) -> Prepared | None:
    """Re-pack unpacked codes [N, K] and per-group scales/zeros [N, G] for the ops; None if none applies."""
    n, k = codes.shape
    op = kind(k, bits, group_size)
    if op is None:
        return None
    codes = codes.cpu().to(torch.int32)
    scales, zeros = scales.cpu().float(), zeros.cpu().float()
    if op == "int8":
        k_pad = -(-k // 16) * 16
        w = torch.zeros(n, k_pad, dtype=torch.int8)
        w[:, :k] = (codes - 128).to(torch.int8)
        s, z = scales[:, 0], zeros[:, 0]
        corr = (128 - z) * s
        return Prepared("int8", n, k, k_pad, 0, (w,), (s.to(_COMPUTE),),
                        None if bool((z == 128).all()) else corr)
    op_g = op_group(k, group_size)
    k_pad, n_pad = -(-k // op_g) * op_g, -(-n // 16) * 16
    s, z = (_per_op_group(t, k, group_size, op_g, k_pad) for t in (scales, zeros))
    if op == "int4":
        # Centre b-bit codes on the op's 8 (q + c, z + c): keeps (q - 8) s and the zero term small, else
        # their bf16 roundings cancel badly at 2 bits (~3% error instead of ~0.4%).
        c = 8 - 2 ** (bits - 1)
        packed, sz = _pack_int4(codes + c, s, (8 - z - c) * s, n_pad, k_pad)
        return Prepared("int4", n, k, k_pad, op_g, (packed,), (sz,))
    # 8-bit grouped: w = (16 h + l - z) s = [(h - 8) 16 s + 16 s (8 - a)] + [(l - 8) s + s (8 - b)],
    # with z = 16 a + b (a = floor(z / 16)), so each half's zero term stays small.
    a = torch.floor(z / 16)
    hi, hi_sz = _pack_int4(codes >> 4, 16 * s, 16 * s * (8 - a), n_pad, k_pad)
    lo, lo_sz = _pack_int4(codes & 15, s, s * (8 - (z - 16 * a)), n_pad, k_pad)
    return Prepared("int8x2", n, k, k_pad, op_g, (hi, lo), (hi_sz, lo_sz))


def matmul(x: torch.Tensor, prep: Prepared, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ W^T (+ bias) through the ops; computed in bfloat16, returned in x's dtype. No backward."""
    shape = x.shape
    x2 = x.reshape(-1, prep.k)
    xc = x2.to(_COMPUTE)
    if prep.k_pad != prep.k:
        xc = F.pad(xc, (0, prep.k_pad - prep.k))
    xc = xc.contiguous()
    if prep.kind == "int8":
        y = torch._weight_int8pack_mm(xc, prep.weights[0], prep.scales[0])
        if prep.correction is not None:
            y = y.float() + x2.float().sum(-1, keepdim=True) * prep.correction
    else:
        y = torch._weight_int4pack_mm_for_cpu(xc, prep.weights[0], prep.group, prep.scales[0])
        if prep.kind == "int8x2":
            y = y.float() + torch._weight_int4pack_mm_for_cpu(xc, prep.weights[1], prep.group, prep.scales[1])
        y = y[:, :prep.n]
    y = y.to(x.dtype)
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y.reshape(*shape[:-1], prep.n)
