"""How many singular components each layer keeps.

A rank-r factorization of an [out, in] weight stores r * (out + in) numbers instead of out * in;
it is only worth using when that is fewer (`saves_parameters`). Three ways to pick r:

- by ratio: keep a fraction of the layer's parameters, r = floor(ratio * out * in / (out + in));
- by energy: the smallest r whose squared singular values hold a fraction of the total;
- by a global parameter budget: keep a fraction of all targeted parameters, spent on the
  components that matter most across layers (`allocate_budget`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def lowrank_parameters(out_features: int, in_features: int, rank: int) -> int:
    """Numbers stored by a rank-`rank` factorization of an [out, in] weight."""
    return rank * (out_features + in_features)


def saves_parameters(out_features: int, in_features: int, rank: int) -> bool:
    """True when the factorization stores fewer numbers than the dense weight."""
    return lowrank_parameters(out_features, in_features, rank) < out_features * in_features


def rank_for_ratio(out_features: int, in_features: int, ratio: float) -> int:
    """Largest rank whose factors hold at most `ratio` of the dense layer's parameters (at least 1)."""
    if not 0 < ratio <= 1:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    full = min(out_features, in_features)
    return max(1, min(full, int(ratio * out_features * in_features // (out_features + in_features))))


def rank_for_energy(singular_values: torch.Tensor, energy: float) -> int:
    """Smallest rank whose squared singular values hold at least `energy` of the total."""
    if not 0 < energy <= 1:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    power = singular_values.to(torch.float64) ** 2
    total = power.sum()
    if total <= 0:
        return 1
    kept = torch.cumsum(power, 0) / total
    rank = int(torch.searchsorted(kept, torch.tensor(energy, dtype=torch.float64) - 1e-12)) + 1
    return min(rank, singular_values.numel())


@dataclass(frozen=True)
class LayerSpectrum:
    """What budget allocation needs to know about one layer."""

    out_features: int
    in_features: int
    singular_values: torch.Tensor


def _scores(spec: LayerSpectrum) -> torch.Tensor:
    """Importance per stored parameter of each component: its share of the layer's energy / (out + in)."""
    power = spec.singular_values.to(torch.float64) ** 2
    share = power / power.sum().clamp_min(1e-300)
    return share / (spec.out_features + spec.in_features)


def _cost(spectra: dict[str, LayerSpectrum], ranks: dict[str, int]) -> int:
    """Parameters stored: low-rank where that saves parameters, dense otherwise."""
    total = 0
    for name, spec in spectra.items():
        dense = spec.out_features * spec.in_features
        total += min(dense, lowrank_parameters(spec.out_features, spec.in_features, max(ranks[name], 1)))
    return total


def allocate_budget(spectra: dict[str, LayerSpectrum], keep: float) -> dict[str, int]:
    """Ranks for every layer so that at most `keep` of the layers' dense parameters remain.

    Every singular component of every layer is scored by its share of its layer's squared
    singular values divided by what it costs to store (out + in numbers); components are taken in
    order of score, highest first (ties in layer order), for as long as the total fits the budget.
    A layer whose rank reaches the point where factors stop saving parameters is counted (and
    later kept) dense. Every layer keeps at least rank 1.

    Returns:
        {layer name: rank}; a rank with `saves_parameters(...) == False` means keep the layer dense.
    """
    if not 0 < keep < 1:
        raise ValueError(f"param_budget must be in (0, 1), got {keep}")
    names = list(spectra)
    budget = keep * sum(s.out_features * s.in_features for s in spectra.values())
    scores = [_scores(spectra[n]) for n in names]
    owner = torch.cat([torch.full((len(s),), i) for i, s in enumerate(scores)])
    order = torch.sort(torch.cat(scores), descending=True, stable=True).indices
    owner = owner[order]  # layer index of the k-th best component

    def ranks_of(k: int) -> dict[str, int]:
        counts = torch.bincount(owner[:k], minlength=len(names)).tolist()
        return {n: max(c, 1) for n, c in zip(names, counts)}

    if _cost(spectra, ranks_of(0)) > budget:
        raise ValueError(f"param_budget {keep} is below what rank 1 in every layer needs")
    lo, hi = 0, owner.numel()  # largest prefix length whose cost fits (cost grows with the prefix)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _cost(spectra, ranks_of(mid)) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return ranks_of(lo)
