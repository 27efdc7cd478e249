"""QuantLinear: a linear layer whose weight is stored as packed integer codes (kernels/LAYOUT.md).

On CPU it calls torch's quantized-matmul ops through `effopt.nn.cpu_qmatmul` when they apply (few rows,
no input gradient needed), else it dequantizes and calls F.linear. On CUDA it calls the Triton kernel in
`kernels.qmatmul` when that kernel supports the bit width, else it dequantizes too. Only the packed
codes, scales and zeros are stored, so memory and checkpoint size shrink by the real ratio.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from effopt.methods.quant.packing import pack_codes, packed_row_bytes, unpack_codes
from effopt.methods.quant.rtn import dequantize_weight
from effopt.nn import cpu_qmatmul, register_module

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@register_module
class QuantLinear(torch.nn.Module):
    """y = x @ dequant(qweight)^T + bias, with weights packed `bits` per code, grouped scales/zeros."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, bias: bool = False,
                 symmetric: bool = False, dtype: torch.dtype = torch.float32, method: str = "rtn"):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.symmetric, self.method = bits, group_size, symmetric, method
        g = in_features if group_size <= 0 else group_size
        groups = -(-in_features // g)
        self.register_buffer("qweight", torch.zeros(out_features, packed_row_bytes(in_features, bits),
                                                    dtype=torch.uint8))
        self.register_buffer("scales", torch.ones(out_features, groups, dtype=dtype))
        self.register_buffer("zeros", torch.zeros(out_features, groups, dtype=dtype))
        self.bias = torch.nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False) if bias else None
        self._kernel_weight = None  # a kernel's cached re-pack (CUDA only); never saved
        self._cpu_weight = None  # (source buffers, their versions, cpu_qmatmul.Prepared | None); never saved

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                   group_size: int, bias: torch.Tensor | None, symmetric: bool, dtype: torch.dtype,
                   method: str = "rtn") -> "QuantLinear":
        """Build from unpacked codes [N, K] and per-group scales/zeros [N, G]."""
        n, k = codes.shape
        layer = cls(k, n, bits, group_size, bias is not None, symmetric, dtype, method)
        layer.qweight.copy_(pack_codes(codes, bits))
        layer.scales.copy_(scales.to(dtype))
        layer.zeros.copy_(zeros.to(dtype))
        if bias is not None:
            layer.bias.data.copy_(bias.to(dtype))
        return layer.to(codes.device)

    def spec(self) -> dict:
        """Constructor arguments for checkpoints."""
        dtype = next(k for k, v in _DTYPES.items() if v == self.scales.dtype)
        return {"in_features": self.in_features, "out_features": self.out_features, "bits": self.bits,
                "group_size": self.group_size, "bias": self.bias is not None, "symmetric": self.symmetric,
                "dtype": dtype, "method": self.method}

    @classmethod
    def from_spec(cls, spec: dict) -> "QuantLinear":
        """An empty layer of the shapes `spec` describes."""
        spec = dict(spec)
        spec["dtype"] = _DTYPES[spec["dtype"]]
        return cls(**spec)

    def codes(self) -> torch.Tensor:
        """Unpacked codes [N, K] (uint8)."""
        return unpack_codes(self.qweight, self.bits, self.in_features)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float weight [N, K] this layer computes with."""
        return dequantize_weight(self.codes(), self.scales, self.zeros, self.group_size, dtype or self.scales.dtype)

    def _prepared(self, dtype: torch.dtype):
        """The kernel's re-packed weight, cached until the buffers change (keyed on their versions)."""
        from kernels import qmatmul  # Triton path; kernels/ never imports effopt

        key = (dtype, self.qweight.device, self.qweight._version, self.scales._version, self.zeros._version)
        if self._kernel_weight is None or self._kernel_weight[0] != key:
            g = self.in_features if self.group_size <= 0 else self.group_size
            prepared = qmatmul.prepare_weight(self.qweight, self.scales.to(dtype), self.zeros.to(dtype), self.bits, g,
                                              self.in_features)
            self._kernel_weight = (key, prepared)
        return self._kernel_weight[1]

    def _apply(self, fn, *args, **kwargs):
        # .to() / .float() / .cuda() replace the buffers: drop the re-packed copies rather than keep them
        # (and the old buffers they reference) alive
        self._kernel_weight = self._cpu_weight = None
        return super()._apply(fn, *args, **kwargs)

    def _cpu_prepared(self) -> "cpu_qmatmul.Prepared | None":
        """The CPU ops' re-packed weight (None: no op applies), rebuilt when a buffer is replaced or changed."""
        sources = (self.qweight, self.scales, self.zeros)
        versions = tuple(_version(t) for t in sources)
        cached = getattr(self, "_cpu_weight", None)
        if cached is None or cached[1] != versions or any(a is not b for a, b in zip(cached[0], sources)):
            prepared = cpu_qmatmul.prepare(self.codes(), self.scales, self.zeros, self.bits, self.group_size)
            self._cpu_weight = cached = (sources, versions, prepared)
        return cached[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if cpu_qmatmul.usable(x, self.in_features, self.bits, self.group_size) and self.qweight.device.type == "cpu" \
                and not (torch.is_grad_enabled() and x.requires_grad):  # the ops have no backward
            prepared = self._cpu_prepared()
            if prepared is not None:
                return cpu_qmatmul.matmul(x, prepared, self.bias)
        if x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and self.bits in (2, 4, 8) \
                and not (torch.is_grad_enabled() and x.requires_grad):  # the kernel has no backward
            from kernels import qmatmul

            bias = None if self.bias is None else self.bias.to(x.dtype)
            return qmatmul.quant_matmul(x, self._prepared(x.dtype), bias=bias)
        weight = self.dequantize(x.dtype)
        return F.linear(x, weight, None if self.bias is None else self.bias.to(x.dtype))

    def to_dense(self) -> torch.nn.Linear:
        """An nn.Linear computing the same function (for exports plain transformers can load)."""
        dense = torch.nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                                dtype=self.scales.dtype, device=self.qweight.device)
        with torch.no_grad():
            dense.weight.copy_(self.dequantize())
            if self.bias is not None:
                dense.bias.copy_(self.bias)
        return dense

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, symmetric={self.symmetric}, method={self.method}")


def _version(t: torch.Tensor) -> int | None:
    """In-place write counter; inference tensors have none (the identity check above still applies)."""
    return None if t.is_inference() else t._version
