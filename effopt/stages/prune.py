"""prune: zero weights (unstructured / N:M, kept as MaskedLinear) or remove whole structures.

One config per method (tagged by `method:`); the algorithms live in methods/pruning/. Unstructured
methods leave MaskedLinear layers so later stages cannot regrow pruned weights; `structured`
physically shrinks the matrices and the config, so the saved model is smaller and loads anywhere.
"""

from __future__ import annotations

import time
from typing import Literal

import torch
from pydantic import Field, model_validator

from effopt.registry import register_stage
from effopt.stages.base import StageConfig, TargetedStageConfig


class PruneBase(TargetedStageConfig):
    """Options every unstructured / N:M method shares."""

    stage: Literal["prune"] = "prune"
    sparsity: float | None = Field(None, ge=0, lt=1, description="Fraction of targeted weights to prune "
                                                                 "(0 <= s < 1); or give `pattern`.")
    pattern: str | None = Field(None, pattern=r"^\d+:\d+$", description="N:M pattern: keep N of every M "
                                                                        "consecutive input weights, e.g. 2:4, 4:8.")
    semi_structured: bool = Field(False, description="With pattern 2:4: at inference on a CUDA GPU (sm_80+, fp16/"
                                                     "bf16), run the pruned layers on sparse tensor cores through "
                                                     "torch's semi-structured sparse tensors where that is faster "
                                                     "than dense (timed per shape; a runtime option).")

    @model_validator(mode="after")
    def _one_target(self):
        from effopt.methods.pruning.masks import parse_nm

        if (self.sparsity is None) == (self.pattern is None):
            raise ValueError("give exactly one of sparsity (e.g. 0.5) or pattern (e.g. '2:4')")
        if self.pattern is not None:
            parse_nm(self.pattern)
        if self.semi_structured and self.pattern != "2:4":
            raise ValueError(f"semi_structured: true needs pattern: '2:4' (sparse tensor cores take 2:4 only), "
                             f"got pattern {self.pattern!r}")
        return self

    def nm(self) -> tuple[int, int] | None:
        """(N, M) when a pattern is set."""
        from effopt.methods.pruning.masks import parse_nm

        return parse_nm(self.pattern) if self.pattern else None


class CalibratedPrune(PruneBase):
    """Methods that read calibration text."""

    data: str = Field("calibration", description="Name of the data source of calibration samples.")


class ScopedPrune(PruneBase):
    """Methods whose scores can be compared within each layer or across layers."""

    scope: Literal["layer", "global"] = Field("layer", description="Compare scores within each layer or "
                                                                   "across all targeted layers.")

    @model_validator(mode="after")
    def _scope_fits_pattern(self):
        if self.scope == "global" and self.pattern is not None:
            raise ValueError("scope: global applies to a sparsity; N:M patterns are chosen within each group of M")
        return self


class MagnitudeConfig(ScopedPrune):
    """Prune the smallest |w|, per layer or with one threshold over all targeted layers."""

    method: Literal["magnitude"] = "magnitude"


class GradientPasses(StageConfig):
    """The dtype of Taylor saliency's gradient passes (mixin)."""

    calibration_precision: Literal["model", "bfloat16"] = Field(
        "model", description="Dtype of the gradient passes: the model's own, or bfloat16 autocast (several times "
                             "faster on CPUs with bf16 matrix units; scores still accumulate in float32).")

    def autocast(self) -> torch.dtype | None:
        """torch.autocast dtype for the passes (None: the model's own)."""
        return torch.bfloat16 if self.calibration_precision == "bfloat16" else None


class TaylorConfig(ScopedPrune, GradientPasses):
    """First-order Taylor: prune the smallest sum over calibration batches of |w * dL/dw|."""

    method: Literal["taylor"] = "taylor"
    data: str = Field("calibration", description="Name of the data source of calibration samples.")
    batch_size: int = Field(4, gt=0, description="Calibration samples per gradient batch.")


class GradientConfig(TaylorConfig):
    """Alias of `taylor` (gradient-based saliency |w * dL/dw|)."""

    method: Literal["gradient"] = "gradient"


class WandaConfig(CalibratedPrune):
    """Wanda: |w| * ||x||_2 compared within each output row, layer by layer on calibration text."""

    method: Literal["wanda"] = "wanda"


