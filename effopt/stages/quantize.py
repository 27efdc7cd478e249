"""quantize: replace targeted linear layers by quantized ones, or set KV-cache quantization.

One config per method (tagged by `method:`); each method is a plain function in methods/quant/:
rtn, gptq, awq (packed QuantLinear), smoothquant (W8A8 ActQuantLinear), bnb (bitsandbytes NF4 /
FP4 / LLM.int8()) and kv_cache (a runtime option, no weight changes).
"""

from __future__ import annotations

import fnmatch
from typing import Literal

import torch
from pydantic import Field, model_validator

from effopt import log
from effopt.hostmem import bounded_heap
from effopt.registry import register_stage
from effopt.stages.base import StageConfig, TargetedStageConfig


class QuantizeBase(TargetedStageConfig):
    """Options every integer weight quantization method shares."""

    stage: Literal["quantize"] = "quantize"
    bits: int = Field(4, ge=2, le=8, description="Bits per weight code (2, 3, 4 or 8 are packed).")
    group_size: int = Field(128, description="Columns per scale/zero group; -1 = per-channel. The last group "
                                             "of a row may be shorter (e.g. 576 columns with 128).")
    symmetric: bool = Field(False, description="Symmetric (zero point fixed at 2^(bits-1)) or asymmetric.")

    @model_validator(mode="after")
    def _check_layout(self):
        if self.bits not in (2, 3, 4, 8):
            raise ValueError(f"bits: packed layouts exist for 2, 3, 4 and 8 bits, got {self.bits}")
        if self.group_size == 0 or self.group_size < -1:
            raise ValueError(f"group_size: expected a positive number of columns or -1 (per-channel), got {self.group_size}")
        return self


class Calibrated(StageConfig):
    """Fields of methods that run calibration text through the model layer by layer (mixin)."""

    data: str = Field("calibration", description="Name of the data source of calibration samples.")
    batch_size: int = Field(8, gt=0, description="Calibration sequences per forward chunk.")
    calibration_precision: Literal["model", "bfloat16"] = Field(
        "model", description="Dtype of calibration forwards: the model's own, or bfloat16 autocast (faster on "
                             "CPUs with bf16 matmul; statistics still accumulate in float32).")
    host_memory: Literal["fast", "low"] = Field(
        "fast", description="low: tensors of 1 MiB and more are mapped and freed on their own, so peak host memory "
                            "follows live data, at the cost of page faults (GPTQ W4 g128 on SmolLM2, bf16 forwards: "
                            "1197 MiB in 144-192 s, against 1220 MiB in 113-131 s with fast, the allocator's heap "
                            "reuse). See effopt/hostmem.py.")


class RtnConfig(QuantizeBase):
    """Round-to-nearest, optionally with an MSE-optimal clipping search per group."""

    method: Literal["rtn"] = "rtn"
    granularity: Literal["group", "channel", "tensor"] = Field(
        "group", description="One scale per group of group_size columns, per output channel, or per tensor.")
    clip_search: bool = Field(False, description="Search a range shrink per group minimizing squared error.")


