"""QLoRA (Dettmers et al. 2023): LoRA over a frozen 4-bit (or lower) base.

The base is either already quantized (effopt QuantLinear from the quantize stage, or bitsandbytes
Linear4bit), or quantized here from dense layers: bitsandbytes NF4 with double quantization (the
paper's recipe) or effopt's packed integer codes. With LoftQ the base codes and the LoRA factors
are chosen together (effopt.methods.peft.loftq).
"""

from __future__ import annotations

import torch

from effopt.methods.peft.lora import add_lora
from effopt.methods.peft.loftq import loftq, nf4_quantizer, rtn_quantizer
from effopt.nn import set_submodule
from effopt.nn.masked_linear import MaskedLinear
from effopt.nn.quant_linear import QuantLinear


def _dense(model: torch.nn.Module, name: str) -> torch.nn.Linear:
    module = model.get_submodule(name)
    if type(module) is not torch.nn.Linear:
        kind = "pruned (MaskedLinear)" if isinstance(module, MaskedLinear) else type(module).__name__
        raise ValueError(f"qlora base {name} is {kind}; only dense nn.Linear layers are quantized here "
                         f"(quantize first and use base: existing)")
    return module


def _nf4_layer(linear: torch.nn.Linear, quantized_input: torch.Tensor) -> torch.nn.Module:
    from effopt.nn.bnb_linear import Bnb4bitLinear

    return Bnb4bitLinear.from_linear(linear, quantized_input.to(linear.weight.dtype), "nf4", double_quant=True,
                                     blocksize=64)


def _int_layer(linear: torch.nn.Linear, state, bits: int, group_size: int, symmetric: bool) -> QuantLinear:
    codes, scales, zeros = state
    bias = None if linear.bias is None else linear.bias.detach()
    return QuantLinear.from_codes(codes, scales, zeros, bits, group_size, bias, symmetric, linear.weight.dtype,
                                  method="qlora")


def quantize_base(model: torch.nn.Module, names: list[str], base: str, rank: int, bits: int = 4,
                  group_size: int = 128, symmetric: bool = False, loftq_iters: int = 0) -> dict:
    """Quantize the dense layers `names` in place ("nf4" or "int"); with loftq_iters > 0 also return
    each layer's LoftQ factors {name: (L, R)} to initialise LoRA with."""
    quantizer = nf4_quantizer() if base == "nf4" else rtn_quantizer(bits, group_size, symmetric)
    factors = {}
    for name in names:
        linear = _dense(model, name)
        w = linear.weight.detach()
        if loftq_iters:
            state, _, left, right = loftq(w, quantizer, rank, loftq_iters)
            factors[name] = (left, right)
        else:
            state, _ = quantizer(w.float())
        new = _nf4_layer(linear, state) if base == "nf4" else _int_layer(linear, state, bits, group_size, symmetric)
        set_submodule(model, name, new)
    return factors


def set_lora_factors(model: torch.nn.Module, factors: dict) -> None:
    """Write LoftQ factors into the injected LoRA layers: B A scaling = L R."""
    with torch.no_grad():
        for name, (left, right) in factors.items():
            layer = model.get_submodule(name)
            key = layer.active_adapters[0]
            layer.lora_A[key].weight.copy_(right)
            layer.lora_B[key].weight.copy_(left / layer.scaling[key])


def add_qlora(model: torch.nn.Module, names: list[str], base: str = "existing", r: int = 8, alpha: float = 16.0,
              dropout: float = 0.0, bits: int = 4, group_size: int = 128, symmetric: bool = False,
              loftq_iters: int = 0) -> torch.nn.Module:
    """Quantize the base if asked (`base` in existing | nf4 | int), then inject LoRA (LoftQ-initialised
    when loftq_iters > 0, which needs dense layers to start from)."""
    if base == "existing":
        if loftq_iters:
            raise ValueError("LoftQ chooses the base's codes itself: use base: nf4 or int on dense layers")
        for name in names:
            module = model.get_submodule(name)
            if type(module) is torch.nn.Linear or isinstance(module, MaskedLinear):
                raise ValueError(f"qlora base: existing, but {name} is not quantized (quantize first, or "
                                 f"use base: nf4 / int)")
        return add_lora(model, names, r, alpha, dropout)
    factors = quantize_base(model, names, base, r, bits, group_size, symmetric, loftq_iters)
    add_lora(model, names, r, alpha, dropout)
    set_lora_factors(model, factors)
    return model
