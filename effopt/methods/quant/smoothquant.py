"""SmoothQuant (Xiao et al., 2022): W8A8 with the activation outliers migrated into the weights.

Activations have a few channels with huge magnitudes, which ruins per-token int8 quantization of
the activations; weights are easy to quantize. Per input channel j of a group of linears sharing
one input (q/k/v after input_layernorm, gate/up after the post-attention norm),

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha),

X is divided by s (folded into the preceding RMSNorm's weight) and W's column j multiplied by s_j,
so the float function is unchanged while activations flatten out. alpha is the migration strength
(0.5 in the paper; larger moves more difficulty into the weights). Then every targeted linear
becomes an ActQuantLinear: int8 per-channel weights, int8 per-token dynamic activations, integer
matmul. max|X_j| is gathered on the float model's activations, as in the paper.

`smooth_down` also migrates down_proj's input into up_proj's rows (not in the paper, whose fold
targets are the LayerNorms; off by default).
"""

from __future__ import annotations

import torch

from effopt.methods.calibration import SharedInputs
from effopt.methods.quant.awq import fold_scales, scale_groups


def smoothing_scales(act_max: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """s_j = max|X_j|^alpha / max|W_j|^(1-alpha), W_j column j over every linear sharing the input."""
    w_max = torch.stack([w.detach().float().abs().amax(dim=0) for w in weights]).amax(dim=0)
    s = act_max.float().clamp(min=1e-5).pow(alpha) / w_max.clamp(min=1e-5).pow(1 - alpha)
    return s.clamp(min=1e-5)


def activation_max(step, names: list[str]) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """(per-channel max |x| of each named linear's input, the layer's float outputs)."""
    shared = SharedInputs()
    maxima: dict[str, list] = {}

    def hook(name: str):
        def fn(x: torch.Tensor, chunk: int) -> None:
            slot, fresh = shared.get(x, chunk, lambda: maxima.get(name) or [None])
            maxima.setdefault(name, slot)
            if fresh:
                m = x.detach().float().abs().amax(dim=0)
                slot[0] = m if slot[0] is None else torch.maximum(slot[0], m)
        return fn

    outputs = step.run({n: hook(n) for n in names}, outputs=True)
    return {n: v[0] for n, v in maxima.items()}, outputs


@torch.no_grad()
def smoothquant_layer(step, targeted: dict[str, torch.nn.Module], alpha: float, smooth_down: bool = False) -> int:
    """Smooth and W8A8-quantize one decoder layer (a calibration LayerStep); returns groups smoothed."""
    from effopt.nn.act_quant_linear import ActQuantLinear

    groups = [g for g in scale_groups(step.layer)
              if not isinstance(step.layer.get_submodule(g.prev), torch.nn.Linear)
              or (smooth_down and g.prev.endswith("up_proj"))]
    names = sorted({n for g in groups for n in g.linears} | set(targeted))
    maxima, step.next_inputs = activation_max(step, names)
    smoothed = 0
    for grp in groups:
        if not any(n in targeted for n in grp.linears):
            continue
        linears = [step.layer.get_submodule(n) for n in grp.linears]
        s = smoothing_scales(maxima[grp.linears[0]], [m.weight for m in linears], alpha)
        fold_scales(step.layer.get_submodule(grp.prev), linears, s)
        smoothed += 1
    for name, module in targeted.items():
        mask = getattr(module, "weight_mask", None)
        weight = module.weight * mask if mask is not None else module.weight
        step.replace(name, ActQuantLinear.from_weight(weight, module.bias))
    return smoothed


@torch.no_grad()
def smoothquant_model(model: torch.nn.Module, input_ids: torch.Tensor, targets: list[str], ignore: list[str], *,
                      alpha: float = 0.5, smooth_down: bool = False, batch_size: int = 8,
                      autocast: torch.dtype | None = None, device=None) -> dict:
    """SmoothQuant W8A8 over every decoder layer; returns counts for the stage's metrics."""
    from effopt.methods.calibration import calibrate_layers

    count = {"quantized_layers": 0, "smoothed_groups": 0}

    def on_layer(step) -> None:
        targeted = step.linears(targets, ignore)
        if targeted:
            count["smoothed_groups"] += smoothquant_layer(step, targeted, alpha, smooth_down)
            count["quantized_layers"] += len(targeted)

    count["calibration_tokens"] = calibrate_layers(model, input_ids, on_layer, batch_size=batch_size, device=device,
                                                   autocast=autocast, description=f"smoothquant a={alpha}")
    return count
