"""QAT: fake-quant forward with a straight-through backward, exported to packed integers that
compute exactly what training computed."""

from __future__ import annotations

import pytest
import torch

from effopt.methods.quant.rtn import fake_quantize
from effopt.nn.fake_quant import FakeQuantLinear, convert_fake_quant, insert_fake_quant
from effopt.nn.masked_linear import MaskedLinear
from effopt.nn.quant_linear import QuantLinear
from tests.conftest import tiny_llama


def linear(seed: int = 0, n: int = 24, k: int = 80) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(k, n)


@pytest.mark.parametrize("bits,group,symmetric", [(4, 32, False), (3, 32, True), (2, -1, False), (8, 64, True)])
@pytest.mark.usefixtures("exact_quant_path")  # exact: the dequantized path, not the bf16 CPU ops
def test_export_equals_the_fake_quant_forward(bits, group, symmetric):
    fq = FakeQuantLinear.from_linear(linear(), bits, group, symmetric)
    x = torch.randn(5, 80)
    q = fq.to_quant()
    assert type(q) is QuantLinear and q.bits == bits
    torch.testing.assert_close(q(x), fq(x), atol=0, rtol=0)
    torch.testing.assert_close(q.dequantize(), fake_quantize(fq.weight.detach(), bits, group, symmetric), atol=0,
                               rtol=0)


def test_straight_through_gradient_is_the_dense_gradient_at_the_quantized_weight():
    fq = FakeQuantLinear.from_linear(linear(), 3, 32, False)
    x = torch.randn(5, 80)
    fq(x).pow(2).sum().backward()
    wq = fake_quantize(fq.weight.detach(), 3, 32, False).requires_grad_(True)
    torch.nn.functional.linear(x, wq, fq.bias.detach()).pow(2).sum().backward()
    torch.testing.assert_close(fq.weight.grad, wq.grad, atol=1e-6, rtol=1e-6)
    assert torch.count_nonzero(fq.weight.grad) == fq.weight.numel()  # round() alone would give zero


def test_masked_layer_keeps_its_zeros_through_qat_and_export():
    mask = torch.rand(24, 80, generator=torch.Generator().manual_seed(0)) > 0.5
    masked = MaskedLinear.from_linear(linear(), mask)
    fq = FakeQuantLinear.from_linear(masked, 4, 32, False)
    opt = torch.optim.SGD(fq.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        fq(torch.randn(4, 80)).pow(2).sum().backward()
        opt.step()
    assert torch.count_nonzero(fq.to_quant().dequantize()[~mask]) == 0


@pytest.mark.usefixtures("exact_quant_path")
def test_qat_model_trains_and_converts_with_checkpoint_roundtrip(tmp_path):
    from effopt.models import load_checkpoint, save_checkpoint
    from effopt.training.loop import train
    from effopt.training.options import TrainOptions
    from effopt.training.tasks import CausalLMTask

    model = tiny_llama()
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    insert_fake_quant(model, names, 4, 32, False)
    save_checkpoint(model, None, tmp_path / "mid", {})  # a checkpoint taken mid-QAT rebuilds the layers
    assert type(load_checkpoint(tmp_path / "mid")[0].model.layers[0].mlp.up_proj) is FakeQuantLinear
    ids = torch.randint(3, 259, (8, 16), generator=torch.Generator().manual_seed(0))
    train(CausalLMTask(model), {"input_ids": ids}, TrainOptions(steps=2, batch_size=4, seq_len=16, lr=1e-3))
    with torch.no_grad():
        want = model(input_ids=ids[:2]).logits
    assert convert_fake_quant(model) == len(names)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids[:2]).logits, want, atol=1e-5, rtol=1e-5)
    assert all(type(model.get_submodule(n)) is QuantLinear for n in names)