class SparseGPTConfig(CalibratedPrune):
    """SparseGPT: OBS column updates with the calibration Hessian, adaptive per-block masks."""

    method: Literal["sparsegpt"] = "sparsegpt"
    block_size: int = Field(128, gt=0, description="Columns per lazy update block and per mask selection.")
    damp: float = Field(0.01, gt=0, description="Hessian dampening, fraction of its mean diagonal.")


class LearnedConfig(CalibratedPrune):
    """Hard-concrete L0 gates trained on calibration text, then thresholded per layer."""

    method: Literal["learned"] = "learned"
    steps: int = Field(300, gt=0, description="Gate training steps.")
    batch_size: int = Field(1, gt=0, description="Calibration samples per step.")
    lr: float = Field(0.05, gt=0, description="Adam learning rate of the gates' log_alpha.")
    init_keep: float = Field(0.99, gt=0.5, lt=1, description="Initial sigmoid(log_alpha) (near 1: start dense).")


class StructuredConfig(GradientPasses):
    """Remove whole heads, MLP channels or decoder layers with the lowest L1/L2 norm (same count in
    every layer, so the transformers config stays valid)."""

    stage: Literal["prune"] = "prune"
    method: Literal["structured"] = "structured"
    structure: Literal["heads", "channels", "layers"] = Field(description="What to remove.")
    amount: float = Field(gt=0, lt=1, description="Fraction of heads / channels / layers to remove (rounded "
                                                  "to whole units; heads to whole GQA steps).")
    norm: Literal["l1", "l2"] = Field("l2", description="Norm of a structure's weights (or saliencies) used to rank it.")
    criterion: Literal["weights", "taylor"] = Field(
        "weights", description="Take the norm of the weights, or of first-order Taylor saliencies |w * dL/dw| summed "
                               "over calibration batches (LLM-Pruner's element-wise importance; use norm l1).")
    data: str = Field("calibration", description="Calibration data source (criterion taylor).")
    batch_size: int = Field(4, gt=0, description="Calibration samples per gradient batch (criterion taylor).")
    gqa: Literal["query_heads", "kv_groups"] = Field(
        "query_heads", description="heads: remove the same number of query heads from every KV group, "
                                   "or whole KV groups (a KV head with its query heads).")


def _targets(cfg, ctx) -> dict[str, torch.nn.Module]:
    from effopt.stages.quantize import select_linears

    layers = dict(select_linears(ctx.model, cfg.targets, cfg.ignore))
    if not layers:
        raise ValueError(f"prune: targets {cfg.targets} matched no linear layer")
    return layers


def _finish(cfg, ctx, masks: dict[str, torch.Tensor], t0: float, **extra) -> dict:
    """Swap in MaskedLinear layers and report what was pruned."""
    from effopt.methods.pruning.masks import mask_sparsity
    from effopt.nn.masked_linear import apply_mask

    pattern = cfg.pattern or "unstructured"
    for name, keep in masks.items():
        apply_mask(ctx.model, name, keep, pattern)
    if cfg.semi_structured:
        ctx.runtime["semi_structured"] = True  # saved with checkpoints and exports; see effopt/nn/semi_structured.py
    return {"pruned_layers": len(masks), "pattern": pattern, "target_sparsity": cfg.sparsity if cfg.pattern is None
            else 1 - cfg.nm()[0] / cfg.nm()[1], "achieved_sparsity": mask_sparsity(masks),
            "prune_seconds": time.perf_counter() - t0, **extra}


def apply_magnitude(cfg: MagnitudeConfig, ctx) -> dict:
    """Magnitude pruning."""
    from effopt.methods.pruning.masks import masks_from_scores
    from effopt.methods.pruning.scores import magnitude_scores

    t0 = time.perf_counter()
    scores = magnitude_scores(_targets(cfg, ctx))
    return _finish(cfg, ctx, masks_from_scores(scores, cfg.sparsity, cfg.nm(), cfg.scope), t0)


