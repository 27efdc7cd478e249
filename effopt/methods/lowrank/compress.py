"""Replace a model's linear layers by LowRankLinear factors: SVD, SVD-LLM or NMF, ranks by rule.

Each `compress_*` function works in place on a model and a list of linear-layer names, and returns
{layer name: rank} for every layer it factored (a layer whose factors would not save parameters
keeps its dense weight and is left out of the result).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from effopt import log
from effopt.methods.lowrank import rank as rk
from effopt.methods.lowrank.capture import sequential_moments
from effopt.methods.lowrank.nmf import check_nonnegative, nmf_factors
from effopt.methods.lowrank.svd import (singular_values, split_factors, svd, whitened_factors, whitened_svd,
                                        whitening_factor)
from effopt.nn import set_submodule
from effopt.nn.lowrank_linear import LowRankLinear


@dataclass(frozen=True)
class RankRule:
    """Exactly one of: ratio (parameters kept per layer), energy (squared singular values kept per
    layer), param_budget (parameters kept over all targeted layers, allocated by importance)."""

    ratio: float | None = None
    energy: float | None = None
    param_budget: float | None = None

    def __post_init__(self):
        given = [k for k in ("ratio", "energy", "param_budget") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of ratio, energy, param_budget (got {given or 'none'})")

    def layer_rank(self, out_features: int, in_features: int, singular_values: torch.Tensor | None) -> int:
        """The rank of one layer under a per-layer rule (ratio or energy)."""
        if self.ratio is not None:
            return rk.rank_for_ratio(out_features, in_features, self.ratio)
        if self.energy is not None:
            return rk.rank_for_energy(singular_values, self.energy)
        raise ValueError("param_budget ranks come from allocate_budget, not per layer")


def dense_weight(module: torch.nn.Module) -> torch.Tensor:
    """The weight a linear (or masked linear) layer computes with."""
    return module.effective_weight() if hasattr(module, "effective_weight") else module.weight


def install(model: torch.nn.Module, name: str, a: torch.Tensor, b: torch.Tensor, method: str) -> None:
    """Swap the linear `name` for a LowRankLinear with factors A, B (its bias and dtype kept)."""
    old = model.get_submodule(name)
    dtype = dense_weight(old).dtype
    set_submodule(model, name, LowRankLinear.from_factors(a, b, old.bias, dtype, method))


def _plain_spectrum(weight: torch.Tensor) -> torch.Tensor:
    return singular_values(weight)


def _budget_ranks(model, names: list[str], keep: float) -> dict[str, int]:
    """Budget allocation over the plain singular values of the named layers' weights."""
    spectra = {}
    for name in names:
        w = dense_weight(model.get_submodule(name))
        spectra[name] = rk.LayerSpectrum(w.shape[0], w.shape[1], _plain_spectrum(w))
    return rk.allocate_budget(spectra, keep)


@torch.no_grad()
def compress_svd(model: torch.nn.Module, names: list[str], rule: RankRule) -> dict[str, int]:
    """Truncated SVD of every named layer (Frobenius-optimal, no data)."""
    ranks = _budget_ranks(model, names, rule.param_budget) if rule.param_budget is not None else None
    done = {}
    for name in log.progress(names, "svd"):
        w = dense_weight(model.get_submodule(name))
        out_f, in_f = w.shape
        u, s, vh = svd(w)
        rank = ranks[name] if ranks is not None else rule.layer_rank(out_f, in_f, s)
        if rk.saves_parameters(out_f, in_f, rank):
            install(model, name, *split_factors(u, s, vh, rank), "svd")
            done[name] = rank
    return done


