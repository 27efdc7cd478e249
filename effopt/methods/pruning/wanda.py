"""Wanda (Sun et al., 2024): prune by |W_ij| * ||X_j||_2, compared within each output row.

The score of a weight is its magnitude times the L2 norm of its input feature over all calibration
tokens; each output row drops its own lowest-scoring weights (or, for N:M, the lowest in every
group of M consecutive inputs). No weight update.
"""

from __future__ import annotations

import torch

from effopt.methods.pruning.masks import select_mask


def input_sq_norms(x: torch.Tensor) -> torch.Tensor:
    """Sum over tokens of x_j^2 for every input feature j (x: [..., in_features]), float32."""
    return x.reshape(-1, x.shape[-1]).float().pow(2).sum(0)


def wanda_scores(weight: torch.Tensor, sq_norms: torch.Tensor) -> torch.Tensor:
    """|W| * ||X_j||_2 broadcast over rows."""
    return weight.detach().float().abs() * sq_norms.sqrt().unsqueeze(0)


def wanda_mask(weight: torch.Tensor, sq_norms: torch.Tensor, sparsity: float | None = None,
               nm: tuple[int, int] | None = None) -> torch.Tensor:
    """Keep-mask: per output row, prune the lowest `sparsity` fraction (or N:M within each row)."""
    return select_mask(wanda_scores(weight, sq_norms), sparsity, nm, per_row=True)


def wanda_sequential(model: torch.nn.Module, input_ids: torch.Tensor, names: list[str],
                     sparsity: float | None = None, nm: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
    """Prune the named linears with Wanda, layer by layer over the calibration `input_ids`.

    Each linear is scored on its input as it arrives after every earlier linear was pruned, and
    its pruned weights are zeroed in place before it computes. Returns {name: keep-mask}.
    """
    from effopt.methods.pruning.sequential import SharedInputStat, run_layers
    from effopt.nn.masked_linear import effective_weight

    norms, masks = SharedInputStat(input_sq_norms), {}

    def on_input(name: str, module: torch.nn.Module, x: torch.Tensor) -> None:
        keep = wanda_mask(effective_weight(module), norms(x), sparsity, nm)
        module.weight.mul_(keep.to(module.weight.dtype))
        masks[name] = keep

    run_layers(model, input_ids, names, on_input, norms.clear, "wanda")
    return masks
