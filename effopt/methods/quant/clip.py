"""Clipping search on the output error (AWQ's auto-clip): per output row and column group, shrink
the quantization range by r in [1 - max_shrink, 1] to minimize that group's contribution to the
layer's squared output error over the calibration tokens, e^T (X_g^T X_g) e with e = w - Q_r(w).
Groups are searched independently, so only the diagonal blocks X_g^T X_g of X^T X are needed.
"""

from __future__ import annotations

import torch

from effopt.methods.quant.rtn import group_view, quantize_codes, scale_zero_from_range


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


@torch.no_grad()
def search_clip(weight: torch.Tensor, gram: torch.Tensor, bits: int, group_size: int, symmetric: bool,
                n_grid: int = 20, max_shrink: float = 0.5) -> torch.Tensor:
    """Per (row, group) range shrink r in [1 - max_shrink, 1] minimizing e^T (X_g^T X_g) e, the
    group's squared output error over the calibration tokens (e = w - Q_r(w)). Returns r [N, G]."""
    groups, valid = group_view(weight.float(), group_size)  # [N, G, g]
    inf = torch.tensor(float("inf"), device=weight.device)
    wmin = torch.where(valid, groups, inf).amin(-1, keepdim=True)
    wmax = torch.where(valid, groups, -inf).amax(-1, keepdim=True)
    best_err = torch.full(groups.shape[:2], float("inf"), device=weight.device)
    best_r = torch.ones_like(best_err)
    for i in range(n_grid + 1):
        r = 1 - max_shrink * i / n_grid
        s, z = scale_zero_from_range(wmin * r, wmax * r, bits, symmetric)
        e = ((quantize_codes(groups, s, z, bits) - z) * s - groups) * valid
        err = torch.einsum("ngi,gij,ngj->ng", e, gram, e)
        better = err < best_err
        best_err, best_r = torch.where(better, err, best_err), torch.where(better, torch.full_like(best_r, r), best_r)
    return best_r


@torch.no_grad()
def apply_clip(weight: torch.Tensor, shrink: torch.Tensor, group_size: int) -> None:
    """Clamp each (row, group) of `weight` in place to its range shrunk by `shrink` [N, G]."""
    n, k = weight.shape
    groups, valid = group_view(weight.float(), group_size)
    inf = torch.tensor(float("inf"), device=weight.device)
    wmin = torch.where(valid, groups, inf).amin(-1, keepdim=True) * shrink.unsqueeze(-1)
    wmax = torch.where(valid, groups, -inf).amax(-1, keepdim=True) * shrink.unsqueeze(-1)
    clipped = torch.maximum(torch.minimum(groups, wmax), wmin).reshape(n, -1)[:, :k]
    weight.copy_(clipped.to(weight.dtype))
