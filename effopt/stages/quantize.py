"""quantize: replace targeted linear layers by packed QuantLinear layers.

One config per method (tagged by `method:`); each method is a plain function in methods/quant/.
"""

from __future__ import annotations

import fnmatch
from typing import Literal

import torch
from pydantic import Field, model_validator

from effopt import log
from effopt.registry import register_stage
from effopt.stages.base import TargetedStageConfig


class QuantizeBase(TargetedStageConfig):
    """Options every weight quantization method shares."""

    stage: Literal["quantize"] = "quantize"
    bits: int = Field(4, ge=2, le=8, description="Bits per weight code (2, 3, 4 or 8 are packed).")
    group_size: int = Field(128, description="Columns per scale/zero group; -1 = per-channel.")
    symmetric: bool = Field(False, description="Symmetric (zero point fixed at 2^(bits-1)) or asymmetric.")

    @model_validator(mode="after")
    def _check_layout(self):
        if self.bits not in (2, 3, 4, 8):
            raise ValueError(f"bits: packed layouts exist for 2, 3, 4 and 8 bits, got {self.bits}")
        if self.group_size == 0 or self.group_size < -1:
            raise ValueError(f"group_size: expected a positive number of columns or -1 (per-channel), got {self.group_size}")
        return self


class RtnConfig(QuantizeBase):
    """Round-to-nearest, optionally with an MSE-optimal clipping search per group."""

    method: Literal["rtn"] = "rtn"
    clip_search: bool = Field(False, description="Search a range shrink per group minimizing squared error.")


def select_linears(model: torch.nn.Module, targets: list[str], ignore: list[str]) -> list[tuple[str, torch.nn.Linear]]:
    """(name, module) of every nn.Linear whose name matches a target glob and no ignore glob."""
    out = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in targets) and not any(fnmatch.fnmatchcase(name, p) for p in ignore):
            out.append((name, module))
    return out


def apply_rtn(cfg: RtnConfig, ctx) -> dict:
    """Quantize every selected layer with RTN and swap in QuantLinear."""
    from effopt.methods.quant.rtn import quantize_weight
    from effopt.nn import set_submodule
    from effopt.nn.masked_linear import effective_weight
    from effopt.nn.quant_linear import QuantLinear

    layers = select_linears(ctx.model, cfg.targets, cfg.ignore)
    if not layers:
        raise ValueError(f"quantize: targets {cfg.targets} matched no linear layer")
    for name, linear in log.progress(layers, f"rtn w{cfg.bits} g{cfg.group_size}"):
        with torch.no_grad():
            codes, scales, zeros = quantize_weight(effective_weight(linear), cfg.bits, cfg.group_size, cfg.symmetric,
                                                   cfg.clip_search)
            layer = QuantLinear.from_codes(codes, scales, zeros, cfg.bits, cfg.group_size, linear.bias, cfg.symmetric,
                                           linear.weight.dtype, method="rtn")
        set_submodule(ctx.model, name, layer)
    return {"quantized_layers": len(layers)}


METHODS = {"rtn": (RtnConfig, apply_rtn)}


def apply_quantize(cfg, ctx) -> dict:
    """Dispatch to the method named by `cfg.method`."""
    return METHODS[cfg.method][1](cfg, ctx)


register_stage("quantize", [c for c, _ in METHODS.values()], apply_quantize, changes_model=True,
               summary="Quantize linear weights into packed integer layers.")
