"""GPTQ (Frantar et al., 2022): quantize a linear layer column by column, each rounding error spread
over the not-yet-quantized columns through the inverse Hessian of the layer's calibration inputs.

For a layer y = W x with calibration inputs X, the objective is ||W X - Q X||^2; its Hessian is
H = 2 X X^T. GPTQ processes columns in order (or by decreasing diag(H) with `act_order`), using the
upper Cholesky factor U of H^-1 (damped: H + percdamp * mean(diag H) * I): quantizing column j gives
error e = (w_j - q_j) / U_jj, and the remaining columns k > j receive w_k -= e * U_jk. Updates are
applied lazily in blocks of `blocksize` columns (the inner loop touches only the block; one matmul
brings the rest of the matrix up to date after each block).

Groups: a group's scale and zero point are computed when its first column is reached, from the
current (already error-updated) weights of all its columns; the final group may be short (K % g).
With `act_order` the groups stay the natural, contiguous column ranges in the original order, so
codes are stored in original column order and QuantLinear's standard layout dequantizes them.
"""

from __future__ import annotations

import contextlib

import torch

from effopt.methods.quant.rtn import quantize_weight


def damped_inverse_cholesky(hessian: torch.Tensor, percdamp: float, max_tries: int = 6) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + damp*I)^-1 and the damping used (x10 per failed try)."""
    diag_mean = torch.diagonal(hessian).mean().item()
    damp = percdamp * (diag_mean if diag_mean > 0 else 1.0)
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    for _ in range(max_tries):
        chol, info = torch.linalg.cholesky_ex(hessian + damp * eye)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(chol)
            upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info) == 0:
                return upper, damp
        damp *= 10
    raise ValueError(f"GPTQ: Hessian is not positive definite even with damping {damp / 10:.3g}")


def _current_columns(w: torch.Tensor, block: torch.Tensor, err: torch.Tensor, u: torch.Tensor,
                     cols: torch.Tensor, i1: int, i: int) -> torch.Tensor:
    """Up-to-date values of (permuted) columns `cols` >= i1 + i while block [i1, i1+B) is open:
    in-block columns come from the working block, later ones get the block's pending updates."""
    i2 = i1 + block.shape[1]
    inside = cols < i2
    out = torch.empty(w.shape[0], len(cols), dtype=w.dtype, device=w.device)
    if inside.any():
        out[:, inside] = block[:, cols[inside] - i1]
    if (~inside).any():
        later = cols[~inside]
        out[:, ~inside] = w[:, later] - err[:, :i] @ u[i1:i1 + i, later]
    return out