class GptqConfig(QuantizeBase, Calibrated):
    """GPTQ: column-by-column quantization with inverse-Hessian error feedback, layer by layer."""

    method: Literal["gptq"] = "gptq"
    percdamp: float = Field(0.01, gt=0, le=1, description="Damping added to H's diagonal, as a fraction of its mean.")
    blocksize: int = Field(128, gt=0, description="Columns per lazy-update block.")
    # On by default (llm-compressor's default too): on SmolLM2 W4 g128, act-order with static groups took
    # GPTQ from x1.236 to x1.119 of the baseline perplexity (RTN: x1.271); see results/quality.md.
    act_order: bool = Field(True, description="Quantize columns by decreasing Hessian diagonal (groups keep "
                                              "their original columns, so the stored layout is unchanged).")
    static_groups: bool = Field(True, description="Compute group scales from the original weights up front "
                                                  "instead of when each group is reached (pairs with act_order).")
    clip_search: bool = Field(False, description="MSE clipping search for each group's range.")
    # Chunks of 4 (not 8) sequences: the Hessians are the same sums and the layer forwards' temporaries
    # halve. That alone did not lower peak host memory (heap fragmentation set it; see host_memory).
    batch_size: int = Field(4, gt=0, description="Calibration sequences per forward chunk.")
    # bf16 calibration forwards by default (Hessian sums stay float32). SmolLM2 W4 g128, float32 model, AMX CPU:
    # x1.123 in 131 s, peak 1220 MiB; float32 forwards: x1.120 in 143-148 s, peak 1383-1410 MiB (heap
    # fragmentation of the larger temporaries; 1228 MiB in 171-207 s with host_memory: low). results/quality.md
    calibration_precision: Literal["model", "bfloat16"] = Field(
        "bfloat16", description="Dtype of calibration forwards: bfloat16 autocast (fast on CPUs with bf16 matmul; "
                                "the Hessians still accumulate in float32), or the model's own.")


class AwqConfig(QuantizeBase, Calibrated):
    """AWQ: activation-aware per-channel scales (grid search), folded into the preceding op, then rounding
    on the integer grid (bits, group_size) or, with grid: nf4, into bitsandbytes NF4 layers."""

    method: Literal["awq"] = "awq"
    n_grid: int = Field(20, ge=2, description="Grid points for alpha in [0, 1).")
    clip: bool = Field(True, description="Search a per-group clipping range on the output error (not for q/k).")
    grid: Literal["int", "nf4"] = Field(
        "int", description="What the weights are rounded to: int (bits, group_size, symmetric; packed QuantLinear) "
                           "or nf4 (bitsandbytes NF4, one absmax per block of `blocksize` weights, for the "
                           "search, the clipping and the stored bitsandbytes Linear4bit layers).")
    quantizer: Literal["rtn", "gptq"] = Field("rtn", description="Final rounding after scaling: to the nearest "
                                                                 "level, or GPTQ's error feedback.")
    blocksize: Literal[32, 64, 128, 256, 512, 1024, 2048, 4096] = Field(
        64, description="grid nf4: weights per absmax block (bitsandbytes' blocksize).")
    search_samples: int = Field(8, gt=0, description="Calibration sequences the scale search's loss uses "
                                                     "(rounded up to whole batches); statistics use all.")
    # The search re-runs attention and the MLP 20 times per layer: in bfloat16 it took AWQ W4 g128 on
    # SmolLM2 from ~13 to ~6 CPU-seconds per layer (AMX) at the same perplexity (37.95 vs 37.94).
    search_precision: Literal["model", "bfloat16"] = Field(
        "bfloat16", description="Dtype of the scale search's block forwards (float reference and candidates "
                                "alike): bfloat16 autocast, or the calibration dtype. Statistics, clipping and "
                                "the next layer's inputs keep calibration_precision. Use 'model' on CPUs "
                                "without fast bfloat16 matmul.")
    percdamp: float = Field(0.01, gt=0, le=1, description="GPTQ damping (quantizer: gptq).")
    act_order: bool = Field(False, description="GPTQ act-order (quantizer: gptq).")

    @model_validator(mode="after")
    def _check_grid(self):
        if self.grid == "nf4":
            moot = sorted(self.model_fields_set & {"bits", "group_size", "symmetric"})
            if moot:
                one = len(moot) == 1
                raise ValueError(f"grid: nf4 stores bitsandbytes NF4 (16 levels times one absmax per block of "
                                 f"`blocksize` weights), so {' and '.join(moot)} {'does' if one else 'do'} not "
                                 f"apply: remove {'it' if one else 'them'}")
        elif "blocksize" in self.model_fields_set:
            raise ValueError("blocksize is the NF4 block (grid: nf4); on the integer grid, groups are group_size")
        return self


