"""Fusing linear layers that read the same input into one (q/k/v, gate/up): one matmul, one launch.

Dense layers are concatenated along the output features. Packed QuantLinear layers with the same
input width, bits, group size and symmetry are concatenated row-wise too: their layout
(kernels/LAYOUT.md) stores each output row on its own, so the fused layer is exact.
"""

from __future__ import annotations

import torch

from effopt.nn.quant_linear import QuantLinear


def _dense_weight(layer: torch.nn.Module) -> torch.Tensor | None:
    if isinstance(layer, QuantLinear):
        return None
    if hasattr(layer, "effective_weight"):
        return layer.effective_weight()
    if type(layer) is torch.nn.Linear:  # subclasses may compute something else
        return layer.weight
    return None


def _fuse_quant(layers: list[QuantLinear]) -> QuantLinear | None:
    first = layers[0]
    keys = [(q.in_features, q.bits, q.group_size, q.symmetric, q.scales.dtype, q.bias is None) for q in layers]
    if len(set(keys)) != 1:
        return None
    n = sum(q.out_features for q in layers)
    fused = QuantLinear(first.in_features, n, first.bits, first.group_size, first.bias is not None, first.symmetric,
                        first.scales.dtype, first.method).to(first.qweight.device)
    with torch.no_grad():
        fused.qweight.copy_(torch.cat([q.qweight for q in layers]))
        fused.scales.copy_(torch.cat([q.scales for q in layers]))
        fused.zeros.copy_(torch.cat([q.zeros for q in layers]))
        if fused.bias is not None:
            fused.bias.copy_(torch.cat([q.bias for q in layers]))
    return fused


@torch.no_grad()
def fuse_linears(layers: list[torch.nn.Module]) -> torch.nn.Module | None:
    """One layer computing cat([layer(x) for layer in layers], -1), or None when they cannot fuse.

    Fusable: all dense (nn.Linear or a layer with `effective_weight()`, e.g. a pruned MaskedLinear)
    or all QuantLinear with one packing. Mixed kinds return None (the caller keeps them apart).
    """
    if all(type(q) is QuantLinear for q in layers):
        return _fuse_quant(layers)
    weights = [_dense_weight(layer) for layer in layers]
    if any(w is None for w in weights) or len({w.shape[1] for w in weights}) != 1:
        return None
    biases = [getattr(layer, "bias", None) for layer in layers]
    if any(b is None for b in biases) and not all(b is None for b in biases):
        return None
    fused = torch.nn.Linear(weights[0].shape[1], sum(w.shape[0] for w in weights), bias=biases[0] is not None,
                            dtype=weights[0].dtype, device=weights[0].device)
    fused.weight.copy_(torch.cat(weights))
    if fused.bias is not None:
        fused.bias.copy_(torch.cat(biases))
    fused.requires_grad_(False)
    return fused
