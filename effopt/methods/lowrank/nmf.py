"""Non-negative matrix factorization W ~ B @ A with B, A >= 0 (Lee & Seung, 2001).

"Algorithms for Non-negative Matrix Factorization" (NIPS 2000): for the squared Frobenius loss
||W - B A||^2 the multiplicative updates
    A <- A * (B^T W) / (B^T B A),    B <- B * (W A^T) / (B A A^T)
keep both factors non-negative and never increase the loss. They only apply to a weight whose
entries are all non-negative; anything else is refused with the layer's name.
"""

from __future__ import annotations

import torch

EPS = 1e-12


class NegativeWeightError(ValueError):
    """NMF was asked to factor a weight with negative entries."""


def check_nonnegative(weight: torch.Tensor, name: str) -> None:
    """Raise NegativeWeightError naming `name` if `weight` has any negative entry."""
    negative = int((weight < 0).sum())
    if negative:
        raise NegativeWeightError(
            f"nmf: layer {name!r} has {negative} negative weights of {weight.numel()} (min {float(weight.min()):.4g}); "
            "NMF only factors non-negative weights - use method svd or svd_llm, or leave this layer out via ignore")


def nmf_factors(weight: torch.Tensor, rank: int, iterations: int = 300, seed: int = 0,
                name: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-`rank` NMF of a non-negative `weight` [out, in] as (A [r, in], B [out, r]), float64.

    Args:
        weight: the matrix to factor; every entry must be >= 0.
        rank: inner dimension r.
        iterations: multiplicative update rounds (each updates A then B).
        seed: seeds the random non-negative start.
        name: layer name used in the error message.
    """
    check_nonnegative(weight, name)
    w = weight.detach().to(torch.float64)
    out_features, in_features = w.shape
    gen = torch.Generator(device="cpu").manual_seed(seed)
    # Random start with the scale of W: E[(B A)_ij] = mean(W) when entries are U(0, 2 sqrt(mean / r)).
    scale = 2 * (w.mean().clamp_min(EPS) / rank).sqrt()
    b = (torch.rand(out_features, rank, generator=gen, dtype=torch.float64) * scale).to(w.device)
    a = (torch.rand(rank, in_features, generator=gen, dtype=torch.float64) * scale).to(w.device)
    for _ in range(iterations):
        a *= (b.T @ w) / (b.T @ b @ a).clamp_min(EPS)
        b *= (w @ a.T) / (b @ (a @ a.T)).clamp_min(EPS)
    return a, b