class SmoothQuantConfig(TargetedStageConfig, Calibrated):
    """SmoothQuant W8A8: migrate activation outliers into weights, int8 weights x int8 per-token activations."""

    stage: Literal["quantize"] = "quantize"
    method: Literal["smoothquant"] = "smoothquant"
    alpha: float = Field(0.5, ge=0, le=1, description="Migration strength: s_j = max|X_j|^a / max|W_j|^(1-a).")
    smooth_down: bool = Field(False, description="Also smooth down_proj's input into up_proj (not in the paper).")


class BnbConfig(TargetedStageConfig):
    """bitsandbytes layers: NF4 / FP4 (Linear4bit) or LLM.int8() (Linear8bitLt)."""

    stage: Literal["quantize"] = "quantize"
    method: Literal["bnb"] = "bnb"
    quant_type: Literal["nf4", "fp4", "int8"] = Field("nf4", description="4-bit NormalFloat, 4-bit float, or "
                                                                         "LLM.int8().")
    double_quant: bool = Field(False, description="4-bit: quantize the absmax statistics too.")
    blocksize: Literal[32, 64, 128, 256, 512, 1024, 2048, 4096] = Field(64, description="4-bit: weights per absmax.")
    threshold: float = Field(6.0, ge=0, description="int8: activation magnitude above which a column is an outlier.")


class KvCacheConfig(StageConfig):
    """Quantize the KV cache at inference (eval and generation); weights are not changed."""

    stage: Literal["quantize"] = "quantize"
    method: Literal["kv_cache"] = "kv_cache"
    bits: Literal[8, 4] = Field(8, description="Bits per cached key/value, scaled per head and token: 8 = "
                                               "symmetric int8 (decoded on CUDA by the int8 attention kernel), "
                                               "4 = asymmetric with a zero point.")


def select_linears(model: torch.nn.Module, targets: list[str], ignore: list[str]) -> list[tuple[str, torch.nn.Linear]]:
    """(name, module) of every nn.Linear whose name matches a target glob and no ignore glob."""
    out = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in targets) and not any(fnmatch.fnmatchcase(name, p) for p in ignore):
            out.append((name, module))
    return out


def _targets(cfg, ctx) -> list[tuple[str, torch.nn.Linear]]:
    layers = select_linears(ctx.model, cfg.targets, cfg.ignore)
    if not layers:
        raise ValueError(f"quantize: targets {cfg.targets} matched no linear layer")
    return layers


def _calibration(cfg, ctx) -> tuple[torch.Tensor, dict]:
    """Calibration ids and the engine options; checks every target sits inside a decoder layer."""
    from effopt.methods.calibration import decoder_layers

    prefixes = tuple(name + "." for name, _ in decoder_layers(ctx.model))
    outside = [n for n, _ in _targets(cfg, ctx) if not n.startswith(prefixes)]
    if outside:
        raise ValueError(f"quantize/{cfg.method} calibrates decoder layers one at a time; these targets are "
                         f"outside them: {outside[:3]} (add them to ignore)")
    ids = ctx.data.samples(cfg.data)
    autocast = torch.bfloat16 if cfg.calibration_precision == "bfloat16" else None
    return ids, {"batch_size": cfg.batch_size, "autocast": autocast}


def apply_rtn(cfg: RtnConfig, ctx) -> dict:
    """Quantize every selected layer with RTN and swap in QuantLinear."""
    from effopt.methods.quant.gptq import quantized_layer
    from effopt.methods.quant.rtn import quantize_weight_granular
    from effopt.nn import set_submodule
    from effopt.nn.masked_linear import effective_weight

    layers = _targets(cfg, ctx)
    for name, linear in log.progress(layers, f"rtn w{cfg.bits} {cfg.granularity}"):
        with torch.no_grad():
            codes, scales, zeros, g = quantize_weight_granular(effective_weight(linear), cfg.bits, cfg.granularity,
                                                               cfg.group_size, cfg.symmetric, cfg.clip_search)
            set_submodule(ctx.model, name, quantized_layer(linear, codes, scales, zeros, cfg.bits, g, cfg.symmetric,
                                                           "rtn"))
    return {"quantized_layers": len(layers)}


