"""Bottleneck adapters (Houlsby et al. 2019 sequential; He et al. 2022 parallel) on linear layers."""

from __future__ import annotations

import torch

from effopt.nn import set_submodule
from effopt.nn.adapters import AdapterLinear


def add_adapters(model: torch.nn.Module, names: list[str], bottleneck: int, placement: str = "sequential",
                 activation: str = "relu", scale: float = 1.0) -> torch.nn.Module:
    """Freeze `model` and wrap each named linear layer in an AdapterLinear (only adapters train).

    Houlsby's placement is sequential after each sublayer's output projection (o_proj, down_proj);
    Pfeiffer's is after the MLP only (down_proj). A new adapter's up-projection is zero, so the
    model's output is unchanged until it trains.
    """
    if not names:
        raise ValueError("adapters: no target layer matched")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        base = model.get_submodule(name)
        adapter = AdapterLinear(base, bottleneck, placement, activation, scale)
        param = next(base.parameters(), None) if not hasattr(base, "qweight") else base.qweight
        adapter.down.to(param.device if param is not None else "cpu")
        adapter.up.to(adapter.down.weight.device)
        set_submodule(model, name, adapter)
    return model


def mark_trainable(model: torch.nn.Module, freeze: list[str]) -> int:
    """Full fine-tuning: every floating-point parameter trains except names matching `freeze` globs
    and packed-quantized layers' biases; returns the trainable count."""
    import fnmatch

    from effopt.nn.quant_linear import QuantLinear

    frozen_quant = {id(m.bias) for m in model.modules() if isinstance(m, QuantLinear) and m.bias is not None}
    total = 0
    for name, p in model.named_parameters():
        train = p.is_floating_point() and id(p) not in frozen_quant and not any(fnmatch.fnmatchcase(name, g)
                                                                                   for g in freeze)
        p.requires_grad_(train)
        total += p.numel() if train else 0
    return total
