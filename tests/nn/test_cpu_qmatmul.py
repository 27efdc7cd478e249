"""QuantLinear's CPU fast path (torch's int4/int8 CPU matmul ops) matches dequantize() + F.linear.

The ops compute in bfloat16, so the tolerance is stated relative to the output's size: |y - ref| <=
1e-2 * max|ref| (measured: 2e-3 .. 6e-3 for float32 inputs, which is bf16 rounding of x and y; the
quantization error itself is 10x larger). A layout or convention mistake (wrong nibble order, zero-point
sign, group mapping) gives O(1) errors, far above it.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from effopt.methods.quant.rtn import quantize_weight
from effopt.nn import cpu_qmatmul
from effopt.nn.quant_linear import QuantLinear

REL_TOL = 1e-2


def make_layer(bits, group_size, symmetric, n=48, k=576, bias=True, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * 0.02
    w[:, :k // 3] += 0.01  # rows not centred on 0: asymmetric zero points really differ from 2**(bits-1)
    codes, scales, zeros = quantize_weight(w, bits, group_size, symmetric)
    b = torch.randn(n, generator=gen) * 0.1 if bias else None
    return QuantLinear.from_codes(codes, scales, zeros, bits, group_size, b, symmetric, dtype)


def reference(layer, x):
    bias = None if layer.bias is None else layer.bias.to(x.dtype)
    return F.linear(x.float(), layer.dequantize(torch.float32), None if bias is None else bias.float())


def assert_close(y, ref, tol=REL_TOL):
    err = (y.float() - ref).abs().max().item()
    assert err <= tol * ref.abs().max().item(), (err, ref.abs().max().item())


def kind(layer):
    cached = layer._cpu_weight
    return None if cached is None or cached[2] is None else cached[2].kind


@pytest.mark.parametrize("bits, group_size, expected", [
    (4, 32, "int4"), (4, 64, "int4"), (4, 128, "int4"), (4, 256, "int4"), (4, -1, "int4"), (4, 192, "int4"),
    (2, 64, "int4"), (3, 128, "int4"),
    (8, -1, "int8"), (8, 32, "int8x2"), (8, 128, "int8x2"),
])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("rows", [1, 7])
@pytest.mark.parametrize("bias", [True, False])
def test_fast_path_matches_dequantize(bits, group_size, expected, symmetric, rows, bias):
    # K = 576 with groups of 128/256 ends in a short group: K is padded to the op's multiple
    layer = make_layer(bits, group_size, symmetric, bias=bias)
    x = torch.randn(2, rows, 576)
    with torch.no_grad():
        y = layer(x)
    assert kind(layer) == expected  # the fast path was taken (the cache holds the op's weight)
    assert y.shape == (2, rows, 48) and y.dtype == torch.float32
    assert_close(y, reference(layer, x))


@pytest.mark.parametrize("bits, group_size", [(4, 64), (8, -1), (8, 64)])
@pytest.mark.parametrize("n, k", [(40, 200), (17, 72), (259, 64)])
def test_padding_odd_shapes(bits, group_size, n, k):
    # N not a multiple of 16, K not a multiple of the op group (or of 16 for int8): padded, still exact
    layer = make_layer(bits, group_size, False, n=n, k=k)
    x = torch.randn(3, k)
    with torch.no_grad():
        y = layer(x)
    assert kind(layer) is not None
    assert_close(y, reference(layer, x))


@pytest.mark.parametrize("bits, group_size", [(4, 16), (4, 48), (8, 16), (3, 96 + 8)])
def test_unsupported_group_sizes_fall_back_exactly(bits, group_size):
    # no op group size (32..256) divides these: no op kind, nothing prepared, the layer dequantizes (exact)
    layer = make_layer(bits, group_size, False)
    x = torch.randn(1, 576)
    with torch.no_grad():
        y = layer(x)
    assert cpu_qmatmul.kind(576, bits, group_size) is None
    assert layer._cpu_weight is None
    assert cpu_qmatmul.prepare(layer.codes(), layer.scales, layer.zeros, bits, group_size) is None
    torch.testing.assert_close(y, reference(layer, x))


def test_bfloat16_layer():
    layer = make_layer(4, 64, False, dtype=torch.bfloat16)
    x = torch.randn(1, 576, dtype=torch.bfloat16)
    with torch.no_grad():
        y = layer(x)
    assert kind(layer) == "int4" and y.dtype == torch.bfloat16
    assert_close(y, F.linear(x, layer.dequantize(), layer.bias).float(), tol=2e-2)


def test_many_rows_and_disabled_use_dequantize():
    layer = make_layer(4, 64, False)
    many = torch.randn(max(cpu_qmatmul.MAX_ROWS.values()) + 1, 576)
    with torch.no_grad():
        torch.testing.assert_close(layer(many), reference(layer, many))
        assert layer._cpu_weight is None  # never even prepared
        old = cpu_qmatmul.ENABLED
        cpu_qmatmul.ENABLED = False
        try:
            x = torch.randn(1, 576)
            torch.testing.assert_close(layer(x), reference(layer, x))
            assert layer._cpu_weight is None
        finally:
            cpu_qmatmul.ENABLED = old


def test_rows_past_the_kinds_cap_never_prepare():
    """A grouped 8-bit weight (int8x2: two int4 ops, cap 96 rows) called with more rows than its cap
    but fewer than another kind's dequantizes without re-packing; one row then prepares it."""
    layer = make_layer(8, 64, False)
    assert cpu_qmatmul.kind(576, 8, 64) == "int8x2"
    rows = cpu_qmatmul.MAX_ROWS["int8x2"] + 1
    assert rows <= max(cpu_qmatmul.MAX_ROWS.values())
    with torch.no_grad():
        x = torch.randn(rows, 576)
        torch.testing.assert_close(layer(x), reference(layer, x))
        assert layer._cpu_weight is None
        layer(torch.randn(1, 576))
        assert layer._cpu_weight is not None and layer._cpu_weight[2].kind == "int8x2"