@torch.no_grad()
def compress_nmf(model: torch.nn.Module, names: list[str], rule: RankRule, iterations: int = 300,
                 seed: int = 0) -> dict[str, int]:
    """NMF (multiplicative updates) of every named layer; every weight must be non-negative.

    Energy and budget rules read the plain singular values of W (the best any rank-r factorization
    can do), since NMF has no spectrum of its own. All layers are checked before any is changed.
    """
    for name in names:
        check_nonnegative(dense_weight(model.get_submodule(name)), name)
    ranks = _budget_ranks(model, names, rule.param_budget) if rule.param_budget is not None else None
    done = {}
    for i, name in enumerate(log.progress(names, "nmf")):
        w = dense_weight(model.get_submodule(name))
        out_f, in_f = w.shape
        if ranks is not None:
            rank = ranks[name]
        else:
            rank = rule.layer_rank(out_f, in_f, None if rule.ratio is not None else _plain_spectrum(w))
        if rk.saves_parameters(out_f, in_f, rank):
            install(model, name, *nmf_factors(w, rank, iterations, seed + i, name), "nmf")
            done[name] = rank
    return done


def _whitened_spectra(model, names: list[str], samples: torch.Tensor, damping: float, keep_moments: bool,
                      batch_size: int) -> tuple[dict[str, rk.LayerSpectrum], dict[str, torch.Tensor]]:
    """One calibration pass over the unchanged model: each layer's whitened singular values (and,
    when asked, its X X^T, so the layers can be factored without a second pass)."""
    spectra: dict[str, rk.LayerSpectrum] = {}
    moments_kept: dict[str, torch.Tensor] = {}

    def record(_, moments: dict[str, torch.Tensor]) -> bool:
        factors = _factors(moments, damping)
        for name, cov in moments.items():
            w = dense_weight(model.get_submodule(name))
            sv = singular_values(w.detach().to(torch.float64) @ factors[id(cov)])
            spectra[name] = rk.LayerSpectrum(w.shape[0], w.shape[1], sv)
            if keep_moments:
                moments_kept[name] = cov
        return False

    sequential_moments(model, samples, names, record, batch_size)
    return spectra, moments_kept


@torch.no_grad()
def compress_svd_llm(model: torch.nn.Module, names: list[str], samples: torch.Tensor, rule: RankRule,
                     damping: float = 1e-6, sequential: bool = True, batch_size: int = 8) -> dict[str, int]:
    """SVD-LLM truncation-aware whitened SVD of every named layer, calibrated on `samples`.

    With `sequential`, each decoder layer is calibrated on the outputs of the already compressed
    layers before it; otherwise every layer sees the original model's activations. A global
    `param_budget` first needs every layer's whitened spectrum: one calibration pass on the
    original model allocates the ranks (and, when not sequential, its sums are used to factor).

    Args:
        samples: calibration token ids [n, seq_len].
        damping: relative diagonal shift for X X^T when its Cholesky factorization fails.
    """
    ranks, kept = None, {}
    if rule.param_budget is not None:
        spectra, kept = _whitened_spectra(model, names, samples, damping, not sequential, batch_size)
        ranks = rk.allocate_budget(spectra, rule.param_budget)
    done: dict[str, int] = {}

    def compress(_, moments: dict[str, torch.Tensor]) -> bool:
        factors, before = _factors(moments, damping), len(done)
        for name, cov in moments.items():
            w = dense_weight(model.get_submodule(name))
            u, s, vh = whitened_svd(w, factors[id(cov)])
            rank = ranks[name] if ranks is not None else rule.layer_rank(w.shape[0], w.shape[1], s)
            if rk.saves_parameters(w.shape[0], w.shape[1], rank):
                install(model, name, *whitened_factors(u, s, vh, factors[id(cov)], rank), "svd_llm")
                done[name] = rank
        return sequential and len(done) > before

    if kept:
        compress(None, kept)
    else:
        sequential_moments(model, samples, names, compress, batch_size)
    return done


def _factors(moments: dict[str, torch.Tensor], damping: float) -> dict[int, torch.Tensor]:
    """Whitening factor of each distinct X X^T (layers fed the same input share one)."""
    out: dict[int, torch.Tensor] = {}
    for cov in moments.values():
        if id(cov) not in out:
            out[id(cov)] = whitening_factor(cov, damping)
    return out
