"""MaskedLinear: a linear layer with a fixed 0/1 weight mask (unstructured or N:M sparsity).

The forward multiplies by the mask, so a pruned weight contributes nothing and receives no
gradient: later finetune or distill stages cannot regrow it. The mask is a persistent buffer and
survives checkpoints; quantizing a MaskedLinear quantizes the masked weight (zero stays zero).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from effopt.nn import register_module, set_submodule


@register_module
class MaskedLinear(torch.nn.Linear):
    """nn.Linear with `weight_mask` (same shape as weight, bool); computes with weight * mask."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype: torch.dtype = torch.float32,
                 pattern: str = "unstructured"):
        super().__init__(in_features, out_features, bias=bias, dtype=dtype)
        self.pattern = pattern
        self.register_buffer("weight_mask", torch.ones(out_features, in_features, dtype=torch.bool))

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, mask: torch.Tensor, pattern: str = "unstructured") -> "MaskedLinear":
        """Wrap an existing layer's weights with `mask` (True = keep); masked weights are zeroed too."""
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, linear.weight.dtype, pattern)
        layer.to(linear.weight.device)
        with torch.no_grad():
            layer.weight_mask.copy_(mask.to(torch.bool))
            layer.weight.copy_(linear.weight * layer.weight_mask)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    def effective_weight(self) -> torch.Tensor:
        """The weight the layer computes with (masked)."""
        return self.weight * self.weight_mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.effective_weight(), self.bias)

    def spec(self) -> dict:
        """Constructor arguments for checkpoints."""
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None,
                "dtype": str(self.weight.dtype).removeprefix("torch."), "pattern": self.pattern}

    @classmethod
    def from_spec(cls, spec: dict) -> "MaskedLinear":
        spec = dict(spec)
        spec["dtype"] = getattr(torch, spec["dtype"])
        return cls(**spec)

    def to_dense(self) -> torch.nn.Linear:
        """A plain nn.Linear holding the masked weights (zeros stay in place)."""
        dense = torch.nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                                dtype=self.weight.dtype, device=self.weight.device)
        with torch.no_grad():
            dense.weight.copy_(self.effective_weight())
            if self.bias is not None:
                dense.bias.copy_(self.bias)
        return dense

    def extra_repr(self) -> str:
        return super().extra_repr() + f", pattern={self.pattern}"


def effective_weight(module: torch.nn.Module) -> torch.Tensor:
    """The weight a linear-like module computes with (masked / dequantized where needed)."""
    if hasattr(module, "effective_weight"):
        return module.effective_weight()
    if hasattr(module, "dequantize"):
        return module.dequantize()
    return module.weight


def apply_mask(model: torch.nn.Module, name: str, mask: torch.Tensor, pattern: str = "unstructured") -> None:
    """Attach (or tighten) a mask on the linear layer `name`, replacing it by a MaskedLinear."""
    module = model.get_submodule(name)
    if isinstance(module, MaskedLinear):
        with torch.no_grad():
            module.weight_mask &= mask.to(torch.bool)
            module.weight.mul_(module.weight_mask)
        module.pattern = pattern
        return
    set_submodule(model, name, MaskedLinear.from_linear(module, mask, pattern))
