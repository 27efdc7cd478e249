"""Truncated SVD of a weight, plain or whitened by calibration activations (SVD-LLM).

A linear layer computes y = x W^T with W [out, in]. Every factorization here returns (A, B) with
A [r, in] and B [out, r] so that W ~ B @ A; the singular values are split evenly (B = U sqrt(S),
A = sqrt(S) V^T) so neither factor has a much larger range than the other.

Plain SVD (Eckart-Young) minimizes ||W - W'||_F: it treats every input direction alike.

SVD-LLM (Wang, Zheng, Wan and Zhang, "SVD-LLM: Truncation-aware Singular Value Decomposition for
Large Language Model Compression", arXiv:2403.07378) minimizes the output error ||(W - W') X||_F
over calibration inputs X [in, n] instead, by truncation-aware data whitening. With S the Cholesky
factor of X X^T (S S^T = X X^T), the whitened inputs S^-1 X are orthonormal, so
||(W - W') X||_F = ||(W - W') S||_F. Taking the SVD W S = U Sigma V^T and truncating it gives
W' = U_r Sigma_r V_r^T S^-1, and dropping singular value sigma_i costs exactly sigma_i^2 of squared
output error ("truncation-aware"): the spectrum that rank selection reads is the loss itself. Implemented here: that whitening and truncation (the
paper's first component). Its second component, a LoRA-style fine-tuning of the factors after
truncation ("parameter update with sequential low-rank approximation"), is not part of this
stage; a later finetune stage can train the LowRankLinear factors.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


@contextlib.contextmanager
def one_cpu_thread(tensor: torch.Tensor) -> Iterator[None]:
    """Run LAPACK on one thread for a CPU tensor. A layer-sized SVD gains little from a second
    thread, and when other jobs share the cores the threads' synchronization made it ~8x slower
    here (1.5 s vs 11.6 s wall for a 1536 x 576 float64 SVD on the 2-core machine under load)."""
    if tensor.is_cuda:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD (U, S, Vh) computed in float64 (the whitened matrices can be ill-conditioned)."""
    with one_cpu_thread(matrix):
        return torch.linalg.svd(matrix.detach().to(torch.float64), full_matrices=False)


def singular_values(matrix: torch.Tensor) -> torch.Tensor:
    """Singular values of `matrix` in float64, descending."""
    with one_cpu_thread(matrix):
        return torch.linalg.svdvals(matrix.detach().to(torch.float64))


def split_factors(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) from the top `rank` singular triplets: B = U_r sqrt(S_r), A = sqrt(S_r) Vh_r."""
    if not 1 <= rank <= s.numel():
        raise ValueError(f"rank must be in [1, {s.numel()}], got {rank}")
    root = s[:rank].sqrt()
    return root[:, None] * vh[:rank], u[:, :rank] * root[None, :]


def svd_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-`rank` approximation of `weight` in Frobenius norm, as (A [r, in], B [out, r]) in float64."""
    return split_factors(*svd(weight), rank)


def whitening_factor(cov: torch.Tensor, damping: float = 1e-6) -> torch.Tensor:
    """Lower Cholesky factor S of X X^T (S S^T = X X^T), float64.

    X X^T is often singular (dead channels, fewer tokens than channels). As SVD-LLM does when the
    Cholesky factorization fails, the diagonal is shifted: by `damping` x its mean first, then by
    ten times more at each retry.

    Args:
        cov: X X^T [in, in], the sum of x x^T over calibration tokens.
        damping: first relative diagonal shift (0 tries the undamped matrix first).
    """
    cov = cov.detach().to(torch.float64)
    cov = (cov + cov.T) / 2
    mean_diag = cov.diagonal().mean().clamp_min(1e-30)
    eye = torch.eye(cov.shape[0], dtype=torch.float64, device=cov.device)
    shift = damping
    for _ in range(12):
        with one_cpu_thread(cov):
            factor, info = torch.linalg.cholesky_ex(cov + shift * mean_diag * eye)
        if int(info) == 0:
            return factor
        shift = max(shift * 10, 1e-10)
    raise ValueError("X X^T is not positive definite even after damping; calibration inputs may be all zero")


def whitened_svd(weight: torch.Tensor, factor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD (U, Sigma, Vh) of W S for a whitening factor S (see `whitening_factor`).

    Sigma_i^2 is the squared output error over the calibration tokens that dropping component i costs.
    """
    return svd(weight.detach().to(torch.float64) @ factor)


def whitened_factors(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, factor: torch.Tensor,
                     rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with B @ A = U_r Sigma_r Vh_r S^-1: the truncated whitened SVD mapped back to W's input space."""
    a, b = split_factors(u, s, vh, rank)
    # A S^-1 = solve(S^T, A^T)^T, without forming the inverse.
    with one_cpu_thread(a):
        a = torch.linalg.solve_triangular(factor.T, a.T, upper=True).T
    return a, b


def svd_llm_factors(weight: torch.Tensor, cov: torch.Tensor, rank: int, damping: float = 1e-6):
    """SVD-LLM's truncation-aware whitened rank-`rank` factors (A [r, in], B [out, r]) of `weight`."""
    factor = whitening_factor(cov, damping)
    return whitened_factors(*whitened_svd(weight, factor), factor, rank)


def output_error(weight: torch.Tensor, approx: torch.Tensor, inputs: torch.Tensor) -> float:
    """Relative output error ||x (W - W')^T||_F / ||x W^T||_F over rows of `inputs` [n, in]."""
    x = inputs.to(torch.float64)
    ref = x @ weight.to(torch.float64).T
    return float((ref - x @ approx.to(torch.float64).T).norm() / ref.norm())
