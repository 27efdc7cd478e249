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

import functools

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


def nf4_code(device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16 NF4 levels in [-1, 1], ascending, as bitsandbytes defines them."""
    from bitsandbytes.functional import get_4bit_type

    return get_4bit_type("nf4", device=device)


_BINS = 256  # uniform bins over [-1, 1], narrower than the closest two NF4 levels' midpoints


@functools.lru_cache(maxsize=4)
def _nf4_tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(levels, midpoints below each bin's left edge [_BINS + 1] int32, the next midpoint per bin).

    A bin holds at most one midpoint, so a scaled weight's level index is the count below its bin
    plus one if it lies above that next midpoint: bitsandbytes' bucketize by midpoints, exactly
    (no midpoint lies within float rounding of a bin edge, checked here), at a third of the cost."""
    code = nf4_code(device)
    mids = (code[:-1] + code[1:]) / 2
    edges = torch.arange(_BINS + 1, dtype=torch.float64, device=device) * (2 / _BINS) - 1
    gaps = (mids.double().view(-1, 1) - edges.view(1, -1)).abs()
    if float(gaps.min()) < 1e-5 or float(mids.diff().min()) <= 2 / _BINS:
        raise RuntimeError("NF4 rounding table: a midpoint sits on a bin edge or two share a bin")
    below = (mids.double().view(1, -1) < edges.view(-1, 1)).sum(1)
    nxt = torch.cat([mids, torch.tensor([float("inf")], device=device)])[below]
    return code, below.to(torch.int32), nxt


def nf4_round(scaled: torch.Tensor) -> torch.Tensor:
    """Index (int32) of the nearest NF4 level of each value of `scaled` in [-1, 1], ties rounding
    down as bitsandbytes' quantizer does."""
    _, below, nxt = _nf4_tables(scaled.device)
    b = (scaled + 1).mul_(_BINS / 2).to(torch.int32)
    return below[b].add_(scaled > nxt[b])


def nf4_blocks(weight: torch.Tensor, blocksize: int) -> torch.Tensor:
    """[N, K] -> float32 [N, K / blocksize, blocksize]: bitsandbytes' absmax blocks, which run over
    the flattened weight, so they are column groups of a row only when K is a multiple of blocksize.

    Raises:
        ValueError: K is not a multiple of blocksize (the per-block clipping search needs whole blocks).
    """
    n, k = weight.shape
    if k % blocksize:
        raise ValueError(f"NF4 blocks of {blocksize} straddle the rows of a weight with {k} columns; "
                         f"clipping needs whole blocks per row (use a blocksize dividing {k}, or no clipping)")
    return weight.float().reshape(n, k // blocksize, blocksize)


def nf4_dequant_blocks(blocks: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Each weight of `blocks` [..., b] rounded to the nearest level of code * absmax [..., 1] (the
    level bitsandbytes stores: nearest by midpoints, inputs clamped to +-absmax)."""
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38))).clamp_(-1, 1)
    return code[nf4_round(scaled)].mul_(absmax)


def nf4_fake_quantize(weight: torch.Tensor, blocksize: int = 64) -> torch.Tensor:
    """The weight a bitsandbytes NF4 layer (no double quantization) computes with, in weight's dtype:
    blocks of `blocksize` consecutive weights of the flattened tensor, the last one possibly short."""
    flat = weight.float().reshape(-1)
    n = flat.numel()
    blocks = torch.nn.functional.pad(flat, (0, -n % blocksize)).view(-1, blocksize)  # zeros leave absmax as is
    absmax = blocks.abs().amax(-1, keepdim=True)
    deq = nf4_dequant_blocks(blocks, absmax, nf4_code(weight.device))
    return deq.view(-1)[:n].view(weight.shape).to(weight.dtype)


@torch.no_grad()
def nf4_search_clip(weight: torch.Tensor, gram: torch.Tensor, blocksize: int = 64, n_grid: int = 20,
                    max_shrink: float = 0.5) -> torch.Tensor:
    """Per (row, block) shrink r [N, K / blocksize] of the NF4 range: the block is clamped to
    +-r * absmax, so bitsandbytes' own absmax becomes r * absmax (`clip.search_shrink`)."""
    from effopt.methods.quant.clip import search_shrink

    blocks = nf4_blocks(weight, blocksize)
    absmax, code = blocks.abs().amax(-1, keepdim=True), nf4_code(weight.device)
    return search_shrink(blocks, gram, lambda r: nf4_dequant_blocks(blocks, absmax * r, code), n_grid, max_shrink)


@torch.no_grad()
def nf4_apply_clip(weight: torch.Tensor, shrink: torch.Tensor, blocksize: int = 64) -> None:
    """Clamp each (row, block) of `weight` in place to +-shrink * its absmax."""
    blocks = nf4_blocks(weight, blocksize)
    bound = blocks.abs().amax(-1, keepdim=True) * shrink.unsqueeze(-1)
    weight.copy_(torch.minimum(torch.maximum(blocks, -bound), bound).view(weight.shape).to(weight.dtype))


@torch.no_grad()
def nf4_gptq(weight: torch.Tensor, hessian: torch.Tensor, blocksize: int = 64, percdamp: float = 0.01,
             act_order: bool = False, mask: torch.Tensor | None = None,
             lazy: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ (Frantar et al., 2022) on the NF4 grid: columns are rounded one at a time to the nearest
    NF4 level of their block's absmax, and each column's error is spread over the columns not yet
    rounded through the inverse Hessian. The absmax of every block is fixed up front from `weight`
    (static groups), so a clipped weight keeps its clipped ranges and act-order needs no regrouping.

    Args:
        weight: [N, K], K a multiple of blocksize.
        hessian: [K, K] input Hessian (any positive multiple of X^T X).
        percdamp: damping added to H's diagonal, as a fraction of its mean.
        act_order: round columns by decreasing diag(H) (the stored layout is unchanged).
        mask: optional bool [N, K] of weights to keep; the others get the code of 0.0 (a pruning
            mask survives).
        lazy: columns per lazy-update block.

    Returns:
        codes uint8 [N, K] (indices into nf4_code()) and absmax float32 [N, K / blocksize]; the
        layer computes with nf4_code()[codes] * absmax (store them with `nf4_layer_from_codes`).
    """
    from effopt.methods.quant.gptq import damped_inverse_cholesky

    n, k = weight.shape
    absmax = nf4_blocks(weight, blocksize).abs().amax(-1)  # [N, G]
    h = hessian.detach().float().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1
    perm = torch.argsort(torch.diagonal(h), descending=True) if act_order else torch.arange(k, device=h.device)
    w = weight.detach().float()[:, perm].contiguous()
    u, _ = damped_inverse_cholesky(h[perm][:, perm], percdamp)
    del h
    code = nf4_code(w.device)
    mids = (code[:-1] + code[1:]) / 2  # per column, one bucketize beats nf4_round's several small ops
    zero = int(torch.nonzero(code == 0)[0])
    keep = None if mask is None else mask.to(torch.bool)[:, perm].T.contiguous()
    scale = absmax.T.contiguous()  # [G, N]: one contiguous row per block
    inv_scale = 1.0 / scale.clamp(min=1e-38)
    block_of = (perm // blocksize).tolist()
    codes = torch.empty(k, n, dtype=torch.int64, device=w.device)  # [K, N] in rounding order
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # thousands of [N]-sized ops: thread hand-offs cost more than they save
    try:
        for i1 in range(0, k, lazy):
            i2 = min(i1 + lazy, k)
            block = w[:, i1:i2].T.contiguous()  # [B, N], one row per column
            err = torch.empty_like(block)
            ublock = u[i1:i2, i1:i2]
            diag = torch.diagonal(ublock).tolist()
            for i in range(i2 - i1):
                g = block_of[i1 + i]
                q = torch.bucketize((block[i] * inv_scale[g]).clamp_(-1, 1), mids)
                if keep is not None:
                    q = torch.where(keep[i1 + i], q, zero)
                codes[i1 + i] = q
                torch.sub(block[i], code[q].mul_(scale[g]), out=err[i]).div_(diag[i])
                if i + 1 < i2 - i1:
                    block[i + 1:].addr_(ublock[i, i + 1:], err[i], alpha=-1)
            w[:, i2:] -= err.T @ u[i1:i2, i2:]
    finally:
        torch.set_num_threads(threads)
    return codes.T[:, torch.argsort(perm)].to(torch.uint8).contiguous(), absmax


def nf4_layer_from_codes(linear: torch.nn.Module, codes: torch.Tensor, absmax: torch.Tensor,
                         blocksize: int = 64) -> torch.nn.Module:
    """A bitsandbytes NF4 layer (like `quantize_linear(..., "nf4")`) holding exactly these codes
    [N, K] and absmax values [N, K / blocksize], packed as bitsandbytes packs them (two codes per
    byte, the first in the high nibble); bitsandbytes' own quantization would recompute absmax."""
    code = nf4_code(codes.device)
    n, k = codes.shape
    weight = (code[codes.long()].view(n, -1, blocksize) * absmax.unsqueeze(-1)).view(n, k)
    layer = quantize_linear(linear, weight.to(linear.weight.dtype), "nf4", blocksize=blocksize)
    flat = codes.reshape(-1).to(torch.uint8)
    packed = ((flat[::2] << 4) | flat[1::2]).view(layer.weight.data.shape)
    layer.weight.data.copy_(packed)
    layer.weight.quant_state.absmax.copy_(absmax.reshape(-1))
    return layer
