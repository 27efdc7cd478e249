"""SmoothQuant W8A8: integer arithmetic is exact, outputs stay close to float (SQNR), smoothing
keeps the float function and makes W8A8 more accurate when activations have outlier channels."""

from __future__ import annotations

import pytest
import torch

from effopt.methods.quant.awq import fold_scales
from effopt.methods.quant.smoothquant import smoothing_scales, smoothquant_model
from effopt.nn.act_quant_linear import ActQuantLinear, int8_matmul, quantize_per_token
from tests.conftest import tiny_llama


def sqnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB."""
    return (10 * torch.log10(ref.pow(2).mean() / (out - ref).pow(2).mean())).item()


def test_int8_matmul_is_exact():
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (33, 1536), generator=gen, dtype=torch.int8)
    b = torch.randint(-127, 128, (1536, 70), generator=gen, dtype=torch.int8)
    assert torch.equal(int8_matmul(a, b).long(), a.long() @ b.long())


def test_forward_is_integer_arithmetic():
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 40)
    layer = ActQuantLinear.from_weight(linear.weight, linear.bias)
    x = torch.randn(3, 5, 96)
    xq, xs = quantize_per_token(x.reshape(-1, 96))
    wq = layer.int_weight().long()
    assert wq.abs().max() <= 127 and xq.abs().max() <= 127
    expected = (xq.long() @ wq.T).double() * xs.double() * layer.scales.double().view(1, -1) + linear.bias.double()
    assert torch.allclose(layer(x).reshape(-1, 40).double(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape", [(64, 96), (576, 1536), (1536, 576)])
def test_w8a8_close_to_float(shape):
    torch.manual_seed(1)
    linear = torch.nn.Linear(shape[1], shape[0])
    x = torch.randn(4, 7, shape[1])
    assert sqnr(linear(x), ActQuantLinear.from_weight(linear.weight, linear.bias)(x)) > 35


def test_checkpoint_spec_round_trip():
    linear = torch.nn.Linear(32, 16, bias=False)
    layer = ActQuantLinear.from_weight(linear.weight, None)
    again = ActQuantLinear.from_spec(layer.spec())
    again.load_state_dict(layer.state_dict())
    x = torch.randn(5, 32)
    assert torch.equal(again(x), layer(x)) and isinstance(again.to_dense(), torch.nn.Linear)


@pytest.mark.parametrize("alpha", [0.5, 0.8])
def test_smoothing_helps_outlier_activations(alpha):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(2)
    norm, linear = LlamaRMSNorm(256), torch.nn.Linear(256, 128, bias=False)
    with torch.no_grad():
        norm.weight[:5] = 40  # outlier channels
    x = torch.randn(64, 256)
    ref = linear(norm(x)).detach()
    plain = ActQuantLinear.from_weight(linear.weight, None)(norm(x))
    s = smoothing_scales(norm(x).abs().amax(0).detach(), [linear.weight], alpha)
    fold_scales(norm, [linear], s)
    assert torch.allclose(linear(norm(x)), ref, rtol=1e-4, atol=1e-4)  # float function unchanged
    smooth = ActQuantLinear.from_weight(linear.weight, None)(norm(x))
    assert sqnr(ref, smooth) > sqnr(ref, plain) + 3


def test_smoothquant_model_sqnr():
    torch.manual_seed(0)
    model = tiny_llama(layers=2)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[:2] = 30
    ids = torch.randint(3, 259, (4, 32))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    stats = smoothquant_model(model, ids, ["*_proj"], [], alpha=0.5, batch_size=2)
    assert stats["quantized_layers"] == 14 and stats["smoothed_groups"] == 4
    assert {type(m).__name__ for n, m in model.named_modules() if n.endswith("_proj")} == {"ActQuantLinear"}
    with torch.no_grad():
        out = model(input_ids=ids).logits
    assert sqnr(ref, out) > 25
