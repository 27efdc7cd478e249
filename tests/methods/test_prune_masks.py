"""Mask selection: exact N:M counts, requested sparsity met within one weight per selection group."""

from __future__ import annotations

import pytest
import torch

from effopt.methods.pruning.masks import (global_masks, layer_mask, mask_sparsity, masks_from_scores, nm_mask,
                                          parse_nm, prune_lowest, row_mask)
from effopt.methods.pruning.sparsegpt import hessian, sparsegpt_prune
from effopt.methods.pruning.wanda import wanda_mask


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run many small ops: one thread avoids stalls on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _scores(rows=48, cols=96, seed=0):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)).abs()


@pytest.mark.parametrize("pattern,expected", [("2:4", (2, 4)), ("4:8", (4, 8)), ("1:4", (1, 4))])
def test_parse_nm(pattern, expected):
    assert parse_nm(pattern) == expected


@pytest.mark.parametrize("bad", ["4:2", "0:4", "2:2", "a:b", "2-4"])
def test_parse_nm_rejects(bad):
    with pytest.raises(ValueError):
        parse_nm(bad)


def _nm_ok(keep: torch.Tensor, n: int, m: int) -> bool:
    return bool(keep.reshape(keep.shape[0], -1, m).sum(-1).eq(n).all())


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_nm_mask_keeps_exactly_n_of_every_m(n, m):
    scores = _scores()
    keep = nm_mask(scores, n, m)
    assert _nm_ok(keep, n, m)
    # the kept ones are the largest of each group
    groups = scores.view(48, -1, m)
    kept_min = torch.where(keep.view(48, -1, m), groups, torch.inf).amin(-1)
    pruned_max = torch.where(~keep.view(48, -1, m), groups, -torch.inf).amax(-1)
    assert (kept_min >= pruned_max).all()


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)])
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_calibrated_methods_keep_exactly_n_of_every_m(n, m, method):
    w = torch.randn(32, 64)
    x = torch.randn(256, 64)
    if method == "wanda":
        keep = wanda_mask(w, x.pow(2).sum(0), nm=(n, m))
    else:
        new_w, keep = sparsegpt_prune(w, hessian(x), nm=(n, m), block_size=32)
        assert torch.equal(new_w != 0, keep)
    assert _nm_ok(keep, n, m)


def test_nm_needs_divisible_columns():
    with pytest.raises(ValueError, match="multiple of M"):
        nm_mask(torch.rand(4, 10), 2, 4)


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.3, 0.5, 0.7, 0.95])
def test_layer_and_row_masks_meet_the_target(sparsity):
    scores = _scores()
    rows, cols = scores.shape
    assert abs(mask_sparsity([layer_mask(scores, sparsity)]) - sparsity) <= 1 / scores.numel()
    keep = row_mask(scores, sparsity)
    per_row = 1 - keep.float().mean(1)
    assert (per_row - sparsity).abs().max() <= 1 / cols


@pytest.mark.parametrize("sparsity", [0.2, 0.5, 0.8])
def test_sparsegpt_unstructured_meets_the_target(sparsity):
    w, x = torch.randn(40, 200), torch.randn(512, 200)
    _, keep = sparsegpt_prune(w, hessian(x), sparsity, block_size=64)
    assert abs(mask_sparsity([keep]) - sparsity) <= 1 / w.shape[1]


def test_prune_lowest_is_exact_with_ties():
    scores = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 2.0, 0.5]])
    keep = prune_lowest(scores, 3)
    assert int((~keep).sum()) == 3 and bool(keep[1, 2])
    assert not bool(keep[1, 3])


def test_global_masks_use_one_threshold():
    small, large = _scores(seed=1) * 0.01, _scores(seed=2)
    masks = global_masks({"small": small, "large": large}, 0.5)
    assert abs(mask_sparsity(masks) - 0.5) <= 1 / (2 * small.numel())
    assert mask_sparsity([masks["small"]]) > 0.95  # the small layer takes most of the pruning
    per_layer = masks_from_scores({"small": small, "large": large}, 0.5, scope="layer")
    assert abs(mask_sparsity([per_layer["small"]]) - 0.5) <= 1 / small.numel()


def test_global_scope_refuses_nm():
    with pytest.raises(ValueError, match="global"):
        masks_from_scores({"a": _scores()}, nm=(2, 4), scope="global")