def apply_gptq(cfg: GptqConfig, ctx) -> dict:
    """GPTQ layer by layer on the calibration samples."""
    from effopt.methods.quant.gptq import gptq_model

    ids, opts = _calibration(cfg, ctx)
    return gptq_model(ctx.model, ids, cfg.targets, cfg.ignore, bits=cfg.bits, group_size=cfg.group_size,
                      symmetric=cfg.symmetric, percdamp=cfg.percdamp, blocksize=cfg.blocksize,
                      act_order=cfg.act_order, static_groups=cfg.static_groups, clip_search=cfg.clip_search, **opts)


def apply_awq(cfg: AwqConfig, ctx) -> dict:
    """AWQ layer by layer on the calibration samples."""
    from effopt.methods.quant.awq import awq_model

    ids, opts = _calibration(cfg, ctx)
    return awq_model(ctx.model, ids, cfg.targets, cfg.ignore, bits=cfg.bits, group_size=cfg.group_size,
                     symmetric=cfg.symmetric, n_grid=cfg.n_grid, clip=cfg.clip, grid=cfg.grid,
                     quantizer=cfg.quantizer, blocksize=cfg.blocksize, search_samples=cfg.search_samples,
                     search_autocast=torch.bfloat16 if cfg.search_precision == "bfloat16" else None,
                     gptq_options={"percdamp": cfg.percdamp, "act_order": cfg.act_order}, **opts)


def apply_smoothquant(cfg: SmoothQuantConfig, ctx) -> dict:
    """SmoothQuant W8A8 layer by layer on the calibration samples."""
    from effopt.methods.quant.smoothquant import smoothquant_model

    ids, opts = _calibration(cfg, ctx)
    return smoothquant_model(ctx.model, ids, cfg.targets, cfg.ignore, alpha=cfg.alpha, smooth_down=cfg.smooth_down,
                             **opts)


def apply_bnb(cfg: BnbConfig, ctx) -> dict:
    """Swap in bitsandbytes layers (fails clearly if the backend cannot run on this device)."""
    from effopt.methods.quant.bnb import bnb_quantize_model

    count = bnb_quantize_model(ctx.model, _targets(cfg, ctx), cfg.quant_type, cfg.double_quant, cfg.blocksize,
                               cfg.threshold)
    return {"quantized_layers": count, "quant_type": cfg.quant_type}


def apply_kv_cache(cfg: KvCacheConfig, ctx) -> dict:
    """Record KV-cache quantization as a runtime option (saved with checkpoints and exports)."""
    ctx.runtime["kv_cache"] = {"bits": cfg.bits, "granularity": "head_token"}
    return {"kv_cache_bits": cfg.bits}


METHODS = {"rtn": (RtnConfig, apply_rtn), "gptq": (GptqConfig, apply_gptq), "awq": (AwqConfig, apply_awq),
           "smoothquant": (SmoothQuantConfig, apply_smoothquant), "bnb": (BnbConfig, apply_bnb),
           "kv_cache": (KvCacheConfig, apply_kv_cache)}


def apply_quantize(cfg, ctx) -> dict:
    """Dispatch to the method named by `cfg.method` (calibrated methods under their host_memory choice)."""
    with bounded_heap(isinstance(cfg, Calibrated) and cfg.host_memory == "low"):
        return METHODS[cfg.method][1](cfg, ctx)


register_stage("quantize", [c for c, _ in METHODS.values()], apply_quantize, changes_model=True,
               summary="Quantize linear weights (RTN, GPTQ, AWQ, SmoothQuant W8A8, bitsandbytes) or the KV cache.")
