"""Trainable additions that stay in a model after fine-tuning, as checkpointable effopt modules.

- `LoraQuantLinear` / `LoraBnb4bitLinear`: a packed QuantLinear or a bitsandbytes NF4/FP4 layer
  plus a LoRA branch (y = Q(x) + (alpha/r) * B A x). The base stays quantized; this is what
  LoRA / QLoRA over quantized layers leave behind.
- `AdapterLinear`: a bottleneck adapter (down-project, nonlinearity, up-project, residual) attached
  to a linear-like layer, placed sequentially on its output (Houlsby et al. 2019) or in parallel
  with it (He et al. 2022): sequential y = h + s * up(act(down(h))) with h = base(x); parallel
  y = base(x) + s * up(act(down(x))). `up` starts at zero, so a new adapter changes nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from effopt.nn import MODULE_TYPES, register_module
from effopt.nn.bnb_linear import Bnb4bitLinear
from effopt.nn.quant_linear import _DTYPES, QuantLinear

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}


class LoraBranch:
    """Mixin: a trainable low-rank update (alpha / r) * lora_B @ lora_A beside a frozen base layer."""

    def _init_lora(self, in_features: int, out_features: int, r: int, alpha: float) -> None:
        self.r, self.alpha = r, float(alpha)
        self.lora_A = torch.nn.Parameter(torch.zeros(r, in_features, dtype=torch.float32))
        self.lora_B = torch.nn.Parameter(torch.zeros(out_features, r, dtype=torch.float32))

    @property
    def scaling(self) -> float:
        """alpha / r, the factor on B A."""
        return self.alpha / self.r

    def delta_weight(self) -> torch.Tensor:
        """The dense update scaling * B @ A, [out, in]."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def lora_term(self, x: torch.Tensor) -> torch.Tensor:
        """scaling * B A x."""
        return F.linear(F.linear(x, self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype)) * self.scaling

    @classmethod
    def from_base(cls, base: torch.nn.Module, lora_A: torch.Tensor, lora_B: torch.Tensor, alpha: float):
        """Wrap `base`'s quantized tensors (shared, not copied) with the given LoRA factors."""
        spec = base.spec()
        for key in ("r", "alpha"):
            spec.pop(key, None)
        layer = cls.from_spec({**spec, "r": lora_A.shape[0], "alpha": alpha})
        layer._take_base(base)
        with torch.no_grad():
            layer.lora_A.copy_(lora_A)
            layer.lora_B.copy_(lora_B)
        return layer.to(lora_A.device)

    def to_base(self) -> torch.nn.Module:
        """The quantized base layer alone (sharing this layer's tensors): what an export writes beside
        the adapter folder."""
        base_cls = next(c for c in type(self).__mro__[1:] if c is not LoraBranch and c.__name__ in MODULE_TYPES)
        spec = {k: v for k, v in self.spec().items() if k not in ("r", "alpha")}
        base = base_cls.from_spec(spec)
        self._give_base(base)
        return base.to(self.lora_A.device)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", r={self.r}, alpha={self.alpha:g}"


