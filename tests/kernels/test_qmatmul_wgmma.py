"""The Gluon W4 wgmma kernels (kernels/qmatmul_wgmma.py) against the float32 reference, on a Hopper GPU.

The Triton interpreter does not run Gluon, so on CPU these tests skip; CI compiles the kernel for sm_90
instead (tests/kernels/test_compile_sm90.py). Tails on every side: N not a multiple of the row tile,
M not a multiple of the token tile, split-K with uneven splits, groups of 64 / 128 and per-channel."""
import pytest
import torch

from kernel_testing import DEVICE, ON_GPU, poison_scratch, rel_err  # noqa: F401 (autouse fixture)
from kernels import qmatmul as Q
from kernels import qmatmul_wgmma as W
from kernels.qmatmul import Cfg, prepare_weight, quant_matmul
from test_qmatmul import TOL, check_appended_kind, make_problem, make_weight

HOPPER = ON_GPU and W.available(torch.device("cuda"))
needs_hopper = pytest.mark.skipif(not HOPPER, reason="Gluon wgmma kernel: Hopper GPU only")

CASES = [  # (block_m tokens, block_n rows, split_k, warps, stages, M, N, K, group, dtype, bias)
    (16, 64, 1, 4, 4, 16, 256, 512, 128, torch.float16, False),
    (16, 64, 4, 4, 4, 5, 200, 1024, 128, torch.float16, True),  # M and N tails, split-K
    (64, 64, 3, 4, 4, 64, 192, 1280, 64, torch.bfloat16, True),  # 20 K-steps over 3 splits
    (128, 128, 2, 8, 4, 130, 2048 + 24, 4096, 128, torch.float16, True),  # two token tiles
    (128, 128, 1, 8, 4, 128, 512, 2048, -1, torch.bfloat16, False),  # per-channel
    (64, 256, 2, 8, 6, 40, 520, 2048, 128, torch.float16, True),
    (128, 64, 1, 4, 5, 100, 320, 768, 128, torch.bfloat16, False),
    (32, 128, 1, 8, 8, 32, 256, 4096, 128, torch.float16, True),  # 64 steps through an 8-slot ring
]


@needs_hopper
@pytest.mark.parametrize("specialized", [False, True])  # cp.async ring / producer warp with bulk copies
@pytest.mark.parametrize("bm,bn,sk,warps,stages,m,n,k,group,dtype,bias", CASES)
def test_wgmma_kernel_matches_reference(bm, bn, sk, warps, stages, m, n, k, group, dtype, bias, specialized):
    qweight, scales, zeros, x, b, ref = make_problem(n, k, 4, group, dtype, m, bias)
    w = prepare_weight(qweight, scales, zeros, 4, group, k)
    cfg = Cfg("wg", bm, bn, 32, sk, warps=warps, stages=stages, specialized=specialized)
    out = torch.full((m, n), float("nan"), device=DEVICE, dtype=dtype)
    for _ in range(2):  # the second launch finds the split-K counters re-armed
        y = quant_matmul(x, w, bias=b, cfg=cfg, out=out)
        assert rel_err(y, ref) < TOL[dtype]


@needs_hopper
def test_wgmma_configs_are_opt_in_and_offered_after_the_default(monkeypatch):
    qweight, scales, zeros, _ = make_weight(4096, 4096, 4, 128, torch.float16)
    w = prepare_weight(qweight, scales, zeros, 4, 128, 4096)
    check_appended_kind(monkeypatch, w, "WG_CANDIDATES", Q.wg_configs, "wg",
                        {m: m >= 16 for m in (1, 8, 16, 64, 128, 1024)})


def test_wgmma_configs_need_four_bit_whole_step_groups():
    assert W.fits(4, 128, 4096) and W.fits(4, 4096, 4096)
    assert not W.fits(8, 128, 4096) and not W.fits(4, 32, 4096) and not W.fits(4, 128, 4100)
    qweight, scales, zeros, _ = make_weight(64, 256, 4, 32, torch.float16, "cpu")
    assert Q.wg_configs(64, prepare_weight(qweight, scales, zeros, 4, 32, 256)) == []


def test_wgmma_launch_is_refused_off_hopper():
    if HOPPER:
        pytest.skip("a Hopper GPU runs it")
    qweight, scales, zeros, _ = make_weight(64, 256, 4, 128, torch.float16, DEVICE)
    x = torch.randn(16, 256, device=DEVICE, dtype=torch.float16)
    with pytest.raises(ValueError, match="Hopper"):
        Q._launch(Cfg("wg", 16, 64, 32, 1, stages=4), x, prepare_weight(qweight, scales, zeros, 4, 128, 256), None,
                  torch.empty(16, 64, dtype=torch.float16, device=DEVICE))


@needs_hopper
def test_wgmma_kernel_wants_padded_group_major_scales():
    qweight, scales, zeros, _ = make_weight(200, 256, 4, 128, torch.float16)
    x = torch.randn(16, 256, device=DEVICE, dtype=torch.float16)
    with pytest.raises(ValueError, match="prepare_weight"):  # [N, G] row-major scales, unpadded
        quant_matmul(x, qweight, scales, zeros, 4, 128, 256, cfg=Cfg("wg", 16, 64, 32, 1, stages=4))


def test_prepared_scales_are_group_major_over_zero_padding():
    """The kernel copies a tile's scales of one group unmasked: rows contiguous, stored on to 256 rows."""
    qweight, scales, zeros, _ = make_weight(200, 512, 4, 128, torch.float16, "cpu")
    w = prepare_weight(qweight, scales, zeros, 4, 128, 512)
    for got, want in ((w.scales, scales), (w.zeros, zeros)):
        assert torch.equal(got, want) and got.stride() == (1, Q.GROUP_MAJOR_PAD)
        assert W.scales_fit(got, 256) and not W.scales_fit(got, 512)  # a 512-row tile would read past the end
        pad = got.as_strided((got.shape[1], Q.GROUP_MAJOR_PAD), (Q.GROUP_MAJOR_PAD, 1))[:, 200:]
        assert not pad.any()  # rows past N: zeros, so a tile's extra rows stay finite
    assert not W.scales_fit(scales, 64)  # row-major [N, G]: a group's rows are strided
