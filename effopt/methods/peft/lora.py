"""LoRA (Hu et al. 2021) through peft, over every base effopt models contain.

peft's own layers wrap nn.Linear and bitsandbytes Linear4bit. Two bases need custom peft layers,
registered through peft's custom-module API:
- MaskedLinear: the update is masked too, y = x ((W + s B A) * M)^T, so merging it keeps pruned
  weights at zero and the merged layer computes exactly what was trained.
- QuantLinear (effopt's packed layers): y = Q(x) + s B A x; the base is never merged into.

`finalize_lora` turns a trained model back into a plain one of effopt modules: dense and masked
bases get the update merged in; packed bases become LoraQuantLinear and effopt's bitsandbytes 4-bit
layers LoraBnb4bitLinear (the base stays quantized); other bitsandbytes layers are dequantized and
merged (a dense layer computing the same function).
"""

from __future__ import annotations

import fnmatch
import warnings

import torch
import torch.nn.functional as F
from peft.tuners.lora import Linear as PeftLoraLinear
from peft.tuners.lora import LoraLayer

from effopt.nn import set_submodule
from effopt.nn.masked_linear import MaskedLinear
from effopt.nn.quant_linear import QuantLinear


class MaskedLoraLinear(PeftLoraLinear):
    """peft LoRA layer over a MaskedLinear: the low-rank update is multiplied by the mask."""

    def get_delta_weight(self, adapter) -> torch.Tensor:
        return super().get_delta_weight(adapter) * self.get_base_layer().weight_mask

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters or self.merged:
            return super().forward(x, *args, **kwargs)
        base = self.get_base_layer()
        mask = base.weight_mask.to(base.weight.dtype)
        weight, extra = base.weight, None
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            delta = (self.lora_B[name].weight @ self.lora_A[name].weight) * self.scaling[name]
            dropout = self.lora_dropout[name]
            if isinstance(dropout, torch.nn.Identity):
                weight = weight + delta.to(weight.dtype)
            else:
                term = F.linear(dropout(x), delta * mask)
                extra = term if extra is None else extra + term
        out = F.linear(x, weight * mask, base.bias)
        return out if extra is None else out + extra.to(out.dtype)


class QuantLoraLinear(PeftLoraLinear):
    """peft LoRA layer over an effopt QuantLinear (packed; never merged into)."""

    def merge(self, *args, **kwargs) -> None:
        raise ValueError("a packed QuantLinear base is not merged into; finalize_lora keeps it as LoraQuantLinear")


def is_bnb(module: torch.nn.Module) -> bool:
    """True for bitsandbytes 4-bit / 8-bit linear layers (subclasses of nn.Linear with packed weights)."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return False
    return isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


def _is_linear_like(module: torch.nn.Module) -> bool:
    return isinstance(module, (torch.nn.Linear, QuantLinear))


def select_targets(model: torch.nn.Module, targets: list[str], ignore: list[str]) -> list[str]:
    """Names of linear-like modules (dense, masked, packed, bitsandbytes) matching targets, not ignore."""
    names = []
    for name, module in model.named_modules():
        if not _is_linear_like(module) or isinstance(getattr(module, "base_layer", None), torch.nn.Module):
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in targets) and not any(fnmatch.fnmatchcase(name, p) for p in ignore):
            names.append(name)
    return names


def lora_config(names: list[str], r: int, alpha: float, dropout: float, init: str = "default"):
    """A peft LoraConfig over exactly `names`, with effopt's custom layers registered."""
    from peft import LoraConfig

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=names, bias="none",
                        init_lora_weights=True if init == "default" else init)
    config._register_custom_module({MaskedLinear: MaskedLoraLinear, QuantLinear: QuantLoraLinear})
    return config


