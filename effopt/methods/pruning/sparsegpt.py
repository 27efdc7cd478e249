"""SparseGPT (Frantar & Alistarh, 2023): one-shot pruning by column-wise OBS updates.

With H = X^T X the Hessian of the layer-wise reconstruction error ||W X - W' X||^2, the columns are
visited left to right. Pruning weight w_rc costs w_rc^2 / [H^-1]_cc (the OBS saliency, with the
inverse Hessian of the columns not yet fixed), and its error is compensated by updating the not
yet visited weights of the same row along row c of the Cholesky factor of H^-1. Updates are applied
lazily in blocks of `block_size` columns. The mask is adaptive: for unstructured sparsity it is
chosen per block of `block_size` columns (over all rows of the block) from the saliencies of the
already-updated weights; for N:M it is chosen per group of M columns of each row when the loop
reaches the group. H is dampened by `damp` times its mean diagonal.

`sparsegpt_sequential` runs it over a model layer by layer; each linear's Hessian is taken from
inputs that already went through the pruned and updated linears before it.
"""

from __future__ import annotations

import contextlib

import torch

from effopt.methods.pruning.masks import prune_lowest


@contextlib.contextmanager
def single_thread():
    """Run a stretch of many tiny ops on one CPU thread: the column loop's vector-sized steps gain
    nothing from threads, and on a busy CPU each parallel region can stall on a descheduled thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def hessian(x: torch.Tensor) -> torch.Tensor:
    """H = X^T X / n over the rows of x ([tokens, in_features]), in float32."""
    x = x.reshape(-1, x.shape[-1]).float()
    return (x.T @ x) / max(x.shape[0], 1)


def inverse_hessian_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor U of (H + damp * mean(diag H) * I)^-1 (so H^-1 = U^T U).

    Row c of U, from c on, holds the OBS update direction for column c given that the columns
    before c are already fixed; U_cc^2 = [H_F^-1]_cc for the remaining set F.
    """
    h = h.clone().float()
    diag = torch.diagonal(h)
    dead = diag == 0
    diag[dead] = 1.0
    diag += damp * diag.mean()
    chol = torch.linalg.cholesky(h)
    return torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True)


def _block_mask(w: torch.Tensor, d: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune mask (True = prune) for one block of columns: lowest w^2 / d^2 over the block."""
    return ~prune_lowest(w.pow(2) / d.pow(2).unsqueeze(0), round(sparsity * w.numel()))


def _nm_prune(w: torch.Tensor, d: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Prune mask for M columns: the M - N lowest saliencies of each row."""
    sal = w.pow(2) / d.pow(2).unsqueeze(0)
    idx = torch.topk(sal, m - n, dim=1, largest=False).indices
    return torch.zeros_like(w, dtype=torch.bool).scatter_(1, idx, True)


def sparsegpt_prune(weight: torch.Tensor, h: torch.Tensor, sparsity: float | None = None,
                    nm: tuple[int, int] | None = None, block_size: int = 128, damp: float = 0.01):
    """Prune one linear weight with SparseGPT.

    Args:
        weight: [out, in] weight.
        h: [in, in] Hessian of the layer's inputs (see `hessian`); columns with zero diagonal
            (inputs that are always zero) are pruned for free.
        sparsity: fraction to prune (unstructured), or None with `nm`.
        nm: (N, M): keep N of every M consecutive input weights of each row.
        block_size: columns per lazy update block and per adaptive mask selection.
        damp: dampening, as a fraction of the mean Hessian diagonal.

    Returns:
        (new weight in the input dtype with pruned entries exactly 0, keep-mask bool [out, in]).
    """
    if (sparsity is None) == (nm is None):
        raise ValueError("sparsegpt_prune needs exactly one of sparsity or nm")
    if nm is not None and (weight.shape[1] % nm[1] or block_size % nm[1]):
        raise ValueError(f"N:M needs in_features ({weight.shape[1]}) and block_size ({block_size}) divisible by M")
    with single_thread():
        return _sparsegpt(weight, h, sparsity, nm, block_size, damp)


def _sparsegpt(weight, h, sparsity, nm, block_size, damp):
    w = weight.detach().float().clone()
    w[:, torch.diagonal(h) == 0] = 0
    u = inverse_hessian_factor(h, damp)
    pruned = torch.zeros_like(w, dtype=torch.bool)
    for i1 in range(0, w.shape[1], block_size):
        i2 = min(i1 + block_size, w.shape[1])
        p1, err1 = _prune_block(w, u, i1, i2, sparsity, nm)
        pruned[:, i1:i2] = p1
        w[:, i2:] -= err1.T @ u[i1:i2, i2:]
    return w.to(weight.dtype), ~pruned


def _prune_block(w: torch.Tensor, u: torch.Tensor, i1: int, i2: int, sparsity: float | None,
                 nm: tuple[int, int] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune columns i1:i2 of w in place, column by column with OBS updates inside the block.

    Returns the block's prune mask [out, i2 - i1] and the scaled errors [i2 - i1, out] that the
    caller applies lazily to the columns after the block. Columns are stored transposed (one
    contiguous row per column) so each step is one multiply and one rank-1 update.
    """
    wt, u1 = w[:, i1:i2].T.contiguous(), u[i1:i2, i1:i2]
    d = torch.diagonal(u1)
    err = torch.zeros_like(wt)
    if nm is None:
        p1 = _block_mask(wt.T, d, sparsity)
        scale = p1.T / d.unsqueeze(1)
    else:
        p1, scale = torch.zeros_like(wt.T, dtype=torch.bool), torch.zeros_like(wt)
    for j in range(i2 - i1):
        if nm is not None and j % nm[1] == 0:
            p1[:, j: j + nm[1]] = _nm_prune(wt[j: j + nm[1]].T, d[j: j + nm[1]], *nm)
            scale[j: j + nm[1]] = p1[:, j: j + nm[1]].T / d[j: j + nm[1]].unsqueeze(1)
        torch.mul(wt[j], scale[j], out=err[j])
        wt[j:].addr_(u1[j, j:], err[j], alpha=-1)
    wt.T[p1] = 0
    w[:, i1:i2] = wt.T
    return p1, err


def sparsegpt_sequential(model: torch.nn.Module, input_ids: torch.Tensor, names: list[str],
                         sparsity: float | None = None, nm: tuple[int, int] | None = None,
                         block_size: int = 128, damp: float = 0.01) -> dict[str, torch.Tensor]:
    """Prune the named linears with SparseGPT, layer by layer over the calibration `input_ids`.

    Each linear's Hessian comes from its input after every earlier linear was pruned and updated;
    the reconstructed weights are written in place before it computes. Returns {name: keep-mask}.
    """
    from effopt.methods.pruning.sequential import SharedInputStat, run_layers
    from effopt.nn.masked_linear import effective_weight

    hessians, masks = SharedInputStat(hessian), {}

    def on_input(name: str, module: torch.nn.Module, x: torch.Tensor) -> None:
        w, keep = sparsegpt_prune(effective_weight(module), hessians(x), sparsity, nm, block_size, damp)
        module.weight.copy_(w)
        masks[name] = keep

    run_layers(model, input_ids, names, on_input, hessians.clear, "sparsegpt")
    return masks
