"""SparseGPT and Wanda against magnitude on one layer with correlated inputs (layer output error)."""

from __future__ import annotations

import pytest
import torch

from effopt.methods.pruning.masks import layer_mask, nm_mask, row_mask
from effopt.methods.pruning.sparsegpt import hessian, inverse_hessian_factor, sparsegpt_prune
from effopt.methods.pruning.wanda import input_sq_norms, wanda_mask, wanda_scores


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run many small ops: one thread avoids stalls on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def correlated_layer(seed=0, tokens=2048, rank=24, cols=128, rows=64):
    """Inputs from a low-rank mixture plus noise, with a few loud features (like LLM activations)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, rank, generator=g) @ torch.randn(rank, cols, generator=g)
    x += 0.1 * torch.randn(tokens, cols, generator=g)
    x[:, :4] *= 8
    return torch.randn(rows, cols, generator=g), x


def output_error(w, w_new, x):
    return float((x @ (w - w_new).T).pow(2).mean())


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("target", [0.5, 0.7, (2, 4), (4, 8)])
def test_sparsegpt_beats_wanda_beats_magnitude(seed, target):
    w, x = correlated_layer(seed)
    sparsity, nm = (None, target) if isinstance(target, tuple) else (target, None)
    magnitude = w * (nm_mask(w.abs(), *nm) if nm else layer_mask(w.abs(), sparsity))
    wanda = w * wanda_mask(w, input_sq_norms(x), sparsity, nm)
    sparse, _ = sparsegpt_prune(w, hessian(x), sparsity, nm, block_size=64)
    e_mag, e_wanda, e_sgpt = (output_error(w, v, x) for v in (magnitude, wanda, sparse))
    assert e_sgpt < 0.5 * e_wanda, (e_sgpt, e_wanda)
    assert e_wanda < e_mag, (e_wanda, e_mag)


def test_sparsegpt_with_nothing_to_prune_keeps_the_weights():
    w, x = correlated_layer()
    new, keep = sparsegpt_prune(w, hessian(x), 0.0)
    assert keep.all() and torch.allclose(new, w, atol=1e-5)


def test_sparsegpt_handles_dead_inputs():
    w, x = correlated_layer()
    x[:, 10] = 0  # an input that never fires
    new, keep = sparsegpt_prune(w, hessian(x), 0.5, block_size=64)
    assert torch.isfinite(new).all() and (new[:, 10] == 0).all()


def test_inverse_hessian_factor_is_cholesky_of_the_damped_inverse():
    _, x = correlated_layer()
    h = hessian(x)
    u = inverse_hessian_factor(h, 0.01)
    damped = h + 0.01 * torch.diagonal(h).mean() * torch.eye(h.shape[0])
    assert torch.allclose(u.T @ u, torch.linalg.inv(damped), rtol=1e-3, atol=1e-5)
    assert torch.equal(u, torch.triu(u))


def test_wanda_compares_within_rows_and_weighs_inputs():
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0], [40.0, 30.0, 20.0, 10.0]])
    norms = torch.tensor([100.0, 1.0, 1.0, 1.0])  # ||x_0|| = 10
    keep = wanda_mask(w, norms, 0.5)
    assert keep.sum(1).tolist() == [2, 2]  # every row loses exactly half, even the large one
    assert keep.tolist() == [[True, False, False, True], [True, True, False, False]]  # x_0 saves w[0, 0]
    assert torch.equal(wanda_scores(w, norms)[:, 0], w[:, 0] * 10)
    assert torch.equal(keep, row_mask(wanda_scores(w, norms), 0.5))
