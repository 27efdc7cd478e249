"""Low-rank methods on tensors and tiny in-code models: SVD, SVD-LLM whitening, NMF, rank rules."""

from __future__ import annotations

import pytest
import torch

from effopt.methods.lowrank import rank as rk
from effopt.methods.lowrank.compress import RankRule, compress_nmf, compress_svd, compress_svd_llm
from effopt.methods.lowrank.nmf import NegativeWeightError, nmf_factors
from effopt.methods.lowrank.svd import output_error, svd_factors, svd_llm_factors
from effopt.nn.lowrank_linear import LowRankLinear


def _correlated_inputs(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    """Inputs with a strongly non-isotropic covariance and a few outlier channels (as in LLMs)."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(dim, dim, generator=gen) * torch.logspace(0, -2, dim)[None, :]
    x = torch.randn(n, dim, generator=gen) @ mix.T
    x[:, :3] *= 20
    return x


@pytest.mark.parametrize("shape", [(16, 16), (24, 10), (10, 24)])
def test_svd_is_exact_at_full_rank(shape):
    w = torch.randn(*shape, dtype=torch.float64)
    a, b = svd_factors(w, min(shape))
    torch.testing.assert_close(b @ a, w, rtol=0, atol=1e-10)


def test_truncated_svd_error_is_the_dropped_singular_values():
    w = torch.randn(20, 12, dtype=torch.float64)
    s = torch.linalg.svdvals(w)
    a, b = svd_factors(w, 5)
    assert abs(float((w - b @ a).norm() ** 2) - float((s[5:] ** 2).sum())) < 1e-9


@pytest.mark.parametrize("shape", [(16, 16), (24, 10)])
def test_whitened_svd_is_exact_at_full_rank(shape):
    w = torch.randn(*shape, dtype=torch.float64)
    x = _correlated_inputs(200, shape[1]).double()
    a, b = svd_llm_factors(w, x.T @ x, min(shape), damping=0.0)
    torch.testing.assert_close(b @ a, w, rtol=0, atol=1e-8)


@pytest.mark.parametrize("rank", [4, 8, 16])
def test_whitened_svd_has_lower_output_error_on_correlated_inputs(rank):
    dim = 48
    w = torch.randn(32, dim, dtype=torch.float64)
    x_cal, x_test = _correlated_inputs(2000, dim, seed=1), _correlated_inputs(500, dim, seed=2)
    a, b = svd_factors(w, rank)
    plain = output_error(w, b @ a, x_test)
    a, b = svd_llm_factors(w, (x_cal.T @ x_cal).double(), rank)
    whitened = output_error(w, b @ a, x_test)
    assert whitened < 0.7 * plain, (whitened, plain)


def test_whitened_truncation_loss_equals_dropped_singular_values():
    """SVD-LLM's truncation-aware property: squared output error = sum of dropped sigma^2."""
    from effopt.methods.lowrank.svd import whitened_svd, whitening_factor

    w = torch.randn(12, 20, dtype=torch.float64)
    x = _correlated_inputs(300, 20).double()
    factor = whitening_factor(x.T @ x, damping=0.0)
    _, s, _ = whitened_svd(w, factor)
    a, b = svd_llm_factors(w, x.T @ x, 6, damping=0.0)
    loss = float(((w - b @ a) @ x.T).norm() ** 2)
    assert abs(loss - float((s[6:] ** 2).sum())) / loss < 1e-8


def test_whitening_survives_a_singular_covariance():
    x = torch.randn(5, 16, dtype=torch.float64)  # 5 tokens, 16 channels: X X^T has rank 5
    a, b = svd_llm_factors(torch.randn(8, 16, dtype=torch.float64), x.T @ x, 4)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()


@pytest.mark.parametrize("out_f,in_f,ratio,expected", [
    (576, 576, 0.8, 230), (1536, 576, 0.8, 335), (100, 100, 1.0, 50), (10, 10, 0.01, 1)])
def test_rank_for_ratio(out_f, in_f, ratio, expected):
    rank = rk.rank_for_ratio(out_f, in_f, ratio)
    assert rank == expected
    assert rk.lowrank_parameters(out_f, in_f, rank) <= max(ratio * out_f * in_f, out_f + in_f)


@pytest.mark.parametrize("energy,expected", [(0.5, 1), (0.8, 1), (0.85, 2), (0.9, 2), (0.95, 3), (0.999, 4), (1.0, 4)])
def test_rank_for_energy(energy, expected):
    s = (torch.tensor([0.8, 0.1, 0.09, 0.01]) * 100).sqrt()  # energy shares .8 .1 .09 .01
    assert rk.rank_for_energy(s, energy) == expected


@pytest.mark.parametrize("keep", [0.2, 0.3, 0.45])  # below 0.5, no 64x64 layer can go dense
def test_budget_fits_and_favours_the_layer_with_concentrated_energy(keep):
    steep = torch.logspace(0, -4, 64)  # energy in a few components
    flat = torch.ones(64)  # energy spread evenly
    spectra = {"steep": rk.LayerSpectrum(64, 64, steep), "flat": rk.LayerSpectrum(64, 64, flat)}
    ranks = rk.allocate_budget(spectra, keep)
    cost = sum(min(64 * 64, rk.lowrank_parameters(64, 64, r)) for r in ranks.values())
    assert cost <= keep * 2 * 64 * 64
    assert cost > keep * 2 * 64 * 64 - 2 * 128  # the budget is spent, up to one component per layer

    def kept(name: str, rank: int) -> float:
        power = spectra[name].singular_values ** 2
        return float(power[:rank].sum() / power.sum())

    uniform = cost // (2 * 128)  # the same number of parameters spread evenly
    assert kept("steep", ranks["steep"]) > kept("flat", ranks["flat"])
    assert kept("steep", ranks["steep"]) + kept("flat", ranks["flat"]) > kept("steep", uniform) + kept("flat", uniform)


def test_rank_rule_needs_exactly_one_criterion():
    with pytest.raises(ValueError, match="exactly one"):
        RankRule()
    with pytest.raises(ValueError, match="exactly one"):
        RankRule(ratio=0.5, energy=0.9)


@pytest.mark.parametrize("rank", [2, 5])
def test_nmf_factors_are_nonnegative_and_fit_a_nonnegative_low_rank_matrix(rank):
    gen = torch.Generator().manual_seed(0)
    w = torch.rand(30, rank, generator=gen) @ torch.rand(rank, 20, generator=gen)
    a, b = nmf_factors(w, rank, iterations=500)
    assert (a >= 0).all() and (b >= 0).all()
    assert float((w - b @ a).norm() / w.norm()) < 0.02


def test_nmf_names_the_layer_with_negative_weights():
    layer = torch.nn.Sequential(torch.nn.Linear(8, 8))
    with torch.no_grad():
        layer[0].weight.abs_()
        layer[0].weight[3, 2] = -0.5
    with pytest.raises(NegativeWeightError, match=r"layer '0' has 1 negative weights"):
        compress_nmf(layer, ["0"], RankRule(ratio=0.5))
    assert isinstance(layer[0], torch.nn.Linear)  # nothing was changed


def _mlp(seed: int = 0) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.ReLU(), torch.nn.Linear(48, 32))


