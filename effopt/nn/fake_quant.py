"""Quantization-aware training: FakeQuantLinear and its conversion to a packed QuantLinear.

FakeQuantLinear keeps a float weight and computes with its round-to-nearest quantized version
(scales and zero points from the current weight's per-group min/max, as quantize_weight does).
Rounding has zero gradient almost everywhere, so the backward pass uses the straight-through
estimator (Bengio et al. 2013): w_q = w + stop_gradient(Q(w) - w), whose gradient with respect to
w is the identity. `to_quant()` stores the same codes, scales and zeros in a QuantLinear, so the
exported integer layer computes exactly what the fake-quantized layer computed in training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from effopt.methods.quant.rtn import dequantize_weight, quantize_weight
from effopt.nn import register_module, set_submodule


@register_module
class FakeQuantLinear(torch.nn.Linear):
    """nn.Linear whose forward uses the fake-quantized (optionally masked) weight, with an STE backward."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype: torch.dtype = torch.float32,
                 bits: int = 4, group_size: int = 128, symmetric: bool = False, masked: bool = False):
        super().__init__(in_features, out_features, bias=bias, dtype=dtype)
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        if masked:
            self.register_buffer("weight_mask", torch.ones(out_features, in_features, dtype=torch.bool))
        else:
            self.weight_mask = None

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, bits: int, group_size: int, symmetric: bool) -> "FakeQuantLinear":
        """Wrap a (possibly masked) linear layer's weights; a MaskedLinear's mask is kept."""
        mask = getattr(linear, "weight_mask", None)
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, linear.weight.dtype, bits,
                    group_size, symmetric, masked=mask is not None).to(linear.weight.device)
        with torch.no_grad():
            layer.weight.copy_(linear.weight if mask is None else linear.weight * mask)
            if mask is not None:
                layer.weight_mask.copy_(mask)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    def effective_weight(self) -> torch.Tensor:
        """The float weight before quantization (masked when a mask exists)."""
        return self.weight if self.weight_mask is None else self.weight * self.weight_mask

    def quantize(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(codes, scales, zeros) of the current weight."""
        with torch.no_grad():
            return quantize_weight(self.effective_weight().detach(), self.bits, self.group_size, self.symmetric)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.effective_weight()
        codes, scales, zeros = self.quantize()
        wq = dequantize_weight(codes, scales, zeros, self.group_size, w.dtype)
        w_ste = w + (wq - w).detach()
        return F.linear(x, w_ste, self.bias)

    def to_quant(self):
        """The packed QuantLinear computing exactly this layer's fake-quantized forward."""
        from effopt.nn.quant_linear import QuantLinear

        codes, scales, zeros = self.quantize()
        return QuantLinear.from_codes(codes, scales, zeros, self.bits, self.group_size,
                                      None if self.bias is None else self.bias.detach(), self.symmetric,
                                      self.weight.dtype, method="qat")

    def to_dense(self) -> torch.nn.Linear:
        """nn.Linear holding the dequantized weight (what the layer computes with)."""
        return self.to_quant().to_dense()

    def spec(self) -> dict:
        """Constructor arguments for checkpoints."""
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None,
                "dtype": str(self.weight.dtype).removeprefix("torch."), "bits": self.bits,
                "group_size": self.group_size, "symmetric": self.symmetric, "masked": self.weight_mask is not None}

    @classmethod
    def from_spec(cls, spec: dict) -> "FakeQuantLinear":
        """An empty layer of the shapes `spec` describes."""
        spec = dict(spec)
        spec["dtype"] = getattr(torch, spec["dtype"])
        return cls(**spec)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", bits={self.bits}, group_size={self.group_size}, symmetric={self.symmetric}"


def insert_fake_quant(model: torch.nn.Module, names: list[str], bits: int, group_size: int,
                      symmetric: bool) -> None:
    """Replace each named linear layer by a FakeQuantLinear (QAT starts here)."""
    for name in names:
        set_submodule(model, name, FakeQuantLinear.from_linear(model.get_submodule(name), bits, group_size, symmetric))


def convert_fake_quant(model: torch.nn.Module) -> int:
    """Replace every FakeQuantLinear by its packed QuantLinear (QAT ends here); returns how many."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)]
    for name, module in found:
        set_submodule(model, name, module.to_quant())
    return len(found)
