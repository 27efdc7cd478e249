"""Clipping search on the output error (AWQ's auto-clip): per output row and column group, shrink
the quantization range by r in [1 - max_shrink, 1] to minimize that group's contribution to the
layer's squared output error over the calibration tokens, e^T (X_g^T X_g) e with e = w - Q_r(w).
Groups are searched independently, so only the diagonal blocks X_g^T X_g of X^T X are needed.

The search loop (`search_shrink`) takes the grid's quantizer as a function, so integer groups
(range [r * min, r * max]) and absmax blocks (NF4: range +-r * absmax) share it.
"""

from __future__ import annotations

from typing import Callable

import torch

from effopt.methods.quant.rtn import quantize_codes, scale_zero_from_range


def block_gram(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """Diagonal blocks of x^T x per column group: [G, g, g] (short last group zero-padded)."""
    t, k = x.shape
    g = k if group_size <= 0 else group_size
    blocks = -(-k // g)
    xp = torch.zeros(t, blocks * g, dtype=torch.float32, device=x.device)
    xp[:, :k] = x
    xb = xp.view(t, blocks, g).transpose(0, 1)  # [G, T, g]
    return xb.transpose(1, 2) @ xb


def diag_blocks(h: torch.Tensor, group_size: int) -> torch.Tensor:
    """The [G, g, g] diagonal blocks of a [K, K] matrix (short last block zero-padded)."""
    k = h.shape[0]
    g = k if group_size <= 0 else group_size
    blocks = -(-k // g)
    hp = torch.zeros(blocks * g, blocks * g, dtype=h.dtype, device=h.device)
    hp[:k, :k] = h
    idx = torch.arange(blocks, device=h.device)
    return hp.view(blocks, g, blocks, g)[idx, :, idx, :]


def padded_groups(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """[N, K] -> float32 [N, G, g] column groups, the short last group zero-padded (zeros quantize
    to exactly zero and never widen a range that already holds 0, so no mask is needed)."""
    n, k = weight.shape
    g = k if group_size <= 0 else group_size
    w = weight.float()
    if k % g:
        w = torch.nn.functional.pad(w, (0, g - k % g))
    return w.view(n, -1, g)


@torch.no_grad()
def search_shrink(groups: torch.Tensor, gram: torch.Tensor, dequant_at: Callable[[float], torch.Tensor],
                  n_grid: int = 20, max_shrink: float = 0.5) -> torch.Tensor:
    """Per (row, group) shrink r in [1 - max_shrink, 1] minimizing e^T gram_g e, e = Q_r(w) - w.

    Args:
        groups: weights [N, G, g] (zero-padded).
        gram: diagonal blocks [G, g, g] of X^T X.
        dequant_at: r -> the groups quantized with their range shrunk by r, dequantized [N, G, g].

    Returns:
        r [N, G].
    """
    best_err = torch.full(groups.shape[:2], float("inf"), device=groups.device)
    best_r = torch.ones_like(best_err)
    gram_t = gram.float()
    for i in range(n_grid + 1):
        r = 1 - max_shrink * i / n_grid
        e = dequant_at(r).sub_(groups).transpose(0, 1)  # [G, N, g]
        err = (torch.bmm(e, gram_t) * e).sum(-1).T  # e^T gram e per (row, group)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_r.masked_fill_(better, r)
    return best_r


@torch.no_grad()
def search_clip(weight: torch.Tensor, gram: torch.Tensor, bits: int, group_size: int, symmetric: bool,
                n_grid: int = 20, max_shrink: float = 0.5) -> torch.Tensor:
    """Integer groups: per (row, group) range shrink r [N, G] (range [r * min, r * max], see
    `search_shrink`)."""
    groups = padded_groups(weight, group_size)
    wmin, wmax = groups.aminmax(dim=-1, keepdim=True)

    def dequant_at(r: float) -> torch.Tensor:
        s, z = scale_zero_from_range(wmin * r, wmax * r, bits, symmetric)
        return (quantize_codes(groups, s, z, bits) - z).mul_(s)

    return search_shrink(groups, gram, dequant_at, n_grid, max_shrink)


@torch.no_grad()
def apply_clip(weight: torch.Tensor, shrink: torch.Tensor, group_size: int) -> None:
    """Clamp each (row, group) of `weight` in place to its range shrunk by `shrink` [N, G]."""
    n, k = weight.shape
    groups = padded_groups(weight, group_size)
    wmin, wmax = groups.aminmax(dim=-1, keepdim=True)
    r = shrink.unsqueeze(-1)
    clipped = torch.maximum(torch.minimum(groups, wmax * r), wmin * r).reshape(n, -1)[:, :k]
    weight.copy_(clipped.to(weight.dtype))
