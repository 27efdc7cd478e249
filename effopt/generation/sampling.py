"""Turning logits into next tokens: greedy, or sampling at a temperature with an optional top-k."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sampling:
    """How to pick tokens. temperature 0 means greedy (argmax)."""

    temperature: float = 0.0
    top_k: int | None = None

    @property
    def greedy(self) -> bool:
        """True when tokens are picked by argmax."""
        return self.temperature <= 0


def probabilities(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """The distribution tokens are drawn from: softmax(logits / T) restricted to the top k, float32."""
    logits = logits.float()
    if sampling.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    logits = logits / sampling.temperature
    if sampling.top_k is not None and sampling.top_k < logits.shape[-1]:
        kth = torch.topk(logits, sampling.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.softmax(logits, dim=-1)


def pick(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token per row of logits [..., V] -> [...] int64."""
    if sampling.greedy:
        return logits.argmax(-1)
    probs = probabilities(logits, sampling)
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat.cpu() if generator is not None and generator.device.type == "cpu" else flat, 1,
                             generator=generator).view(probs.shape[:-1]).to(logits.device)
