"""Round-to-nearest (RTN) weight quantization: symmetric or asymmetric, per-tensor, per-channel or
group-wise, 2-8 bits, with an optional MSE-optimal clipping search (the outlier problem: shrinking
the range costs a few clipped outliers but buys finer steps for every other weight).

Codes are unsigned in [0, 2**bits - 1]; dequantization is (q - zero) * scale (kernels/LAYOUT.md).
"""

from __future__ import annotations

import torch


def group_view(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reshape [N, K] into [N, G, g] groups (zero-padded) plus a validity mask of the same shape.

    `group_size <= 0` means one group per row. The last group may be short (K % g != 0).
    """
    n, k = w.shape
    g = k if group_size <= 0 else group_size
    groups = -(-k // g)
    padded = torch.zeros(n, groups * g, dtype=w.dtype, device=w.device)
    padded[:, :k] = w
    valid = torch.zeros(groups * g, dtype=torch.bool, device=w.device)
    valid[:k] = True
    return padded.view(n, groups, g), valid.view(1, groups, g).expand(n, groups, g)


def scale_zero_from_range(wmin: torch.Tensor, wmax: torch.Tensor, bits: int, symmetric: bool):
    """Scale and zero point (float, integer-valued) covering [wmin, wmax] with `bits` bits."""
    maxq = 2**bits - 1
    if symmetric:
        absmax = torch.maximum(wmin.abs(), wmax.abs()).clamp_min(1e-12)
        scale = 2 * absmax / maxq
        zero = torch.full_like(scale, 2 ** (bits - 1))
    else:
        wmin, wmax = wmin.clamp_max(0), wmax.clamp_min(0)  # keep 0 exactly representable
        scale = ((wmax - wmin) / maxq).clamp_min(1e-12)
        zero = torch.round(-wmin / scale).clamp(0, maxq)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Round w / scale + zero to codes in [0, 2**bits - 1] (broadcasting scale/zero)."""
    return torch.clamp(torch.round(w / scale) + zero, 0, 2**bits - 1)


def quantize_weight(w: torch.Tensor, bits: int, group_size: int = 128, symmetric: bool = False,
                    clip_search: bool = False, grid: int = 20, max_shrink: float = 0.5):
    """Quantize a weight matrix with RTN.

    Args:
        w: [N, K] weight (any float dtype; computed in float32).
        bits: 2..8.
        group_size: columns per group; <= 0 means per-channel (one group per row). For per-tensor
            quantization pass `group_size=0` and a w reshaped to one row.
        symmetric: zero point fixed at 2**(bits-1).
        clip_search: search range shrink factors in [1 - max_shrink, 1] per group, keeping the one
            with the least squared error.

    Returns:
        codes uint8 [N, K], scales float32 [N, G], zeros float32 [N, G].
    """
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in 2..8, got {bits}")
    n, k = w.shape
    groups, valid = group_view(w.float(), group_size)
    inf = torch.tensor(float("inf"), device=w.device)
    wmin = torch.where(valid, groups, inf).amin(-1, keepdim=True)
    wmax = torch.where(valid, groups, -inf).amax(-1, keepdim=True)
    scale, zero = scale_zero_from_range(wmin, wmax, bits, symmetric)
    if clip_search:
        best_err = torch.full_like(scale, float("inf"))
        best_scale, best_zero = scale.clone(), zero.clone()
        for i in range(grid + 1):
            shrink = 1 - max_shrink * i / grid
            s, z = scale_zero_from_range(wmin * shrink, wmax * shrink, bits, symmetric)
            deq = (quantize_codes(groups, s, z, bits) - z) * s
            err = ((deq - groups).pow(2) * valid).sum(-1, keepdim=True)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale, best_zero = torch.where(better, s, best_scale), torch.where(better, z, best_zero)
        scale, zero = best_scale, best_zero
    codes = quantize_codes(groups, scale, zero, bits).view(n, -1)[:, :k]
    return codes.to(torch.uint8), scale.squeeze(-1), zero.squeeze(-1)


def quantize_weight_granular(w: torch.Tensor, bits: int, granularity: str = "group", group_size: int = 128,
                             symmetric: bool = False, clip_search: bool = False):
    """RTN at a named granularity, always in QuantLinear's [N, G] scale layout.

    Args:
        granularity: 'group' (group_size columns; -1 = per-channel), 'channel' (one scale per output
            row) or 'tensor' (one scale and zero point for the whole matrix, repeated per row).

    Returns:
        codes uint8 [N, K], scales [N, G], zeros [N, G], and the group size to store (-1 unless 'group').
    """
    if granularity == "group":
        return (*quantize_weight(w, bits, group_size, symmetric, clip_search), group_size)
    if granularity == "channel":
        return (*quantize_weight(w, bits, -1, symmetric, clip_search), -1)
    if granularity != "tensor":
        raise ValueError(f"granularity must be group, channel or tensor, got {granularity!r}")
    n, k = w.shape
    codes, scale, zero = quantize_weight(w.reshape(1, -1), bits, -1, symmetric, clip_search)
    return codes.view(n, k), scale.expand(n, 1).clone(), zero.expand(n, 1).clone(), -1


def dequantize_weight(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[N, K] codes + per-group scale/zero -> float weight [N, K]."""
    n, k = codes.shape
    g = k if group_size <= 0 else group_size
    idx = torch.arange(k, device=codes.device) // g
    return ((codes.float() - zeros.float()[:, idx]) * scales.float()[:, idx]).to(dtype)


def fake_quantize(w: torch.Tensor, bits: int, group_size: int = 128, symmetric: bool = False,
                  clip_search: bool = False) -> torch.Tensor:
    """Quantize then dequantize (the weight the quantized model will really use)."""
    codes, scales, zeros = quantize_weight(w, bits, group_size, symmetric, clip_search)
    return dequantize_weight(codes, scales, zeros, group_size, w.dtype)
