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


@pytest.mark.parametrize("shape, blocksize", [((48, 256), 64), ((64, 100), 64), ((7, 100), 64), ((16, 96), 32)])
def test_nf4_fake_quantize_is_bitsandbytes_exactly(shape, blocksize):
    """The NF4 grid AWQ searches on is the one bitsandbytes stores: same values, bit for bit (blocks
    straddling rows and a short last block included)."""
    import bitsandbytes.functional as F

    w = torch.distributions.StudentT(3.0).sample(shape) * 0.02
    w[0, :3] = 0.0
    codes, state = F.quantize_4bit(w, blocksize=blocksize, quant_type="nf4")
    assert torch.equal(bnb_methods.nf4_fake_quantize(w, blocksize), F.dequantize_4bit(codes, state))
    assert bnb_methods.nf4_code().numel() == 16


def test_nf4_clip_search_reduces_output_error_and_bnb_stores_the_clip():
    torch.manual_seed(7)
    x = torch.randn(400, 256)
    x[:, :4] *= 30
    w = torch.distributions.StudentT(3.0).sample((48, 256))
    from effopt.methods.quant.clip import block_gram

    shrink = bnb_methods.nf4_search_clip(w, block_gram(x, 64), 64)
    assert shrink.shape == (48, 4) and (shrink < 1).any()
    clipped = w.clone()
    bnb_methods.nf4_apply_clip(clipped, shrink, 64)
    layer = bnb_methods.quantize_linear(torch.nn.Linear(256, 48, bias=False), clipped, "nf4", blocksize=64)
    assert torch.equal(layer.dequantize(), bnb_methods.nf4_fake_quantize(clipped, 64))
    err = lambda q: (x @ (q - w).T).pow(2).mean().item()  # noqa: E731
    assert err(layer.dequantize()) < 0.95 * err(bnb_methods.nf4_fake_quantize(w, 64))


def test_nf4_clip_needs_whole_blocks_per_row():
    with pytest.raises(ValueError, match="straddle the rows of a weight with 100 columns"):
        bnb_methods.nf4_search_clip(torch.randn(8, 100), torch.zeros(2, 64, 64), 64)


def test_nf4_round_is_bucketize_by_midpoints():
    """The table lookup rounds like bitsandbytes' bucketize, at midpoints (ties down) and bin edges too."""
    code = bnb_methods.nf4_code()
    mids = (code[:-1] + code[1:]) / 2
    edges = torch.arange(257) / 128 - 1
    near = torch.cat([mids, edges]).view(-1, 1) + torch.tensor([-1e-7, 0.0, 1e-7]).view(1, -1)
    x = torch.cat([torch.rand(100_000) * 2 - 1, near.reshape(-1), code]).clamp(-1, 1)
    assert torch.equal(bnb_methods.nf4_round(x).long(), torch.bucketize(x, mids))


@pytest.mark.parametrize("act_order", [False, True])
def test_nf4_gptq_beats_rounding_and_is_stored_exactly(act_order):
    """GPTQ on the NF4 levels: less output error than bitsandbytes' rounding on correlated inputs,
    stored as bitsandbytes NF4 codes + absmax that dequantize to exactly what GPTQ chose, pruned
    weights kept at zero."""
    torch.manual_seed(0)
    x = torch.randn(2048, 32) @ torch.randn(32, 256) + 0.3 * torch.randn(2048, 256)  # correlated inputs
    w = torch.randn(96, 256) * 0.05
    mask = torch.rand(96, 256) > 0.2
    w = w * mask
    codes, absmax = bnb_methods.nf4_gptq(w, x.T @ x, 64, act_order=act_order, mask=mask)
    assert codes.dtype == torch.uint8 and codes.shape == (96, 256) and absmax.shape == (96, 4)
    layer = bnb_methods.nf4_layer_from_codes(torch.nn.Linear(256, 96, bias=False), codes, absmax, 64)
    deq = layer.dequantize()
    levels = bnb_methods.nf4_code()[codes.long()].view(96, 4, 64) * absmax.unsqueeze(-1)
    assert torch.equal(deq, levels.view(96, 256))
    assert bool((deq[~mask] == 0).all())
    err = lambda q: (x @ (q - w).T).pow(2).mean().item()  # noqa: E731
    assert err(deq) < 0.7 * err(bnb_methods.nf4_fake_quantize(w, 64))
