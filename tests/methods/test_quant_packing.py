"""Packed codes round-trip exactly; QuantLinear stores them; RTN granularities and clipping search."""

from __future__ import annotations

import pytest
import torch

from effopt.methods.quant.packing import pack_codes, packed_row_bytes, unpack_codes
from effopt.methods.quant.rtn import dequantize_weight, quantize_weight, quantize_weight_granular
from effopt.nn.quant_linear import QuantLinear


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("k", [1, 7, 64, 576, 577])
def test_pack_round_trip_is_exact(bits, k):
    gen = torch.Generator().manual_seed(bits * 1000 + k)
    codes = torch.randint(0, 2**bits, (5, k), generator=gen, dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (5, packed_row_bytes(k, bits))
    assert torch.equal(unpack_codes(packed, bits, k), codes)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_quantlinear_stores_codes_in_real_size(bits):
    w = torch.randn(16, 576)
    codes, scales, zeros = quantize_weight(w, bits, 128)
    layer = QuantLinear.from_codes(codes, scales, zeros, bits, 128, None, False, torch.float32)
    assert torch.equal(layer.codes(), codes)
    assert layer.qweight.numel() == 16 * (576 * bits // 8)
    assert scales.shape == (16, 5)  # 4 groups of 128 + a short one of 64
    assert torch.equal(layer.dequantize(), dequantize_weight(codes, scales, zeros, 128))


@pytest.mark.parametrize("granularity, groups", [("group", 5), ("channel", 1), ("tensor", 1)])
@pytest.mark.parametrize("symmetric", [False, True])
def test_rtn_granularity_layouts(granularity, groups, symmetric):
    w = torch.randn(8, 576)
    codes, scales, zeros, g = quantize_weight_granular(w, 4, granularity, 128, symmetric)
    assert scales.shape == (8, groups) and zeros.shape == (8, groups)
    if granularity == "tensor":
        assert torch.all(scales == scales[0, 0]) and torch.all(zeros == zeros[0, 0])
    err = (dequantize_weight(codes, scales, zeros, g) - w).abs().max()
    assert err <= scales.max() * 0.5 + 1e-6  # within half a step (ranges cover every weight)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_finer_granularity_is_more_accurate(bits):
    w = torch.randn(64, 576) * torch.linspace(0.1, 3, 64).view(-1, 1)
    errs = {}
    for gran in ("tensor", "channel", "group"):
        codes, scales, zeros, g = quantize_weight_granular(w, bits, gran, 64)
        errs[gran] = (dequantize_weight(codes, scales, zeros, g) - w).pow(2).mean().item()
    assert errs["group"] < errs["channel"] < errs["tensor"]


@pytest.mark.parametrize("bits, gain", [(2, 0.10), (3, 0.08), (4, 0.03), (8, 0.0)])
def test_clip_search_never_worse_and_helps_heavy_tails(bits, gain):
    torch.manual_seed(0)
    w = torch.distributions.StudentT(2.0).sample((32, 256))
    plain = dequantize_weight(*quantize_weight(w, bits, 128), 128)
    clipped = dequantize_weight(*quantize_weight(w, bits, 128, clip_search=True), 128)
    e_plain, e_clip = (plain - w).pow(2).mean().item(), (clipped - w).pow(2).mean().item()
    assert e_clip <= e_plain * (1 - gain)


def test_zero_stays_exactly_zero():
    w = torch.randn(4, 64)
    w[:, ::3] = 0
    for symmetric in (False, True):
        out = dequantize_weight(*quantize_weight(w, 3, 32, symmetric), 32)
        assert torch.all(out[:, ::3] == 0)
