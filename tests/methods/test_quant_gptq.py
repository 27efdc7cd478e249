"""GPTQ: beats RTN on reconstruction, act-order stores a correctly ordered dequantizable layout, the
short final group is handled, masks survive, and the layer-by-layer driver quantizes a model."""

from __future__ import annotations

import copy

import pytest
import torch

from effopt.methods.quant.gptq import gptq_model, gptq_quantize, quantized_layer
from effopt.methods.quant.rtn import dequantize_weight, quantize_weight
from effopt.nn.quant_linear import QuantLinear
from tests.conftest import tiny_llama


def correlated_inputs(k: int, tokens: int = 2048, seed: int = 0) -> torch.Tensor:
    """Inputs with correlated channels of very different scales (like LLM activations)."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=gen) / k**0.5 + torch.eye(k)
    scale = torch.rand(k, generator=gen) * 3 + 0.1
    return (torch.randn(tokens, k, generator=gen) @ mix) * scale


def output_error(w: torch.Tensor, w_hat: torch.Tensor, x: torch.Tensor) -> float:
    """Relative ||W X - W_hat X||."""
    ref = x @ w.T
    return ((x @ w_hat.T - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("bits, group_size, symmetric, act_order, max_ratio", [
    (4, 128, False, False, 0.85), (4, 128, False, True, 0.75), (3, 128, False, False, 0.9),
    (3, 128, True, True, 0.75), (4, -1, False, False, 0.85), (4, -1, True, True, 0.75), (8, 64, False, True, 0.9),
])
def test_gptq_reconstruction_beats_rtn(bits, group_size, symmetric, act_order, max_ratio):
    x = correlated_inputs(576)
    w = torch.randn(64, 576, generator=torch.Generator().manual_seed(1))
    h = 2 * x.T @ x / x.shape[0]
    rtn = dequantize_weight(*quantize_weight(w, bits, group_size, symmetric), group_size)
    codes, scales, zeros, _ = gptq_quantize(w, h, bits, group_size, symmetric, act_order=act_order)
    gptq = dequantize_weight(codes, scales, zeros, group_size)
    assert output_error(w, gptq, x) < max_ratio * output_error(w, rtn, x)


@pytest.mark.parametrize("act_order, static_groups", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("group_size", [32, 48, -1])
def test_loss_estimate_matches_dequantized_layer(act_order, static_groups, group_size):
    """GPTQ's running loss equals 1/2 tr(E H_damped E^T) with E from the *stored* codes: a
    wrongly permuted code or group scale would break the equality."""
    x = correlated_inputs(96, 512, seed=3)
    w = torch.randn(24, 96, generator=torch.Generator().manual_seed(4))
    h = 2 * x.T @ x / x.shape[0]
    codes, scales, zeros, info = gptq_quantize(w, h, 3, group_size, act_order=act_order, static_groups=static_groups)
    layer = QuantLinear.from_codes(codes, scales, zeros, 3, group_size, None, False, torch.float32)
    e = (w - layer.dequantize()).double()
    damped = h.double() + info["damp"] * torch.eye(96, dtype=torch.float64)
    objective = 0.5 * torch.einsum("ni,ij,nj->", e, damped, e).item()
    assert objective == pytest.approx(info["loss"], rel=1e-4)


@pytest.mark.parametrize("act_order, static_groups", [(False, False), (True, False), (True, True)])
def test_diagonal_hessian_reduces_to_rtn(act_order, static_groups):
    """Without input correlations there is nothing to compensate: GPTQ (any column order) must give
    exactly RTN's codes, scales and zeros, in the original column order."""
    w = torch.randn(16, 200)
    h = torch.diag(torch.rand(200) + 0.5)  # distinct diagonal: act-order really permutes
    codes, scales, zeros, _ = gptq_quantize(w, h, 4, 64, act_order=act_order, static_groups=static_groups)
    r_codes, r_scales, r_zeros = quantize_weight(w, 4, 64)
    assert torch.equal(codes, r_codes)
    assert torch.allclose(scales, r_scales) and torch.equal(zeros, r_zeros)


def test_short_final_group():
    """K = 576 with group 128: five groups, the last of 64 columns with its own scale (inputs of the
    last 64 columns are independent of the others, so no error flows into them)."""
    x1, x2 = correlated_inputs(512, 1024), correlated_inputs(64, 1024, seed=1)
    h = torch.block_diag(x1.T @ x1, x2.T @ x2) * 2 / 1024
    w = torch.randn(32, 576, generator=torch.Generator().manual_seed(5))
    w[:, 512:] *= 0.01  # the short group's range differs from the rest
    codes, scales, zeros, _ = gptq_quantize(w, h, 4, 128)
    assert scales.shape == (32, 5)
    assert scales[:, 4].mean() < 0.05 * scales[:, :4].mean()
    deq = dequantize_weight(codes, scales, zeros, 128)
    # GPTQ moves weights inside a group to absorb earlier columns' error, so allow a few steps of
    # the short group's own (small) scale, not half a step.
    assert (deq[:, 512:] - w[:, 512:]).abs().max() < 5 * scales[:, 4].max()


def test_masked_weights_quantize_to_zero():
    x = correlated_inputs(64, 256)
    w = torch.randn(8, 64)
    mask = torch.rand(8, 64) > 0.5
    codes, scales, zeros, _ = gptq_quantize(w * mask, 2 * x.T @ x / 256, 4, 32, mask=mask, act_order=True)
    deq = dequantize_weight(codes, scales, zeros, 32)
    assert torch.all(deq[~mask] == 0)


def test_dead_inputs_and_singular_hessian():
    x = correlated_inputs(32, 16)  # fewer tokens than channels: singular H
    x[:, 5] = 0  # a dead input channel
    codes, scales, zeros, info = gptq_quantize(torch.randn(4, 32), 2 * x.T @ x / 16, 4, 16)
    deq = dequantize_weight(codes, scales, zeros, 16)
    assert torch.isfinite(deq).all() and torch.all(deq[:, 5] == 0)


def _hidden(model, ids):
    with torch.no_grad():
        return model.model(input_ids=ids).last_hidden_state


def test_gptq_model_quantizes_every_target_and_beats_rtn():
    torch.manual_seed(0)
    model = tiny_llama(layers=2, hidden=64, intermediate=128)
    ids = torch.randint(3, 259, (8, 48))
    ref = _hidden(model, ids)
    rtn = copy.deepcopy(model)
    for name, module in list(rtn.named_modules()):
        if name.endswith("_proj"):
            c, s, z = quantize_weight(module.weight, 3, 32)
            parent, _, child = name.rpartition(".")
            setattr(rtn.get_submodule(parent), child, quantized_layer(module, c, s, z, 3, 32, False, "rtn"))
    stats = gptq_model(model, ids, ["*_proj"], [], bits=3, group_size=32, symmetric=False, batch_size=3)
    assert stats["quantized_layers"] == 14 and stats["calibration_tokens"] == 8 * 48
    kinds = {type(m).__name__ for n, m in model.named_modules() if n.endswith("_proj")}
    assert kinds == {"QuantLinear"} and model.model.layers[0].mlp.down_proj.method == "gptq"
    err_gptq = (_hidden(model, ids) - ref).pow(2).mean()
    err_rtn = (_hidden(rtn, ids) - ref).pow(2).mean()
    assert err_gptq < 0.8 * err_rtn
