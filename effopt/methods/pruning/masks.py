"""Keep-masks from importance scores: per layer, per output row, N:M, or global across layers.

Every mask here is boolean with True = keep. The lowest scores are pruned, with exact counts (ties
at the threshold are broken by position), so a requested sparsity is met to within one weight per
selection group.
"""

from __future__ import annotations

import torch


def parse_nm(pattern: str) -> tuple[int, int]:
    """'2:4' -> (2, 4): keep N weights in every M consecutive weights along the input dimension."""
    try:
        n, m = (int(p) for p in pattern.split(":"))
    except ValueError:
        raise ValueError(f"pattern {pattern!r}: expected N:M with integers, e.g. 2:4") from None
    if not 0 < n < m:
        raise ValueError(f"pattern {pattern!r}: need 0 < N < M")
    return n, m


def prune_lowest(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Keep-mask of `scores`' shape with exactly `count` lowest entries pruned."""
    flat = scores.flatten()
    if count <= 0:
        return torch.ones_like(scores, dtype=torch.bool)
    if count >= flat.numel():
        return torch.zeros_like(scores, dtype=torch.bool)
    thresh = flat.kthvalue(count).values
    below = flat < thresh
    need = count - int(below.sum())
    equal = flat == thresh
    pruned = below | (equal & (equal.cumsum(0) <= need))
    return (~pruned).view_as(scores)


def layer_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune round(sparsity * numel) lowest scores of the whole matrix."""
    return prune_lowest(scores, round(sparsity * scores.numel()))


def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune round(sparsity * columns) lowest scores in every row (Wanda's comparison group)."""
    k = round(sparsity * scores.shape[1])
    mask = torch.ones_like(scores, dtype=torch.bool)
    if k > 0:
        idx = torch.topk(scores, k, dim=1, largest=False).indices
        mask.scatter_(1, idx, False)
    return mask


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the N highest scores in every M consecutive columns of each row."""
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"N:M sparsity needs the input size ({cols}) to be a multiple of M={m}")
    groups = scores.reshape(rows, cols // m, m)
    idx = torch.topk(groups, m - n, dim=-1, largest=False).indices
    mask = torch.ones_like(groups, dtype=torch.bool)
    mask.scatter_(-1, idx, False)
    return mask.view(rows, cols)


def select_mask(scores: torch.Tensor, sparsity: float | None = None, nm: tuple[int, int] | None = None,
                per_row: bool = False) -> torch.Tensor:
    """One layer's keep-mask: N:M when `nm` is given, else `sparsity` per row or per layer."""
    if nm is not None:
        return nm_mask(scores, *nm)
    if sparsity is None:
        raise ValueError("select_mask needs a sparsity or an N:M pattern")
    return row_mask(scores, sparsity) if per_row else layer_mask(scores, sparsity)


def global_masks(scores: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """Keep-masks for several layers with one threshold across all of them (global scope)."""
    names = list(scores)
    flat = torch.cat([scores[n].flatten().float() for n in names])
    keep = prune_lowest(flat, round(sparsity * flat.numel()))
    out, start = {}, 0
    for name in names:
        size = scores[name].numel()
        out[name] = keep[start: start + size].view_as(scores[name])
        start += size
    return out


def mask_sparsity(masks: dict[str, torch.Tensor] | list[torch.Tensor]) -> float:
    """Fraction of pruned entries over several masks."""
    items = masks.values() if isinstance(masks, dict) else masks
    total = pruned = 0
    for mask in items:
        total += mask.numel()
        pruned += int((~mask).sum())
    return pruned / total if total else 0.0


def masks_from_scores(scores: dict[str, torch.Tensor], sparsity: float | None = None,
                      nm: tuple[int, int] | None = None, scope: str = "layer") -> dict[str, torch.Tensor]:
    """Keep-masks for several layers: N:M, or `sparsity` per layer or with one global threshold."""
    if scope not in ("layer", "global"):
        raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
    if scope == "global":
        if nm is not None:
            raise ValueError("N:M patterns are chosen within each group of M weights; scope 'global' does not apply")
        return global_masks(scores, sparsity)
    return {name: select_mask(s, sparsity, nm) for name, s in scores.items()}
