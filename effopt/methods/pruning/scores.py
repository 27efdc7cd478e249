"""Importance scores that need no layer-wise calibration: magnitude and first-order Taylor.

Magnitude: |W| (Han et al., 2015). First-order Taylor (Molchanov et al., 2017/2019; LLM-Pruner's
element-wise criterion): the loss change from zeroing a weight, to first order, is |w * dL/dw|;
it is accumulated over calibration batches as the sum of |w * dL_b/dw| of each batch b.
"""

from __future__ import annotations

from typing import Iterable

import torch

from effopt import log
from effopt.nn.masked_linear import effective_weight


def magnitude_scores(modules: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """|W| of every named linear (masked weights are 0)."""
    return {name: effective_weight(m).detach().float().abs() for name, m in modules.items()}


def taylor_scores(model: torch.nn.Module, modules: dict[str, torch.nn.Module],
                  batches: Iterable[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sum over batches of |W * dL_b/dW| for every named linear.

    Args:
        modules: {name: linear} inside `model` whose weights are scored.
        batches: token-id tensors [batch, seq]; L_b is the mean next-token cross-entropy of batch b.
    Only the scored weights get gradients; every other parameter is frozen during the passes.
    """
    flags = {p: p.requires_grad for p in model.parameters()}
    weights = {name: m.weight for name, m in modules.items()}
    scores = {name: torch.zeros(w.shape, dtype=torch.float32, device=w.device) for name, w in weights.items()}
    device = next(model.parameters()).device
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for w in weights.values():
            w.requires_grad_(True)
        for batch in log.progress(list(batches), "taylor gradients"):
            batch = batch.to(device)
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss
            grads = torch.autograd.grad(loss, list(weights.values()))
            with torch.no_grad():
                for (name, w), g in zip(weights.items(), grads):
                    scores[name] += (w.float() * g.float()).abs()
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
    return scores
