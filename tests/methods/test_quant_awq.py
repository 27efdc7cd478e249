"""AWQ: scale folding keeps the float function, the search and clipping reduce output error below
RTN's, Gemma-style norms are handled, the layer-by-layer driver quantizes a model, and on the NF4
grid it stores bitsandbytes NF4 layers that beat bitsandbytes' own rounding."""

from __future__ import annotations

import copy

import pytest
import torch

from effopt.methods.quant import awq
from effopt.methods.quant.awq import (awq_model, block_loss, fold_scales, linear_loss, norm_offset, scale_groups,
                                      search_scale)
from effopt.methods.quant.clip import apply_clip, block_gram, search_clip
from effopt.methods.quant.grids import IntGrid
from effopt.methods.quant.rtn import dequantize_weight, fake_quantize, quantize_weight
from tests.conftest import tiny_llama


class NormLinear(torch.nn.Module):
    """RMSNorm (Llama or Gemma flavour) followed by two linears sharing its output."""

    def __init__(self, k: int = 256, n: int = 96, gemma: bool = False, seed: int = 0):
        super().__init__()
        from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
        from transformers.models.llama.modeling_llama import LlamaRMSNorm

        torch.manual_seed(seed)
        self.norm = Gemma3RMSNorm(k) if gemma else LlamaRMSNorm(k)
        with torch.no_grad():
            self.norm.weight.copy_(torch.rand(k) * 2 - (1.0 if gemma else 0.0))
        self.a, self.b = torch.nn.Linear(k, n, bias=False), torch.nn.Linear(k, n // 2, bias=False)

    def forward(self, x):
        h = self.norm(x)
        return torch.cat([self.a(h), self.b(h)], dim=-1)


def outlier_inputs(k: int = 256, tokens: int = 512, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, k, generator=gen)
    x[:, :4] *= 30  # a few salient channels, as in LLM activations
    return x


@pytest.mark.parametrize("gemma", [False, True])
def test_norm_offset_and_folding_keep_the_float_function(gemma):
    block = NormLinear(gemma=gemma)
    assert norm_offset(block.norm) == (1.0 if gemma else 0.0)
    x = outlier_inputs()
    before = block(x)
    s = torch.rand(256) * 3 + 0.2
    fold_scales(block.norm, [block.a, block.b], s)
    assert torch.allclose(block(x), before, rtol=1e-4, atol=1e-4)


def test_fold_into_previous_linear():
    up, down = torch.nn.Linear(32, 64, bias=True), torch.nn.Linear(64, 16)
    x = torch.randn(10, 32)
    before = down(torch.relu(up(x)))  # positive scales commute with relu
    fold_scales(up, [down], torch.rand(64) + 0.5)
    assert torch.allclose(down(torch.relu(up(x))), before, atol=1e-5)


@pytest.mark.parametrize("bits, group_size", [(4, 64), (3, 64), (4, -1), (3, 128)])
def test_awq_output_error_below_rtn(bits, group_size):
    block = NormLinear(seed=bits)
    x = outlier_inputs(seed=bits)
    ref = block(x).detach()
    rtn = copy.deepcopy(block)
    for lin in (rtn.a, rtn.b):
        lin.weight.data = fake_quantize(lin.weight.data, bits, group_size)
    h = block.norm(x).detach()
    x_mean = h.abs().mean(0)
    linears = {"a": block.a, "b": block.b}
    s, alpha, losses = search_scale(linears, {"a", "b"}, block_loss(lambda t, i: block(t), [x]), x_mean,
                                    IntGrid(bits, group_size, False))
    assert losses[alpha] <= losses[0.0]  # alpha = 0 is RTN
    fold_scales(block.norm, [block.a, block.b], s)
    for lin in (block.a, block.b):
        lin.weight.data = fake_quantize(lin.weight.data, bits, group_size)
    err_awq = (block(x) - ref).pow(2).mean().item()
    err_rtn = (rtn(x) - ref).pow(2).mean().item()
    assert alpha > 0 and err_awq < 0.9 * err_rtn


@pytest.mark.parametrize("shape, bits, group_size, symmetric", [
    ((48, 256), 4, 64, False), ((40, 200), 3, 64, False), ((40, 200), 4, 128, True), ((16, 96), 4, -1, False),
    ((16, 96), 8, -1, True)])
def test_int_grid_fake_quantize_is_rtn_exactly(shape, bits, group_size, symmetric):
    """The search's fused quantize-dequantize gives rtn.fake_quantize's values bit for bit (short last
    groups, all-positive groups and per-channel included)."""
    w = torch.distributions.StudentT(3.0).sample(shape)
    w[0] = w[0].abs() + 0.1  # a row with no negative weight
    got = IntGrid(bits, group_size, symmetric).fake_quantize(w)
    assert torch.equal(got, fake_quantize(w, bits, group_size, symmetric))


def test_linear_loss_equals_running_the_linear():
    """A lone linear's search loss from X^T X matches the output MSE of running it."""
    torch.manual_seed(1)
    linear = torch.nn.Linear(96, 40)
    chunks = [outlier_inputs(96, 64, seed=s).view(2, 32, 96) for s in (1, 2)]
    by_gram = linear_loss(linear, chunks)
    by_running = block_loss(lambda x, i: linear(x), chunks)
    assert by_gram() == pytest.approx(0.0, abs=1e-9) and by_running() == pytest.approx(0.0, abs=1e-9)
    with torch.no_grad():
        linear.weight.add_(0.01 * torch.randn_like(linear.weight))
    assert by_gram() == pytest.approx(by_running(), rel=1e-4)
    assert by_gram() > 1e-6


@pytest.mark.parametrize("bits, group_size", [(3, 64), (4, 128), (4, -1)])
def test_clip_search_reduces_output_error(bits, group_size):
    x = outlier_inputs(200, 400, seed=7)
    w = torch.distributions.StudentT(3.0).sample((48, 200))
    gram = block_gram(x, group_size)
    assert gram.shape[0] == (1 if group_size < 0 else -(-200 // group_size))
    shrink = search_clip(w, gram, bits, group_size, False)
    clipped = w.clone()
    apply_clip(clipped, shrink, group_size)
    plain = dequantize_weight(*quantize_weight(w, bits, group_size), group_size)
    tuned = dequantize_weight(*quantize_weight(clipped, bits, group_size), group_size)
    err = lambda q: (x @ (q - w).T).pow(2).mean().item()  # noqa: E731
    assert err(tuned) < err(plain)


def test_scale_groups_respect_gqa():
    model = tiny_llama(heads=4, kv_heads=2)
    names = [g.prev for g in scale_groups(model.model.layers[0])]
    assert names == ["input_layernorm", "post_attention_layernorm", "mlp.up_proj"]  # no v->o under GQA
    model = tiny_llama(heads=4, kv_heads=4)
    assert "self_attn.v_proj" in [g.prev for g in scale_groups(model.model.layers[0])]


@pytest.mark.parametrize("quantizer", ["rtn", "gptq"])
def test_awq_model_beats_rtn(quantizer):
    torch.manual_seed(0)
    model = tiny_llama(layers=2, kv_heads=4)
    with torch.no_grad():  # salient channels in the norms' outputs
        for layer in model.model.layers:
            layer.input_layernorm.weight[:3] = 20
            layer.post_attention_layernorm.weight[:3] = 20
    ids = torch.randint(3, 259, (8, 32))
    with torch.no_grad():
        ref = model.model(input_ids=ids).last_hidden_state
    rtn = copy.deepcopy(model)
    for name, module in rtn.named_modules():
        if name.endswith("_proj"):
            module.weight.data = fake_quantize(module.weight.data, 3, 32)
    stats = awq_model(model, ids, ["*_proj"], [], bits=3, group_size=32, symmetric=False, quantizer=quantizer,
                      batch_size=4, search_samples=4)
    assert stats["quantized_layers"] == 14 and 0 < stats["mean_alpha"] < 1
    assert {m.method for n, m in model.named_modules() if n.endswith("_proj")} == {"awq"}
    with torch.no_grad():
        err_awq = (model.model(input_ids=ids).last_hidden_state - ref).pow(2).mean()
        err_rtn = (rtn.model(input_ids=ids).last_hidden_state - ref).pow(2).mean()
    assert err_awq < 0.8 * err_rtn


def _salient_llama(kv_heads: int = 4):
    """A 2-layer tiny Llama whose norms make three channels salient, and calibration ids."""
    model = tiny_llama(layers=2, kv_heads=kv_heads)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[:3] = 20
            layer.post_attention_layernorm.weight[:3] = 20
    return model, torch.randint(3, 259, (8, 32), generator=torch.Generator().manual_seed(0))


def test_awq_nf4_stores_bitsandbytes_nf4_and_beats_plain_nf4():
    from effopt.methods.quant.bnb import bnb_quantize_model
    from effopt.nn.bnb_linear import Bnb4bitLinear

    model, ids = _salient_llama()
    plain = copy.deepcopy(model)
    with torch.no_grad():
        ref = model.model(input_ids=ids).last_hidden_state
    bnb_quantize_model(plain, [(n, m) for n, m in plain.named_modules() if n.endswith("_proj")], "nf4")
    stats = awq_model(model, ids, ["*_proj"], [], grid="nf4", batch_size=4, search_samples=4)
    assert stats["quantized_layers"] == 14 and 0 < stats["mean_alpha"] < 1
    layers = [m for n, m in model.named_modules() if n.endswith("_proj")]
    assert len(layers) == 14 and all(type(m) is Bnb4bitLinear for m in layers)
    assert {(m.weight.quant_type, m.blocksize, bool(m.weight.compress_statistics)) for m in layers} == \
        {("nf4", 64, False)}
    with torch.no_grad():
        err_awq = (model.model(input_ids=ids).last_hidden_state - ref).pow(2).mean()
        err_plain = (plain.model(input_ids=ids).last_hidden_state - ref).pow(2).mean()
    assert err_awq < 0.7 * err_plain


def test_awq_nf4_scale_folding_keeps_the_float_function(monkeypatch):
    """With the final rounding and clipping left out, the NF4 search's scales only move between ops."""
    model, ids = _salient_llama(kv_heads=4)  # v -> o scaled too
    norm_before = model.model.layers[0].input_layernorm.weight.detach().clone()
    with torch.no_grad():
        ref = model(input_ids=ids).logits

    def keep_float(module, w, *args):
        module.weight.data.copy_(w)
        return module

    monkeypatch.setattr(awq, "_final_layer", keep_float)
    stats = awq_model(model, ids, ["*_proj"], [], grid="nf4", clip=False, batch_size=4, search_samples=4)
    assert stats["mean_alpha"] > 0
    assert not torch.allclose(model.model.layers[0].input_layernorm.weight, norm_before)
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, ref, rtol=1e-4, atol=1e-4)