@register_module
class LoraQuantLinear(LoraBranch, QuantLinear):
    """QuantLinear (packed, frozen) + trainable low-rank update lora_B @ lora_A scaled by alpha / r."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, bias: bool = False,
                 symmetric: bool = False, dtype: torch.dtype = torch.float32, method: str = "rtn", r: int = 8,
                 alpha: float = 16.0):
        QuantLinear.__init__(self, in_features, out_features, bits, group_size, bias, symmetric, dtype, method)
        self._init_lora(in_features, out_features, r, alpha)

    def _take_base(self, base: QuantLinear) -> None:
        self.qweight, self.scales, self.zeros = base.qweight, base.scales, base.zeros
        if base.bias is not None:
            self.bias = base.bias

    def _give_base(self, base: QuantLinear) -> None:
        base.qweight, base.scales, base.zeros = self.qweight, self.scales, self.zeros
        if self.bias is not None:
            base.bias = self.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return QuantLinear.forward(self, x) + self.lora_term(x)

    def spec(self) -> dict:
        """Constructor arguments for checkpoints."""
        return {**QuantLinear.spec(self), "r": self.r, "alpha": self.alpha}

    @classmethod
    def from_spec(cls, spec: dict) -> "LoraQuantLinear":
        """An empty layer of the shapes `spec` describes."""
        return cls(**dict(spec, dtype=_DTYPES[spec["dtype"]]))

    def to_dense(self) -> torch.nn.Linear:
        """nn.Linear with the LoRA update merged into the dequantized weight."""
        dense = QuantLinear.to_dense(self)
        with torch.no_grad():
            dense.weight.add_(self.delta_weight().to(dense.weight.dtype))
        return dense


@register_module
class LoraBnb4bitLinear(LoraBranch, Bnb4bitLinear):
    """bitsandbytes NF4/FP4 layer (frozen) + trainable LoRA: QLoRA as Dettmers et al. define it."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, quant_type: str = "nf4",
                 double_quant: bool = False, blocksize: int = 64, dtype: torch.dtype = torch.float32, r: int = 8,
                 alpha: float = 16.0):
        Bnb4bitLinear.__init__(self, in_features, out_features, bias, quant_type, double_quant, blocksize, dtype)
        self._init_lora(in_features, out_features, r, alpha)

    def _take_base(self, base: Bnb4bitLinear) -> None:
        self.weight = base.weight
        if base.bias is not None:
            self.bias = base.bias

    def _give_base(self, base: Bnb4bitLinear) -> None:
        base.weight = self.weight
        if self.bias is not None:
            base.bias = self.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return Bnb4bitLinear.forward(self, x) + self.lora_term(x)

    def spec(self) -> dict:
        """Constructor arguments for checkpoints."""
        return {**Bnb4bitLinear.spec(self), "r": self.r, "alpha": self.alpha}

    @classmethod
    def from_spec(cls, spec: dict) -> "LoraBnb4bitLinear":
        """An empty layer; its quantized state and LoRA factors come from the state dict."""
        return cls(**dict(spec, dtype=_DTYPES[spec["dtype"]]))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        Bnb4bitLinear._load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                                            unexpected_keys, error_msgs)
        with torch.no_grad():  # Bnb4bitLinear's loader reads only weight and bias
            for name in ("lora_A", "lora_B"):
                if prefix + name in state_dict:
                    getattr(self, name).copy_(state_dict[prefix + name])
                else:
                    missing_keys.append(prefix + name)

    def to_dense(self) -> torch.nn.Linear:
        """nn.Linear with the LoRA update merged into the dequantized weight."""
        dense = Bnb4bitLinear.to_dense(self)
        with torch.no_grad():
            dense.weight.add_(self.delta_weight().to(dense.weight.dtype))
        return dense


LORA_TYPES = (LoraQuantLinear, LoraBnb4bitLinear)


def _linear_spec(module: torch.nn.Module) -> dict:
    """{type, spec} that rebuilds a linear-like base (an effopt type, or a plain nn.Linear)."""
    name = type(module).__name__
    if name in MODULE_TYPES and type(module) is MODULE_TYPES[name]:
        return {"type": name, "spec": module.spec()}
    if type(module) is not torch.nn.Linear:
        raise TypeError(f"adapters attach to nn.Linear or effopt linear layers, not {name}")
    return {"type": "Linear", "spec": {"in_features": module.in_features, "out_features": module.out_features,
                                       "bias": module.bias is not None,
                                       "dtype": str(module.weight.dtype).removeprefix("torch.")}}


def _build_linear(entry: dict) -> torch.nn.Module:
    if entry["type"] == "Linear":
        spec = dict(entry["spec"])
        return torch.nn.Linear(spec["in_features"], spec["out_features"], bias=spec["bias"],
                               dtype=getattr(torch, spec["dtype"]))
    return MODULE_TYPES[entry["type"]].from_spec(entry["spec"])


@register_module
class AdapterLinear(torch.nn.Module):
    """A linear-like `base` with a bottleneck adapter, sequential (on its output) or parallel (beside it)."""

    def __init__(self, base: dict | torch.nn.Module, bottleneck: int, placement: str = "sequential",
                 activation: str = "relu", scale: float = 1.0):
        super().__init__()
        if placement not in ("sequential", "parallel"):
            raise ValueError(f"placement must be sequential or parallel, got {placement!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        self.base = _build_linear(base) if isinstance(base, dict) else base
        self.in_features, self.out_features = self.base.in_features, self.base.out_features
        self.bottleneck, self.placement, self.activation, self.scale = bottleneck, placement, activation, scale
        width = self.out_features if placement == "sequential" else self.in_features
        self.down = torch.nn.Linear(width, bottleneck)
        self.up = torch.nn.Linear(bottleneck, self.out_features)
        torch.nn.init.zeros_(self.up.weight)
        torch.nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base(x)
        src = (h if self.placement == "sequential" else x).to(self.down.weight.dtype)
        return h + (self.scale * self.up(ACTIVATIONS[self.activation](self.down(src)))).to(h.dtype)

    def spec(self) -> dict:
        """Constructor arguments for checkpoints (the base's own spec nested)."""
        return {"base": _linear_spec(self.base), "bottleneck": self.bottleneck, "placement": self.placement,
                "activation": self.activation, "scale": self.scale}

    @classmethod
    def from_spec(cls, spec: dict) -> "AdapterLinear":
        """An adapter of the shapes `spec` describes (base rebuilt from its nested spec)."""
        return cls(**spec)

    def extra_repr(self) -> str:
        return f"bottleneck={self.bottleneck}, placement={self.placement}, activation={self.activation}"
