"""Importance scores that need no layer-wise calibration: magnitude and first-order Taylor.

Magnitude: |W| (Han et al., 2015). First-order Taylor (Molchanov et al., 2017/2019; LLM-Pruner's
element-wise criterion): the loss change from zeroing a weight, to first order, is |w * dL/dw|;
it is accumulated over calibration batches as the sum of |w * dL_b/dw| of each batch b.
"""

from __future__ import annotations

from typing import Iterable

import contextlib

import torch

from effopt import log
from effopt.nn.masked_linear import effective_weight


def magnitude_scores(modules: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """|W| of every named linear (masked weights are 0)."""
    return {name: effective_weight(m).detach().float().abs() for name, m in modules.items()}


def taylor_scores(model: torch.nn.Module, modules: dict[str, torch.nn.Module],
                  batches: Iterable[torch.Tensor], autocast: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Sum over batches of |W * dL_b/dW| for every named linear.

    Args:
        modules: {name: linear} inside `model` whose weights are scored.
        batches: token-id tensors [batch, seq]; L_b is the mean next-token cross-entropy of batch b.
        autocast: run the forward/backward passes under torch.autocast with this dtype (bfloat16: several
            times faster on CPUs with bf16 matrix units, e.g. AMX); weights, gradients and scores stay float32.
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
            with torch.autocast(device.type, dtype=autocast) if autocast else contextlib.nullcontext():
                loss = model(input_ids=batch, labels=batch, use_cache=False).loss
            grads = torch.autograd.grad(loss, list(weights.values()))
            with torch.no_grad():
                for (name, w), g in zip(weights.items(), grads):
                    scores[name] += (w.float() * g.float()).abs()
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
    return scores