def apply_taylor(cfg: TaylorConfig, ctx) -> dict:
    """First-order Taylor pruning over calibration batches."""
    from effopt.methods.pruning.masks import masks_from_scores
    from effopt.methods.pruning.scores import taylor_scores

    t0 = time.perf_counter()
    samples = ctx.data.samples(cfg.data)
    scores = taylor_scores(ctx.model, _targets(cfg, ctx), samples.split(cfg.batch_size), cfg.autocast())
    return _finish(cfg, ctx, masks_from_scores(scores, cfg.sparsity, cfg.nm(), cfg.scope), t0,
                   calibration_tokens=samples.numel())


def apply_wanda(cfg: WandaConfig, ctx) -> dict:
    """Wanda, sequential over decoder layers."""
    from effopt.methods.pruning.wanda import wanda_sequential

    t0 = time.perf_counter()
    samples = ctx.data.samples(cfg.data)
    masks = wanda_sequential(ctx.model, samples, list(_targets(cfg, ctx)), cfg.sparsity, cfg.nm())
    return _finish(cfg, ctx, masks, t0, calibration_tokens=samples.numel())


def apply_sparsegpt(cfg: SparseGPTConfig, ctx) -> dict:
    """SparseGPT, sequential over decoder layers."""
    from effopt.methods.pruning.sparsegpt import sparsegpt_sequential

    t0 = time.perf_counter()
    samples = ctx.data.samples(cfg.data)
    masks = sparsegpt_sequential(ctx.model, samples, list(_targets(cfg, ctx)), cfg.sparsity, cfg.nm(),
                                 cfg.block_size, cfg.damp)
    return _finish(cfg, ctx, masks, t0, calibration_tokens=samples.numel())


def apply_learned(cfg: LearnedConfig, ctx) -> dict:
    """Train L0 gates, then threshold them to the target."""
    from effopt.methods.pruning.learned import train_gates
    from effopt.methods.pruning.masks import masks_from_scores

    t0 = time.perf_counter()
    samples = ctx.data.samples(cfg.data)
    target = cfg.sparsity if cfg.pattern is None else 1 - cfg.nm()[0] / cfg.nm()[1]
    scores, stats = train_gates(ctx.model, _targets(cfg, ctx), samples, target, cfg.steps, cfg.batch_size,
                                cfg.lr, init_keep=cfg.init_keep)
    return _finish(cfg, ctx, masks_from_scores(scores, cfg.sparsity, cfg.nm()), t0, **stats)


def apply_structured(cfg: StructuredConfig, ctx) -> dict:
    """Remove heads, channels or layers and shrink the config."""
    from effopt.methods.pruning import structured
    from effopt.metrics import logical_parameters

    t0 = time.perf_counter()
    before = logical_parameters(ctx.model)
    saliency = None
    if cfg.criterion == "taylor":
        from effopt.methods.pruning.scores import taylor_scores

        linears = structured.decoder_linears(ctx.model)
        scores = taylor_scores(ctx.model, linears, ctx.data.samples(cfg.data).split(cfg.batch_size), cfg.autocast())
        saliency = {linears[name]: score for name, score in scores.items()}
    if cfg.structure == "heads":
        out = structured.prune_heads(ctx.model, cfg.amount, cfg.norm, cfg.gqa, saliency)
    elif cfg.structure == "channels":
        out = structured.prune_channels(ctx.model, cfg.amount, cfg.norm, saliency)
    else:
        out = structured.prune_layers(ctx.model, cfg.amount, cfg.norm, saliency)
    after = logical_parameters(ctx.model)
    return {**out, "parameters_before": before, "parameters_after": after,
            "parameters_removed_fraction": 1 - after / before, "prune_seconds": time.perf_counter() - t0}


METHODS = {
    "magnitude": (MagnitudeConfig, apply_magnitude),
    "taylor": (TaylorConfig, apply_taylor),
    "gradient": (GradientConfig, apply_taylor),
    "wanda": (WandaConfig, apply_wanda),
    "sparsegpt": (SparseGPTConfig, apply_sparsegpt),
    "learned": (LearnedConfig, apply_learned),
    "structured": (StructuredConfig, apply_structured),
}


def apply_prune(cfg, ctx) -> dict:
    """Dispatch to the method named by `cfg.method`."""
    return METHODS[cfg.method][1](cfg, ctx)


register_stage("prune", [c for c, _ in METHODS.values()], apply_prune, changes_model=True,
               summary="Prune weights (magnitude, taylor, wanda, sparsegpt, learned L0; N:M) or whole "
                       "heads / channels / layers.")
