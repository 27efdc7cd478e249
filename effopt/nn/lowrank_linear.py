"""LowRankLinear: a linear layer stored as two factors, y = (x A^T) B^T + bias.

A [rank, in] and B [out, rank] replace the dense W [out, in] ~ B @ A, so the layer stores
rank * (in + out) numbers instead of in * out and computes in two thin matrix products.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from effopt.nn import register_module

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@register_module
class LowRankLinear(torch.nn.Module):
    """y = (x @ weight_a^T) @ weight_b^T + bias, with weight_a [rank, in] and weight_b [out, rank]."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False,
                 dtype: torch.dtype = torch.float32, method: str = "svd"):
        super().__init__()
        self.in_features, self.out_features, self.rank, self.method = in_features, out_features, rank, method
        self.weight_a = torch.nn.Parameter(torch.zeros(rank, in_features, dtype=dtype))
        self.weight_b = torch.nn.Parameter(torch.zeros(out_features, rank, dtype=dtype))
        self.bias = torch.nn.Parameter(torch.zeros(out_features, dtype=dtype)) if bias else None

    @classmethod
    def from_factors(cls, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None,
                     dtype: torch.dtype = torch.float32, method: str = "svd") -> "LowRankLinear":
        """Build from factors A [rank, in] and B [out, rank] (cast to `dtype`) and an optional bias."""
        rank, in_features = a.shape
        if b.shape[1] != rank:
            raise ValueError(f"factor shapes do not chain: A {tuple(a.shape)}, B {tuple(b.shape)}")
        layer = cls(in_features, b.shape[0], rank, bias is not None, dtype, method).to(a.device)
        with torch.no_grad():
            layer.weight_a.copy_(a.to(dtype))
            layer.weight_b.copy_(b.to(dtype))
            if bias is not None:
                layer.bias.copy_(bias.to(dtype))
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.weight_a), self.weight_b, self.bias)

    def effective_weight(self) -> torch.Tensor:
        """The dense weight B @ A [out, in] this layer computes with."""
        return self.weight_b @ self.weight_a

    def spec(self) -> dict:
        """Constructor arguments for checkpoints."""
        dtype = next(k for k, v in _DTYPES.items() if v == self.weight_a.dtype)
        return {"in_features": self.in_features, "out_features": self.out_features, "rank": self.rank,
                "bias": self.bias is not None, "dtype": dtype, "method": self.method}

    @classmethod
    def from_spec(cls, spec: dict) -> "LowRankLinear":
        """An empty layer of the shapes `spec` describes."""
        spec = dict(spec)
        spec["dtype"] = _DTYPES[spec["dtype"]]
        return cls(**spec)

    def to_dense(self) -> torch.nn.Linear:
        """A plain nn.Linear with weight B @ A (what a Hugging Face export stores)."""
        dense = torch.nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                                dtype=self.weight_a.dtype, device=self.weight_a.device)
        with torch.no_grad():
            dense.weight.copy_(self.effective_weight())
            if self.bias is not None:
                dense.bias.copy_(self.bias)
        return dense

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"bias={self.bias is not None}, method={self.method}")
