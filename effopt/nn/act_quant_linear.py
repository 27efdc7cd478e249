"""W8A8 linear layer: int8 weights (per output channel) times int8 activations (per token, dynamic).

The weight is stored in QuantLinear's packed layout (8-bit codes, one symmetric scale per row,
zero point 128), so sizes, checkpoints and kernels treat it like any 8-bit QuantLinear. The forward
is real integer arithmetic: each token's activations are quantized at run time to int8 with their
own scale max|x_t| / 127, the int8 x int8 products are summed in int32 (torch._int_mm; exact
float64 matmul of the integer values where that op is unavailable), and the int32 result is
rescaled by (activation scale x weight scale). On CUDA the Triton kernels of kernels.int8_matmul can
do all three (quantize, int8 tensor-core product, fused rescale), with the same codes and sums
(on by default: 4.3-14.2x the torch path on an H200, results/kernels.md).

`to_dense()` (for plain Hugging Face exports) returns the dequantized weights only: a dense export
computes with float activations; `export: packed: true` keeps the W8A8 arithmetic.
"""

from __future__ import annotations

import os

import torch

from effopt.methods.quant.packing import pack_codes
from effopt.nn import register_module
from effopt.nn.quant_linear import QuantLinear

ACT_QMAX = 127


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per-row quantization of x [M, K]: (codes int8 [M, K], scales float32 [M, 1]).

    The scale is max|x| times fp32(1/127), not max|x| / 127: torch divides by a Python scalar
    exactly on CPU but through that reciprocal on CUDA, and the codes should not depend on the
    device (kernels.int8_matmul.quantize_rows matches this code for code).
    """
    scale = x.float().abs().amax(dim=-1, keepdim=True).clamp_min(1e-8) * (1.0 / ACT_QMAX)
    codes = torch.clamp(torch.round(x.float() / scale), -ACT_QMAX, ACT_QMAX).to(torch.int8)
    return codes, scale


def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact int32 product of int8 a [M, K] and int8 b [K, N]."""
    try:
        return torch._int_mm(a, b)
    except RuntimeError:  # shapes or device the int8 kernel does not take: exact in float64
        return (a.double() @ b.double()).to(torch.int32)


# On by default: on the H200 the Triton path ran 4.3-14.2x the torch path (quantize_per_token +
# torch._int_mm + float rescale) at M = 64-1024; at M <= 16 torch._int_mm refuses the shape and the
# torch path falls back to float64 (results/kernels.md). EFFOPT_W8A8_KERNEL=0 opts out.
USE_W8A8_KERNEL = os.environ.get("EFFOPT_W8A8_KERNEL", "1") == "1"


def w8a8_kernel(x: torch.Tensor):
    """kernels.int8_matmul.w8a8_linear when it can run this call, else None (the torch path below).

    It can (unless USE_W8A8_KERNEL is off) on CUDA, for fp16 / bf16 / fp32 inputs that need no
    gradient (the kernels have no backward), when Triton is importable. It computes what the torch
    path does: the same codes, the same exact int32 sums, the same float epilogue (up to float
    rounding: the GPU may fuse a multiply-add)."""
    if not USE_W8A8_KERNEL or not x.is_cuda or x.dtype not in (torch.float16, torch.bfloat16, torch.float32) \
            or (torch.is_grad_enabled() and x.requires_grad):
        return None
    try:
        from kernels.int8_matmul import w8a8_linear  # kernels/ never imports effopt
    except ImportError:  # no Triton
        return None
    return w8a8_linear


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
        kernel = w8a8_kernel(x)
        if kernel is not None and x.device == self.qweight.device:
            # qweight holds the codes + 128 (zero point 128): the kernel flips them to int8 in registers
            return kernel(x, self.qweight, self.scales, self.bias)
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
