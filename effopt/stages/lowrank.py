"""lowrank: replace targeted linear layers by LowRankLinear factors (SVD, SVD-LLM or NMF).

One config per method (tagged by `method:`); each method is a plain function in methods/lowrank/.
Every method takes exactly one rank rule: `ratio`, `energy` or `param_budget`.
"""

from __future__ import annotations

import fnmatch
from typing import Literal

import torch
from pydantic import Field, model_validator

from effopt import log
from effopt.registry import register_stage
from effopt.stages.base import TargetedStageConfig


class LowRankBase(TargetedStageConfig):
    """Options every low-rank method shares: the rank rule."""

    stage: Literal["lowrank"] = "lowrank"
    ratio: float | None = Field(None, gt=0, le=1, description="Fraction of each layer's parameters kept "
                                                              "(0.8 = 20% fewer).")
    energy: float | None = Field(None, gt=0, le=1, description="Fraction of each layer's squared singular "
                                                               "values kept (whitened ones for svd_llm).")
    param_budget: float | None = Field(None, gt=0, lt=1, description="Fraction of all targeted parameters kept, "
                                                                     "spent on the most important components "
                                                                     "across layers.")

    @model_validator(mode="after")
    def _one_rule(self):
        given = [k for k in ("ratio", "energy", "param_budget") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of ratio, energy, param_budget (got {', '.join(given) or 'none'})")
        return self

    def rule(self):
        """The rank rule as the methods take it."""
        from effopt.methods.lowrank.compress import RankRule

        return RankRule(self.ratio, self.energy, self.param_budget)


class SvdConfig(LowRankBase):
    """Truncated SVD of each weight (Frobenius-optimal; needs no data)."""

    method: Literal["svd"] = "svd"


class SvdLlmConfig(LowRankBase):
    """SVD-LLM's truncation-aware whitening (Wang et al., arXiv:2403.07378): SVD of W S, S the Cholesky
    factor of the calibration X X^T, truncated and mapped back with S^-1 (no LoRA update)."""

    method: Literal["svd_llm"] = "svd_llm"
    data: str = Field("calibration", description="Data source of the calibration windows.")
    num_samples: int | None = Field(None, gt=0, description="Calibration windows (default: the source's num_samples).")
    seq_len: int | None = Field(None, ge=2, description="Tokens per window (default: the source's seq_len).")
    damping: float = Field(1e-6, ge=0, description="First relative diagonal shift tried when X X^T is singular.")
    sequential: bool = Field(True, description="Calibrate each decoder layer on the compressed earlier layers' "
                                               "outputs (else on the original model's).")
    batch_size: int = Field(8, gt=0, description="Calibration windows per forward.")


class NmfConfig(LowRankBase):
    """Non-negative matrix factorization (Lee & Seung multiplicative updates); weights must be >= 0."""

    method: Literal["nmf"] = "nmf"
    iterations: int = Field(300, gt=0, description="Multiplicative update rounds.")


def select_layers(model: torch.nn.Module, targets: list[str], ignore: list[str]) -> list[str]:
    """Names of the nn.Linear layers (masked ones included) matched by a target glob and no ignore glob."""
    return [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)
            and any(fnmatch.fnmatchcase(name, p) for p in targets)
            and not any(fnmatch.fnmatchcase(name, p) for p in ignore)]


def _shapes(model, names: list[str]) -> dict[str, tuple[int, int]]:
    return {n: (model.get_submodule(n).out_features, model.get_submodule(n).in_features) for n in names}


def summarize(shapes: dict[str, tuple[int, int]], ranks: dict[str, int]) -> dict:
    """Metrics: layers factored, weight parameters of the targeted layers before/after, ranks."""
    before = sum(o * i for o, i in shapes.values())
    after = sum(ranks[n] * (o + i) if n in ranks else o * i for n, (o, i) in shapes.items())
    out = {"layers_targeted": len(shapes), "layers_factored": len(ranks), "targeted_params_before": before,
           "targeted_params_after": after, "targeted_params_kept": after / before if before else 1.0}
    if ranks:
        values = sorted(ranks.values())
        out.update(rank_min=values[0], rank_max=values[-1], rank_mean=sum(values) / len(values))
    return out


def _svd(cfg: SvdConfig, ctx, names: list[str]) -> tuple[dict, dict]:
    from effopt.methods.lowrank.compress import compress_svd

    return compress_svd(ctx.model, names, cfg.rule()), {}


def _svd_llm(cfg: SvdLlmConfig, ctx, names: list[str]) -> tuple[dict, dict]:
    from effopt.methods.lowrank.compress import compress_svd_llm

    samples = ctx.data.samples(cfg.data, cfg.num_samples, cfg.seq_len)
    ranks = compress_svd_llm(ctx.model, names, samples, cfg.rule(), cfg.damping, cfg.sequential, cfg.batch_size)
    return ranks, {"calibration_tokens": int(samples.numel())}


def _nmf(cfg: NmfConfig, ctx, names: list[str]) -> tuple[dict, dict]:
    from effopt.methods.lowrank.compress import compress_nmf

    return compress_nmf(ctx.model, names, cfg.rule(), cfg.iterations, ctx.recipe.seed), {}


METHODS = {"svd": (SvdConfig, _svd), "svd_llm": (SvdLlmConfig, _svd_llm), "nmf": (NmfConfig, _nmf)}


def apply_lowrank(cfg, ctx) -> dict:
    """Factor the selected layers with the method named by `cfg.method`; record what it saved."""
    from effopt.nn.masked_linear import MaskedLinear

    names = select_layers(ctx.model, cfg.targets, cfg.ignore)
    if not names:
        raise ValueError(f"lowrank: targets {cfg.targets} matched no linear layer")
    masked = [n for n in names if isinstance(ctx.model.get_submodule(n), MaskedLinear)]
    if masked:
        log.warn(f"lowrank: {len(masked)} masked layers are factored; their sparsity masks do not carry over")
    shapes = _shapes(ctx.model, names)
    log.info(f"lowrank {cfg.method} on {len(names)} layers")
    ranks, extra = METHODS[cfg.method][1](cfg, ctx, names)
    return {**summarize(shapes, ranks), **extra}


register_stage("lowrank", [c for c, _ in METHODS.values()], apply_lowrank, changes_model=True,
               summary="Factor linear layers into low-rank A·B (SVD, SVD-LLM whitened SVD, NMF).")
