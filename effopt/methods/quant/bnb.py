"""bitsandbytes backends: NF4 / FP4 (4-bit blockwise, optional double quantization) and LLM.int8().

NF4 (Dettmers et al., QLoRA 2023) uses the 16 quantiles of a normal distribution as its code book,
FP4 a 4-bit float; both scale blocks of `blocksize` weights by their absmax, and double
quantization quantizes those absmax values again (8-bit, blocks of 256). LLM.int8() (Dettmers et
al., 2022) stores int8 rows and, at run time, multiplies int8-quantized activations, except input
columns holding an outlier above `threshold`, which are multiplied in 16-bit.

Nothing is substituted: `check_backend` runs the backend once on the target device and raises a
clear error if this bitsandbytes build cannot run it there.
"""

from __future__ import annotations

import torch

QUANT_TYPES = ("nf4", "fp4", "int8")


def check_backend(quant_type: str, device: torch.device, dtype: torch.dtype = torch.float32) -> None:
    """Quantize and run a small layer with `quant_type` on `device`; raise RuntimeError if it cannot."""
    import bitsandbytes

    layer = torch.nn.Linear(64, 64, dtype=dtype, device=device).eval()
    try:
        qlayer = quantize_linear(layer, layer.weight, quant_type).eval()
        with torch.no_grad():
            out = qlayer(torch.randn(4, 64, dtype=dtype, device=device))
        ok = bool(torch.isfinite(out).all())
    except Exception as exc:  # report what bitsandbytes said, with what was asked
        raise RuntimeError(f"bitsandbytes {bitsandbytes.__version__} cannot run {quant_type} on {device}: "
                           f"{type(exc).__name__}: {exc}") from exc
    if not ok:
        raise RuntimeError(f"bitsandbytes {bitsandbytes.__version__} produced non-finite outputs for "
                           f"{quant_type} on {device}")


def quantize_linear(linear: torch.nn.Module, weight: torch.Tensor, quant_type: str, double_quant: bool = False,
                    blocksize: int = 64, threshold: float = 6.0) -> torch.nn.Module:
    """A bitsandbytes layer computing like `linear` with `weight` quantized (training flag kept)."""
    from effopt.nn.bnb_linear import Bnb4bitLinear, Bnb8bitLinear

    if quant_type == "int8":
        layer = Bnb8bitLinear.from_linear(linear, weight, threshold)
    elif quant_type in ("nf4", "fp4"):
        layer = Bnb4bitLinear.from_linear(linear, weight, quant_type, double_quant, blocksize)
    else:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    return layer.train(linear.training)


@torch.no_grad()
def bnb_quantize_model(model: torch.nn.Module, layers: list[tuple[str, torch.nn.Module]], quant_type: str,
                       double_quant: bool = False, blocksize: int = 64, threshold: float = 6.0) -> int:
    """Replace each (name, linear) of `layers` in `model` by its bitsandbytes layer; returns the count.
    Masked (pruned) layers are quantized with their mask applied."""
    from effopt.nn import set_submodule

    device = next(model.parameters()).device
    check_backend(quant_type, device, layers[0][1].weight.dtype if layers else torch.float32)
    for name, linear in layers:
        mask = getattr(linear, "weight_mask", None)
        weight = linear.weight * mask if mask is not None else linear.weight
        set_submodule(model, name, quantize_linear(linear, weight, quant_type, double_quant, blocksize, threshold))
    return len(layers)