@contextlib.contextmanager
def _single_thread():
    """One intra-op thread: the column loop is thousands of small ops and the matrices are at most
    a few thousand wide, so thread hand-offs cost more than they save (much more on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _quantize_block(w, u, i1, i2, scales, zeros, ready, group_of, invperm, g, bits, symmetric, clip_search, keep):
    """GPTQ's inner loop over columns [i1, i2): returns the block's codes and scaled errors, both
    transposed to [B, N] (one contiguous row per column). Fills group scales/zeros as reached."""
    k = w.shape[1]
    maxq = 2**bits - 1
    block = w[:, i1:i2].T.contiguous()  # [B, N]
    err = torch.zeros_like(block)
    codes = torch.empty_like(block)
    ublock = u[i1:i2, i1:i2]
    diag = torch.diagonal(ublock).tolist()
    for i in range(i2 - i1):
        gi = group_of[i1 + i]
        if not ready[gi]:
            cols = invperm[gi * g: min((gi + 1) * g, k)]
            vals = _current_columns(w, block.T, err.T, u, cols, i1, i)
            _, s, z = quantize_weight(vals, bits, 0, symmetric, clip_search)
            scales[:, gi], zeros[:, gi] = s[:, 0], z[:, 0]
            ready[gi] = True
        col, s, z = block[i], scales[:, gi], zeros[:, gi]
        c = torch.clamp_(torch.round(col / s).add_(z), 0, maxq)
        if keep is not None:
            c = torch.where(keep[:, i1 + i], c, z)
        codes[i] = c
        e = err[i]
        torch.sub(col, (c - z).mul_(s), out=e).div_(diag[i])
        if i + 1 < i2 - i1:
            block[i + 1:].addr_(ublock[i, i + 1:], e, alpha=-1)
    return codes, err


@torch.no_grad()
@_single_thread()
def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int = 128,
                  symmetric: bool = False, percdamp: float = 0.01, blocksize: int = 128, act_order: bool = False,
                  clip_search: bool = False, mask: torch.Tensor | None = None, static_groups: bool = False):
    """Quantize `weight` [N, K] with GPTQ given its input Hessian [K, K].

    Args:
        bits: 2..8. group_size: columns per group, <= 0 for per-channel.
        symmetric: zero point fixed at 2^(bits-1).
        percdamp: damping as a fraction of the mean diagonal of H.
        blocksize: columns per lazy-update block.
        act_order: process columns by decreasing diag(H) (groups stay in original column order).
        clip_search: choose each group's range by an MSE clipping search instead of min/max.
        mask: optional bool [N, K] of weights to keep; masked weights are quantized to exactly 0
            (the zero point), so a pruning mask survives quantization.
        static_groups: compute every group's scale and zero point from the original weights before
            any update (AutoGPTQ's `static_groups`), instead of when the group is reached.

    Returns:
        codes uint8 [N, K] (original column order), scales [N, G], zeros [N, G] (float32), and a
        dict with `loss` (sum of (w - q)^2 / U_jj^2 / 2, GPTQ's own error estimate) and `damp`.
    """
    n, k = weight.shape
    g = k if group_size <= 0 else group_size
    groups = -(-k // g)
    w = weight.detach().float().clone()
    h = hessian.detach().float().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    perm = torch.argsort(torch.diagonal(h), descending=True) if act_order else torch.arange(k, device=w.device)
    invperm = torch.argsort(perm)
    w, h = w[:, perm], h[perm][:, perm]
    keep = None if mask is None else mask.to(torch.bool)[:, perm]
    u, damp = damped_inverse_cholesky(h, percdamp)
    del h
    group_of = (perm // g).tolist()
    scales = torch.zeros(n, groups, device=w.device)
    zeros = torch.zeros(n, groups, device=w.device)
    ready = [False] * groups
    if static_groups:
        _, s0, z0 = quantize_weight(weight.detach().float(), bits, g, symmetric, clip_search)
        scales.copy_(s0), zeros.copy_(z0)
        ready = [True] * groups
    codes = torch.zeros(n, k, dtype=torch.uint8, device=w.device)
    loss = 0.0
    for i1 in range(0, k, blocksize):
        i2 = min(i1 + blocksize, k)
        block_codes, err = _quantize_block(w, u, i1, i2, scales, zeros, ready, group_of, invperm, g, bits,
                                           symmetric, clip_search, keep)
        codes[:, i1:i2] = block_codes.T.to(torch.uint8)
        loss += float((err * err).sum()) / 2
        w[:, i2:] -= err.T @ u[i1:i2, i2:]
    return codes[:, invperm], scales, zeros, {"loss": loss, "damp": damp}


def quantized_layer(module: torch.nn.Linear, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    bits: int, group_size: int, symmetric: bool, method: str):
    """A QuantLinear holding `codes` with the bias, dtype and device of `module`."""
    from effopt.nn.quant_linear import QuantLinear

    dtype = module.weight.dtype
    layer = QuantLinear.from_codes(codes, scales, zeros, bits, group_size, module.bias, symmetric, dtype, method)
    return layer.to(module.weight.device)


@torch.no_grad()
def gptq_model(model: torch.nn.Module, input_ids: torch.Tensor, targets: list[str], ignore: list[str], *,
               bits: int, group_size: int, symmetric: bool, percdamp: float = 0.01, blocksize: int = 128,
               act_order: bool = False, static_groups: bool = False, clip_search: bool = False, batch_size: int = 8,
               autocast: torch.dtype | None = None, device=None) -> dict:
    """Quantize every targeted linear inside the decoder layers with GPTQ, one layer at a time: each
    layer's Hessians come from the outputs of the already-quantized layers before it.

    Returns:
        {"quantized_layers", "gptq_loss" (sum of GPTQ's error estimates), "max_damp", "calibration_tokens"}.
    """
    from effopt.methods.calibration import accumulate_hessians, calibrate_layers

    stats = {"quantized_layers": 0, "gptq_loss": 0.0, "max_damp": 0.0}

    def on_layer(step) -> None:
        linears = step.linears(targets, ignore)
        if not linears:
            return
        hessians = accumulate_hessians(step, list(linears))
        quantized = {}
        for name, module in linears.items():
            mask = getattr(module, "weight_mask", None)
            weight = module.weight * mask if mask is not None else module.weight
            codes, scales, zeros, info = gptq_quantize(weight, hessians.pop(name), bits, group_size, symmetric,
                                                       percdamp, blocksize, act_order, clip_search, mask,
                                                       static_groups)
            quantized[name] = quantized_layer(module, codes, scales, zeros, bits, group_size, symmetric, "gptq")
            module.weight.copy_(quantized[name].dequantize(module.weight.dtype))
            stats["quantized_layers"] += 1
            stats["gptq_loss"] += info["loss"]
            stats["max_damp"] = max(stats["max_damp"], info["damp"])
        # The outputs that feed the next layer come from the quantized weights, dequantized once here:
        # a QuantLinear would dequantize on every calibration chunk (calibration chunks are too long
        # for the CPU int path). Then the packed layers go in.
        step.next_inputs = step.advance()
        for name, layer in quantized.items():
            step.replace(name, layer)

    stats["calibration_tokens"] = calibrate_layers(model, input_ids, on_layer, batch_size=batch_size, device=device,
                                                   autocast=autocast, description=f"gptq w{bits} g{group_size}")
    return stats
