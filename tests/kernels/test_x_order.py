"""The x-column gather of the Gluon W4 kernels (`kernels.x_order`) against its torch permute, on odd row counts,
a row-strided view, both orders and both 16-bit dtypes; outputs are poisoned so an unwritten element fails."""
import pytest
import torch

from kernel_testing import DEVICE, ON_GPU
from kernels import qmatmul_mma as MS
from kernels import x_order as XO

SHAPES = [(1, 64), (3, 320), (17, 1024), (33, 192)] + ([(1024, 8192), (257, 14336)] if ON_GPU else [])


@pytest.mark.parametrize("axes", [XO.SIGMA_AXES, XO.WGMMA_AXES])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_permute_blocks_matches_the_torch_permute(shape, axes, dtype, monkeypatch):
    m, k = shape
    base = torch.randn(m, k + 64, device=DEVICE, dtype=dtype)
    x = base[:, 32:32 + k]  # rows strided past K, start not 64-column aligned
    real_empty = torch.empty
    monkeypatch.setattr(XO.torch, "empty", lambda *a, **kw: real_empty(*a, **kw).fill_(float("nan")))
    got = XO.permute_blocks(x, axes)
    assert got.is_contiguous()
    assert torch.equal(got, XO.permute_blocks_torch(x, axes))


def test_permute_blocks_is_a_permutation_of_each_block():
    x = torch.arange(3 * 192, dtype=torch.float32, device=DEVICE).reshape(3, 192).half()
    for axes in (XO.SIGMA_AXES, XO.WGMMA_AXES):
        got = XO.permute_blocks(x, axes).float()
        for b in range(3):
            blk = got[:, 64 * b:64 * b + 64]
            assert torch.equal(blk.sort(1).values, x[:, 64 * b:64 * b + 64].float())
        assert not torch.equal(got, x.float())


def test_the_kernels_orders_are_the_gathers():
    """permute_x / permute_x_wgmma (what the mma.sync and wgmma kernels read) are these gathers; the formulas
    they replaced: a 16-column SIGMA permute and the 64-column wgmma permute."""
    x = torch.randn(5, 256, device=DEVICE, dtype=torch.float16)
    assert torch.equal(MS.permute_x(x), x.reshape(5, 16, 2, 2, 2, 2).permute(0, 1, 2, 5, 4, 3).reshape(5, 256))
    assert torch.equal(MS.permute_x_wgmma(x),
                       x.reshape(5, 4, 4, 2, 2, 2, 2).permute(0, 1, 3, 6, 5, 2, 4).reshape(5, 256))


def test_permute_blocks_refuses_partial_blocks():
    with pytest.raises(ValueError, match="multiple of 64"):
        XO.permute_blocks(torch.zeros(2, 96, dtype=torch.float16), XO.WGMMA_AXES)