def test_cache_follows_buffer_changes():
    layer = make_layer(4, 64, False)
    other = make_layer(4, 64, False, seed=1)
    x = torch.randn(1, 576)
    with torch.no_grad():
        layer(x)
        first = layer._cpu_weight[2]
        layer(x)
        assert layer._cpu_weight[2] is first  # reused while nothing changes
        layer.scales.mul_(2)  # in-place write: version bump
        assert_close(layer(x), reference(layer, x))
        assert layer._cpu_weight[2] is not first
        layer.load_state_dict(other.state_dict())  # copy_ into every buffer
        assert_close(layer(x), reference(other, x))
        layer.qweight = other.qweight.clone()  # replaced tensor (same version number as before)
        layer.zeros = other.zeros.clone() + 1
        assert_close(layer(x), reference(layer, x))
    assert not any("cpu" in key for key in layer.state_dict())  # the re-packed copy is never saved
    layer.to(torch.bfloat16)  # replaces the buffers: the copy is dropped, then rebuilt for the new ones
    assert layer._cpu_weight is None
    xb = x.bfloat16()
    with torch.no_grad():
        assert_close(layer(xb), F.linear(xb, layer.dequantize(), layer.bias).float(), tol=2e-2)
    assert kind(layer) == "int4"


def test_input_gradient_uses_dequantize():
    # QLoRA: the frozen layer must still pass gradients to its input; the ops have no backward
    layer = make_layer(4, 64, False)
    x = torch.randn(2, 576, requires_grad=True)
    y = layer(x)
    assert layer._cpu_weight is None  # no fast path under autograd
    y.square().sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    reference(layer, x_ref).square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    # an input that needs no gradient may take the fast path even with grad enabled
    z = layer(torch.randn(2, 576))
    assert kind(layer) == "int4" and not z.requires_grad


def test_bias_gradient_through_fast_path():
    layer = make_layer(4, 64, False)
    layer.bias.requires_grad_(True)
    layer(torch.randn(3, 576)).sum().backward()
    assert kind(layer) == "int4"
    torch.testing.assert_close(layer.bias.grad, torch.full((48,), 3.0))


def test_op_group_choice():
    assert cpu_qmatmul.op_group(576, 128) == 64  # divides 128 and 576: no K padding
    assert cpu_qmatmul.op_group(512, 128) == 128
    assert cpu_qmatmul.op_group(576, -1) == 64
    assert cpu_qmatmul.op_group(4096, -1) == 256
    assert cpu_qmatmul.op_group(576, 48) is None
