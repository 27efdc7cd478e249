"""Tiny models whose greedy continuations depend on their context (a plain random tiny Llama with
tied embeddings mostly repeats one token, which would make equality tests vacuous)."""

from __future__ import annotations

import torch
from conftest import tiny_llama


def lively_llama(seed: int = 0, gain: float = 4.0, **kwargs):
    """tiny_llama with untied lm_head and every projection scaled by `gain`."""
    model = tiny_llama(seed=seed, tie=False, **kwargs)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.mul_(gain)
    return model


def noisy_copy(model, scale: float, seed: int):
    """A copy of `model` with Gaussian noise (scale x each tensor's std) on every weight."""
    import copy

    draft = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale * p.std())
    return draft


def prompt(n: int, seed: int) -> list[int]:
    """n random byte-token ids."""
    return torch.randint(3, 259, (n,), generator=torch.Generator().manual_seed(seed)).tolist()