@pytest.mark.parametrize("rule,expected", [
    (RankRule(ratio=0.5), {"0": 9, "2": 9}),
    (RankRule(ratio=1.0), {"0": 19, "2": 19}),  # 19 * (32 + 48) = 1520 < 1536: still saves
    (RankRule(energy=1.0), {}),  # full rank 32 stores 2560 > 1536: left dense
])
def test_compress_svd_replaces_only_layers_that_save_parameters(rule, expected):
    model = _mlp()
    ranks = compress_svd(model, ["0", "2"], rule)
    assert ranks == expected
    for name in ("0", "2"):
        assert isinstance(model.get_submodule(name), LowRankLinear) == (name in expected)


def test_compress_svd_under_a_budget_keeps_at_most_the_budget():
    model = _mlp()
    dense = 2 * 32 * 48
    ranks = compress_svd(model, ["0", "2"], RankRule(param_budget=0.4))
    stored = sum(r * (32 + 48) for r in ranks.values()) + dense // 2 * (2 - len(ranks))
    assert 0 < stored <= 0.4 * dense


def test_compress_nmf_on_a_nonnegative_layer():
    model = _mlp()
    with torch.no_grad():
        model[0].weight.abs_()
    ranks = compress_nmf(model, ["0"], RankRule(ratio=0.6), iterations=50)
    assert ranks == {"0": 11} and model[0].method == "nmf"


