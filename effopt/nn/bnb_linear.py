"""bitsandbytes layers made checkpointable: NF4/FP4 (bnb.nn.Linear4bit, optional double quantization
of the absmax statistics) and LLM.int8() (bnb.nn.Linear8bitLt with outlier threshold).

The quantized state lives in bitsandbytes' own tensors; these subclasses add what effopt needs:
`spec()` / `from_spec()` so a checkpoint rebuilds them (the 4-bit quantization state is restored
with `Params4bit.from_prequantized`, the int8 one by Linear8bitLt's own loader), `dequantize()` /
`effective_weight()` (the weight the layer computes with, for metrics) and `to_dense()`.
LLM.int8() quantizes activations at run time (in eval mode), so its dense export, like W8A8's,
keeps only the weight side.
"""

from __future__ import annotations

import logging

import torch

# bitsandbytes warns at import that it cannot fetch an optional CPU kernel from the Hugging Face hub
# (offline here; its own kernels are used instead), and on every int8 matmul whose input is not
# float16 (it casts): neither needs the user's attention.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)

import bitsandbytes as bnb  # noqa: E402

from effopt.nn import register_module  # noqa: E402

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _dtype_name(dtype: torch.dtype) -> str:
    return next(k for k, v in _DTYPES.items() if v == dtype)


def _dense(module, weight: torch.Tensor) -> torch.nn.Linear:
    dense = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                            dtype=weight.dtype, device=weight.device)
    with torch.no_grad():
        dense.weight.copy_(weight)
        if module.bias is not None:
            dense.bias.copy_(module.bias.to(weight.dtype))
    return dense