def add_lora(model: torch.nn.Module, names: list[str], r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
             init: str = "default") -> torch.nn.Module:
    """Freeze `model` and inject LoRA layers on `names` in place (B = 0: the output is unchanged).

    Args:
        init: "default" (A Kaiming-uniform, B zero) or "gaussian" (A ~ N(0, 1/r)); LoftQ is set
            afterwards by `effopt.methods.peft.loftq`.
    """
    from peft import inject_adapter_in_model

    if not names:
        raise ValueError("LoRA: no target layer matched")
    for p in model.parameters():
        p.requires_grad_(False)
    with warnings.catch_warnings():  # peft cannot tell QuantLinear's shapes are in_/out_features: they are
        warnings.filterwarnings("ignore", message="Unsupported layer type")
        inject_adapter_in_model(lora_config(names, r, alpha, dropout, init), model)
    return model


def lora_layers(model: torch.nn.Module) -> list[tuple[str, LoraLayer]]:
    """(name, layer) of every peft LoRA layer in `model`."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def _factors(layer: LoraLayer) -> tuple[torch.Tensor, torch.Tensor, float]:
    name = layer.active_adapters[0]
    return layer.lora_A[name].weight.detach(), layer.lora_B[name].weight.detach(), float(layer.scaling[name])


def _finalize_one(layer: LoraLayer) -> torch.nn.Module:
    from effopt.nn.adapters import LORA_TYPES, LoraBnb4bitLinear, LoraQuantLinear
    from effopt.nn.bnb_linear import Bnb4bitLinear

    base = layer.get_base_layer()
    a, b, scaling = _factors(layer)
    if isinstance(base, LORA_TYPES):  # a second LoRA over a first: ranks concatenate exactly
        a = torch.cat([base.lora_A.detach(), a.to(base.lora_A.dtype)])
        b = torch.cat([base.lora_B.detach() * base.scaling, b.to(base.lora_B.dtype) * scaling], dim=1)
        return type(base).from_base(base, a, b, alpha=float(a.shape[0]))
    if isinstance(base, QuantLinear):
        return LoraQuantLinear.from_base(base, a, b * scaling, alpha=float(a.shape[0]))
    if isinstance(base, Bnb4bitLinear):
        return LoraBnb4bitLinear.from_base(base, a, b * scaling, alpha=float(a.shape[0]))
    if is_bnb(base):
        return _merge_bnb(base, (b @ a) * scaling)
    layer.merge()
    if isinstance(base, MaskedLinear):
        with torch.no_grad():
            base.weight.mul_(base.weight_mask.to(base.weight.dtype))
    return base


def _merge_bnb(base: torch.nn.Module, delta: torch.Tensor) -> torch.nn.Linear:
    """Dequantize a bitsandbytes 4/8-bit layer and add the update: a dense layer, same function."""
    import bitsandbytes as bnb

    if isinstance(base, bnb.nn.Linear4bit):
        if getattr(base.weight.quant_state, "packing_format_for_cpu", False):
            # bitsandbytes re-packs 4-bit weights for its CPU inference kernel on the first eval forward;
            # undo that before dequantizing (its own state_dict() does the same).
            base.weight.data, base.weight.quant_state = bnb.functional._convert_weight_packed_for_cpu_inverse(
                base.weight.data, base.weight.quant_state)
        weight = bnb.functional.dequantize_4bit(base.weight.data, base.weight.quant_state)
    else:
        weight = bnb.functional.int8_vectorwise_dequant(base.weight.data, base.weight.SCB)
    dtype = base.bias.dtype if base.bias is not None else delta.dtype
    dense = torch.nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, dtype=dtype,
                            device=delta.device)
    with torch.no_grad():
        dense.weight.copy_(weight.to(torch.float32) + delta.float())
        if base.bias is not None:
            dense.bias.copy_(base.bias)
    return dense


def finalize_lora(model: torch.nn.Module) -> dict:
    """Replace every peft LoRA layer by an effopt-checkpointable module (see module docstring)."""
    from effopt.nn.adapters import LORA_TYPES

    counts = {"merged": 0, "kept_on_quantized": 0}
    for name, layer in lora_layers(model):
        new = _finalize_one(layer)
        counts["kept_on_quantized" if isinstance(new, LORA_TYPES) else "merged"] += 1
        set_submodule(model, name, new)
    for p in model.parameters():
        p.requires_grad_(False)
    return counts
