"""LoftQ initialisation (Li et al. 2023, Algorithm 1) for LoRA over a quantized base.

Alternates T times: Q_t = quantize(W - L_{t-1} R_{t-1}); (L_t, R_t) = rank-r SVD of W - Q_t, so that
Q_T + L_T R_T approximates W better than Q alone and fine-tuning starts from a model close to the
full-precision one. peft's own LoftQ needs CUDA and supports only bitsandbytes NF4/int8; this one
takes any quantizer: effopt's RTN codes (packed QuantLinear) or bitsandbytes NF4, on any device.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

Quantizer = Callable[[torch.Tensor], tuple[Any, torch.Tensor]]


def low_rank(residual: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-r factors (L [out, r], R [r, in]) of `residual`, singular values split evenly."""
    u, s, vh = torch.linalg.svd(residual.float(), full_matrices=False)
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


@torch.no_grad()
def loftq(weight: torch.Tensor, quantize: Quantizer, rank: int,
          iters: int = 1) -> tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run LoftQ on one weight; returns (quantized state, its dequantized weight Q, L, R) with
    W ~ Q + L @ R.

    Args:
        weight: [out, in] full-precision weight.
        quantize: w -> (state, dequantized w), e.g. `rtn_quantizer(...)` or `nf4_quantizer()`.
        rank: LoRA rank r.
        iters: alternating steps T (the paper uses 1 to 5).
    """
    if iters < 1:
        raise ValueError(f"LoftQ needs at least one iteration, got {iters}")
    w = weight.float()
    lr = torch.zeros_like(w)
    for _ in range(iters):
        state, deq = quantize(w - lr)
        left, right = low_rank(w - deq.float(), rank)
        lr = left @ right
    return state, deq, left, right


def rtn_quantizer(bits: int, group_size: int, symmetric: bool) -> Quantizer:
    """effopt's round-to-nearest: state = (codes, scales, zeros) for QuantLinear.from_codes."""
    from effopt.methods.quant.rtn import dequantize_weight, quantize_weight

    def quantize(w: torch.Tensor):
        codes, scales, zeros = quantize_weight(w, bits, group_size, symmetric)
        return (codes, scales, zeros), dequantize_weight(codes, scales, zeros, group_size, torch.float32)

    return quantize


def nf4_quantizer(double_quant: bool = True, blocksize: int = 64) -> Quantizer:
    """bitsandbytes NF4 (QLoRA's data type). The state is the tensor that was quantized: quantizing
    it again (Bnb4bitLinear.from_linear, same options) gives the same codes."""
    import bitsandbytes as bnb

    def quantize(w: torch.Tensor):
        param = bnb.nn.Params4bit(w.detach().clone().cpu(), requires_grad=False, quant_type="nf4",
                                  compress_statistics=double_quant, blocksize=blocksize)._quantize(w.device)
        return w.detach().clone(), bnb.functional.dequantize_4bit(param.data, param.quant_state).float()

    return quantize
