"""bitsandbytes layers: close to float, checkpoint round trip exact, dense form equal, clear errors."""

from __future__ import annotations

import pytest
import torch

from effopt.methods.quant import bnb as bnb_methods
from effopt.nn.bnb_linear import Bnb4bitLinear, Bnb8bitLinear


def _layer(quant_type: str, double_quant: bool = False):
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 64).eval()
    return linear, bnb_methods.quantize_linear(linear, linear.weight, quant_type, double_quant)


@pytest.mark.parametrize("quant_type, double_quant, max_rel", [
    ("nf4", False, 0.12), ("nf4", True, 0.12), ("fp4", False, 0.15), ("fp4", True, 0.15), ("int8", False, 0.02)])
def test_bnb_layer_close_to_float(quant_type, double_quant, max_rel):
    linear, layer = _layer(quant_type, double_quant)
    assert not layer.training
    x = torch.randn(8, 256)
    with torch.no_grad():
        ref, out = linear(x), layer(x)
    rel = ((out - ref).norm() / ref.norm()).item()
    assert 0 < rel < max_rel
    assert type(layer) is (Bnb8bitLinear if quant_type == "int8" else Bnb4bitLinear)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int8"])
def test_spec_round_trip_and_dense(quant_type):
    _, layer = _layer(quant_type, double_quant=quant_type == "nf4")
    x = torch.randn(5, 256)
    with torch.no_grad():
        out = layer(x)
    again = type(layer).from_spec(layer.spec()).eval()
    again.load_state_dict({k: v.clone() for k, v in layer.state_dict().items()})
    with torch.no_grad():
        assert torch.equal(again(x), out)
        assert torch.equal(again.dequantize(), layer.dequantize())
    dense = layer.to_dense()
    assert isinstance(dense, torch.nn.Linear) and torch.equal(dense.weight, layer.dequantize())


def test_int8_outlier_threshold_matters():
    """LLM.int8(): with outlier columns the mixed decomposition (threshold 6) beats pure int8."""
    torch.manual_seed(3)
    linear = torch.nn.Linear(256, 64).eval()
    x = torch.randn(16, 256)
    x[:, 7] *= 50
    errs = {}
    for threshold in (0.0, 6.0):
        layer = bnb_methods.quantize_linear(linear, linear.weight, "int8", threshold=threshold)
        with torch.no_grad():
            errs[threshold] = (layer(x) - linear(x)).pow(2).mean().item()
    assert errs[6.0] < 0.2 * errs[0.0]


def test_backend_failure_is_a_clear_error(monkeypatch):
    def broken(*args, **kwargs):
        raise NotImplementedError("no kernel for this device")

    monkeypatch.setattr(bnb_methods, "quantize_linear", broken)
    with pytest.raises(RuntimeError, match="cannot run nf4 on cpu: NotImplementedError: no kernel"):
        bnb_methods.check_backend("nf4", torch.device("cpu"))


def test_unknown_type_rejected():
    with pytest.raises(ValueError, match="quant_type"):
        bnb_methods.quantize_linear(torch.nn.Linear(4, 4), torch.zeros(4, 4), "int4")