@register_module
class Bnb4bitLinear(bnb.nn.Linear4bit):
    """bnb.nn.Linear4bit (NF4 or FP4, blockwise absmax, optional double quantization)."""

    packed_weight = True  # weight.numel() counts bytes, not weights (see metrics.logical_parameters)

    def __init__(self, in_features: int, out_features: int, bias: bool = False, quant_type: str = "nf4",
                 double_quant: bool = False, blocksize: int = 64, dtype: torch.dtype = torch.float32):
        super().__init__(in_features, out_features, bias=bias, compute_dtype=dtype, compress_statistics=double_quant,
                         quant_type=quant_type, device="cpu")
        self.blocksize, self.dtype = blocksize, dtype
        # On AVX512-BF16 CPUs bitsandbytes repacks the weight at the first eval forward, with absmax
        # rounded to bfloat16, and its state dict no longer reloads to the same function: keep the
        # portable layout (dequantize to the compute dtype, then matmul).
        self.support_avx512bf16_for_cpu = False
        if bias:
            self.bias.data = self.bias.data.to(dtype)

    @classmethod
    def from_linear(cls, linear: torch.nn.Module, weight: torch.Tensor, quant_type: str = "nf4",
                    double_quant: bool = False, blocksize: int = 64) -> "Bnb4bitLinear":
        """Quantize `weight` (the float weight of `linear`) into a new layer on linear's device."""
        device = weight.device
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, quant_type, double_quant,
                    blocksize, weight.dtype)
        layer.weight = bnb.nn.Params4bit(weight.detach().clone().cpu(), requires_grad=False, quant_type=quant_type,
                                         compress_statistics=double_quant, blocksize=blocksize, module=layer)
        layer.weight = layer.weight._quantize(device)
        if linear.bias is not None:
            layer.bias = torch.nn.Parameter(linear.bias.detach().clone().to(device), requires_grad=False)
        return layer

    def spec(self) -> dict:
        """Constructor arguments for checkpoints."""
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None,
                "quant_type": self.weight.quant_type, "double_quant": bool(self.weight.compress_statistics),
                "blocksize": self.blocksize, "dtype": _dtype_name(self.dtype)}

    @classmethod
    def from_spec(cls, spec: dict) -> "Bnb4bitLinear":
        """An empty layer; its quantized state comes from the checkpoint's state dict."""
        spec = dict(spec, dtype=_DTYPES[spec["dtype"]])
        return cls(**spec)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "weight"
        stats = {k[len(key) + 1:]: v for k, v in state_dict.items() if k.startswith(key + ".")}
        if key not in state_dict or not stats:
            missing_keys.append(key)
        else:
            device = self.weight.device
            self.weight = bnb.nn.Params4bit.from_prequantized(state_dict[key], stats, device=device, module=self)
        if self.bias is not None:
            if prefix + "bias" in state_dict:
                self.bias.data.copy_(state_dict[prefix + "bias"])
            else:
                missing_keys.append(prefix + "bias")

    @torch.no_grad()
    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float weight [N, K] the layer computes with (the layer applied to identity rows)."""
        rows = []
        for start in range(0, self.in_features, 1024):
            eye = torch.eye(self.in_features, dtype=self.dtype, device=self.weight.device)[start:start + 1024]
            out = super().forward(eye)
            rows.append(out - self.bias.to(out.dtype) if self.bias is not None else out)
        return torch.cat(rows).t().contiguous().to(dtype or self.dtype)

    def effective_weight(self) -> torch.Tensor:
        """Alias of dequantize() (what metrics read)."""
        return self.dequantize()

    def to_dense(self) -> torch.nn.Linear:
        """An nn.Linear with the dequantized weights."""
        return _dense(self, self.dequantize())


@register_module
class Bnb8bitLinear(bnb.nn.Linear8bitLt):
    """bnb.nn.Linear8bitLt: LLM.int8() — int8 rows, activations quantized per row at run time,
    input columns with any |x| above `threshold` computed in 16-bit (mixed decomposition)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, threshold: float = 6.0,
                 dtype: torch.dtype = torch.float32):
        super().__init__(in_features, out_features, bias=bias, has_fp16_weights=False, threshold=threshold,
                         device="cpu")
        self.threshold, self.dtype = threshold, dtype
        self.weight = bnb.nn.Int8Params(torch.zeros(out_features, in_features), requires_grad=False,
                                        has_fp16_weights=False)._quantize("cpu")  # loadable state
        if bias:
            self.bias.data = self.bias.data.to(dtype)

    @classmethod
    def from_linear(cls, linear: torch.nn.Module, weight: torch.Tensor, threshold: float = 6.0) -> "Bnb8bitLinear":
        """Quantize `weight` (the float weight of `linear`) into a new layer on linear's device."""
        device = weight.device
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, threshold, weight.dtype)
        layer.weight = bnb.nn.Int8Params(weight.detach().clone().cpu(), requires_grad=False,
                                         has_fp16_weights=False)._quantize(device)
        if linear.bias is not None:
            layer.bias = torch.nn.Parameter(linear.bias.detach().clone().to(device), requires_grad=False)
        return layer

    def spec(self) -> dict:
        """Constructor arguments for checkpoints."""
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None,
                "threshold": self.threshold, "dtype": _dtype_name(self.dtype)}

    @classmethod
    def from_spec(cls, spec: dict) -> "Bnb8bitLinear":
        """An empty layer; its int8 weight and row scales come from the checkpoint's state dict."""
        return cls(**dict(spec, dtype=_DTYPES[spec["dtype"]]))

    def _row_scales(self) -> torch.Tensor:
        scb = self.weight.SCB if getattr(self.weight, "SCB", None) is not None else self.state.SCB
        return scb.float()

    @torch.no_grad()
    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """int8 rows times their absmax / 127 (the weight side of the layer)."""
        return (self.weight.data.float() * self._row_scales().view(-1, 1) / 127).to(dtype or self.dtype)

    def effective_weight(self) -> torch.Tensor:
        """Alias of dequantize() (what metrics read)."""
        return self.dequantize()

    def to_dense(self) -> torch.nn.Linear:
        """An nn.Linear with the dequantized weights (activations are no longer quantized)."""
        return _dense(self, self.dequantize())