def test_compress_svd_llm_beats_svd_on_a_tiny_llama(model, tokenizer):
    """Sequential whitened SVD keeps the logits closer to the original than plain SVD (same ranks)."""
    import copy

    from effopt.stages.lowrank import select_layers

    ids = torch.randint(3, 259, (6, 32), generator=torch.Generator().manual_seed(0))
    names = select_layers(model, ["*.q_proj", "*.o_proj", "*.up_proj", "*.down_proj"], [])
    with torch.no_grad():
        ref = model(ids).logits
    errors = {}
    for method in ("svd", "svd_llm"):
        m = copy.deepcopy(model)
        if method == "svd":
            ranks = compress_svd(m, names, RankRule(ratio=0.5))
        else:
            ranks = compress_svd_llm(m, names, ids, RankRule(ratio=0.5), batch_size=4)
        assert len(ranks) == len(names)
        with torch.no_grad():
            errors[method] = float((m(ids).logits - ref).norm() / ref.norm())
    assert errors["svd_llm"] < errors["svd"], errors


def test_layerwise_moments_match_a_full_forward(model):
    """Walking the decoder layer by layer sees exactly the inputs a whole-model forward sees."""
    from effopt.methods.lowrank.capture import sequential_moments

    ids = torch.randint(3, 259, (5, 24), generator=torch.Generator().manual_seed(1))
    names = ["model.layers.1.self_attn.o_proj", "model.layers.1.mlp.down_proj", "model.layers.0.self_attn.k_proj"]
    expected = {}

    def hook(name):
        def fn(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            expected[name] = expected.get(name, 0) + x.T @ x
        return fn

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    got = {}
    tokens = sequential_moments(model, ids, names, lambda _, m: got.update(m) or False, batch_size=2)
    assert tokens == ids.numel() and set(got) == set(names)
    for name in names:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bias,dtype", [(True, torch.float32), (False, torch.bfloat16)])
def test_lowrank_linear_spec_round_trip_and_dense_form(bias, dtype):
    a, b = torch.randn(3, 10, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64)
    layer = LowRankLinear.from_factors(a, b, torch.randn(7) if bias else None, dtype, "svd_llm")
    clone = LowRankLinear.from_spec(layer.spec())
    clone.load_state_dict(layer.state_dict())
    x = torch.randn(4, 10, dtype=dtype)
    torch.testing.assert_close(clone(x), layer(x), rtol=0, atol=0)
    assert clone.spec() == layer.spec() and clone.spec()["method"] == "svd_llm"
    assert sum(p.numel() for p in layer.parameters()) == 3 * (10 + 7) + (7 if bias else 0)
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(layer.to_dense()(x).float(), layer(x).float(), rtol=tol, atol=tol)


def test_model_with_lowrank_layers_survives_a_checkpoint(model, tokenizer, tmp_path):
    from effopt.models import load_checkpoint, save_checkpoint

    names = ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj"]
    assert compress_svd(model, names, RankRule(ratio=0.5)) == {names[0]: 21, names[1]: 16}
    save_checkpoint(model, tokenizer, tmp_path / "ckpt", {})
    loaded, _ = load_checkpoint(tmp_path / "ckpt")
    assert all(isinstance(loaded.get_submodule(n), LowRankLinear) for n in names)
    ids = torch.randint(3, 259, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
