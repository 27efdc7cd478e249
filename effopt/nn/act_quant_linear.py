"""W8A8 linear layer: int8 weights (per output channel) times int8 activations (per token, dynamic).

The weight is stored in QuantLinear's packed layout (8-bit codes, one symmetric scale per row,
zero point 128), so sizes, checkpoints and kernels treat it like any 8-bit QuantLinear. The forward
is real integer arithmetic: each token's activations are quantized at run time to int8 with their
own scale max|x_t| / 127, the int8 x int8 products are summed in int32 (torch._int_mm; exact
float64 matmul of the integer values where that op is unavailable), and the int32 result is
rescaled by (activation scale x weight scale).

`to_dense()` (for plain Hugging Face exports) returns the dequantized weights only: a dense export
computes with float activations; `export: packed: true` keeps the W8A8 arithmetic.
"""

from __future__ import annotations

import torch

from effopt.methods.quant.packing import pack_codes
from effopt.nn import register_module
from effopt.nn.quant_linear import QuantLinear

ACT_QMAX = 127


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per-row quantization of x [M, K]: (codes int8 [M, K], scales float32 [M, 1])."""
    scale = x.float().abs().amax(dim=-1, keepdim=True).clamp_min(1e-8) / ACT_QMAX
    codes = torch.clamp(torch.round(x.float() / scale), -ACT_QMAX, ACT_QMAX).to(torch.int8)
    return codes, scale


def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact int32 product of int8 a [M, K] and int8 b [K, N]."""
    try:
        return torch._int_mm(a, b)
    except RuntimeError:  # shapes or device the int8 kernel does not take: exact in float64
        return (a.double() @ b.double()).to(torch.int32)


@register_module
class ActQuantLinear(QuantLinear):
    """y = (q8(x) @ W8^T) * s_x * s_w + bias, with per-token dynamic activation quantization."""

    def __init__(self, in_features: int, out_features: int, bits: int = 8, group_size: int = -1, bias: bool = False,
                 symmetric: bool = True, dtype: torch.dtype = torch.float32, method: str = "smoothquant"):
        if bits != 8 or group_size != -1 or not symmetric:
            raise ValueError("ActQuantLinear stores symmetric per-channel 8-bit weights")
        super().__init__(in_features, out_features, 8, -1, bias, True, dtype, method)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None,
                    method: str = "smoothquant") -> "ActQuantLinear":
        """Quantize a float weight [N, K] per output channel: scale = max|w_row| / 127."""
        n, k = weight.shape
        w = weight.detach().float()
        scale = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / ACT_QMAX
        codes = torch.clamp(torch.round(w / scale), -ACT_QMAX, ACT_QMAX) + 128
        layer = cls(k, n, bias=bias is not None, dtype=weight.dtype, method=method)
        layer.qweight.copy_(pack_codes(codes.to(torch.uint8), 8))
        layer.scales.copy_(scale.to(weight.dtype))
        layer.zeros.fill_(128)
        if bias is not None:
            layer.bias.data.copy_(bias.to(weight.dtype))
        return layer.to(weight.device)

    def int_weight(self) -> torch.Tensor:
        """Signed int8 weight codes [N, K]."""
        return (self.qweight.to(torch.int16) - 128).to(torch.int8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        xq, xs = quantize_per_token(x.reshape(-1, shape[-1]))
        acc = int8_matmul(xq, self.int_weight().t())
        y = acc.float() * xs * self.scales.float().view(1, -1)
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype).view(*shape[:-1], self.out_features)

    def spec(self) -> dict:
        """Constructor arguments for checkpoints (same fields as QuantLinear)."""
        return super().spec()
