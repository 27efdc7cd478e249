"""quant_matmul / dequantize against a float32 torch reference built from the LAYOUT.md formula."""
import dataclasses
import os

import pytest
import torch

from kernel_testing import DEVICE, ON_GPU, halves, poison_scratch, rel_err, run_ptx  # noqa: F401 (autouse fixture)
from kernels import qmatmul as Q
from kernels import qmatmul_wgmma
from kernels.qmatmul import (XW_MIN_M, Cfg, candidates, dequantize, pack_words, prepare_weight, quant_matmul,
                             unpack_codes, xw_configs)

TOL = {torch.float16: 2e-3, torch.bfloat16: 1.2e-2}  # relative L2 error vs the float32 reference
N, K = (2048 + 24, 4096 + 72) if ON_GPU else (40, 200)  # K % block != 0, short last group


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Reference packer, straight from LAYOUT.md: code k of a row occupies bits [k*b, (k+1)*b) of
    one little-endian bit stream, bit 0 being the lowest bit of byte 0; padding bits are zero."""
    n, k = codes.shape
    stream = ((codes[:, :, None] >> torch.arange(bits, device=codes.device)) & 1).reshape(n, k * bits)
    stream = torch.nn.functional.pad(stream, (0, (-k * bits) % 8)).view(n, -1, 8)
    return (stream << torch.arange(8, device=codes.device)).sum(-1).to(torch.uint8)


def make_weight(n, k, bits, group, dtype, device=DEVICE):
    g = k if group <= 0 else group
    groups = -(-k // g)
    codes = torch.randint(0, 2**bits, (n, k), device=device)
    scales = (torch.rand(n, groups, device=device) * 0.02 + 0.005).to(dtype)
    zeros = torch.randint(0, 2**bits, (n, groups), device=device).to(dtype)
    return pack_codes(codes, bits), scales, zeros, codes


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_unpack_and_dequantize_follow_layout(bits):
    k = 37  # odd: the last byte of a row is partly padding
    codes = torch.randint(0, 2**bits, (5, k))
    qweight = pack_codes(codes, bits)
    assert torch.equal(unpack_codes(qweight, bits, k), codes.int())
    scales, zeros = torch.rand(5, 3) + 0.1, torch.randint(0, 2**bits, (5, 3)).float()
    w = dequantize(qweight, scales, zeros, bits, 16, k)
    g = torch.arange(k) // 16
    assert torch.allclose(w, (codes - zeros[:, g]) * scales[:, g])


def test_layout_is_checked():
    qweight, scales, zeros, _ = make_weight(8, 64, 4, 32, torch.float16, "cpu")
    with pytest.raises(ValueError):
        dequantize(qweight[:, :-1], scales, zeros, 4, 32, 64)
    with pytest.raises(ValueError):
        dequantize(qweight, scales[:, :1], zeros, 4, 32, 64)


# (cfg, bits, group, dtype, M): every kernel, group mode (per K-block, per row, per element),
# split-K on and off, scale/zero before and after the MMA, x split in registers or strided.
CASES = [
    (Cfg("gemv", 1, 16, 32, 1), 4, 64, torch.float16, 1),
    (Cfg("gemv", 4, 16, 16, 2), 4, 32, torch.bfloat16, 3),
    (Cfg("gemv", 4, 16, 32, 3), 8, -1, torch.float16, 3),
    (Cfg("mma", 16, 32, 32, 1, x_split=True), 4, 128, torch.float16, 1),
    (Cfg("mma", 16, 32, 16, 2), 4, 32, torch.bfloat16, 3),
    (Cfg("mma", 16, 32, 32, 3, post_zero=False, x_split=True), 4, 64, torch.bfloat16, 17),
    (Cfg("mma", 32, 32, 32, 2, x_split=True), 4, -1, torch.float16, 17),
    (Cfg("mma", 16, 32, 16, 2, step_blocks=2, x_split=True), 4, 32, torch.float16, 3),  # 2 groups a trip
    (Cfg("mma", 16, 32, 32, 1, step_blocks=3, post_zero=False), 8, 64, torch.bfloat16, 17),
    (Cfg("mma", 16, 32, 32, 2, post_zero=False), 8, -1, torch.bfloat16, 3),
    (Cfg("mma", 16, 32, 32, 1), 8, 32, torch.float16, 17),
    (Cfg("mma", 16, 32, 16, 2), 2, 32, torch.float16, 17),  # 64 codes per K-block > g: per element
    (Cfg("mma", 16, 32, 32, 1), 2, -1, torch.bfloat16, 1),
    (Cfg("mma", 16, 32, 32, 2, x_split=True, zero_in_tile=True), 4, 64, torch.float16, 3),  # q - z in the tile
    (Cfg("mma", 32, 32, 16, 1, step_blocks=2, zero_in_tile=True), 4, 32, torch.bfloat16, 17),
    (Cfg("mma", 16, 32, 32, 2, x_split=True, zero_in_tile=True), 4, -1, torch.bfloat16, 1),  # per row
    (Cfg("mma", 16, 32, 32, 1, zero_in_tile=True), 8, 64, torch.bfloat16, 17),  # fp32 codes (bf16 W8)
    (Cfg("mma", 16, 32, 32, 2, zero_in_tile=True), 8, -1, torch.float16, 3),
    (Cfg("mma", 16, 32, 16, 1, zero_in_tile=True), 2, 64, torch.float16, 17),
    (Cfg("dequant"), 3, 32, torch.float16, 3),
    (Cfg("dequant"), 4, 64, torch.bfloat16, 17),
]


@pytest.mark.parametrize("cfg,bits,group,dtype,m", CASES)
@pytest.mark.parametrize("prepared", [False, True])
def test_quant_matmul_matches_reference(cfg, bits, group, dtype, m, prepared):
    if ON_GPU and cfg.kind == "mma":  # real sizes: wider tiles
        cfg = dataclasses.replace(cfg, block_n=64)
    qweight, scales, zeros, _ = make_weight(N, K, bits, group, dtype)
    x = torch.randn(m, K, device=DEVICE, dtype=dtype)
    bias = torch.randn(N, device=DEVICE, dtype=dtype) if m != 1 else None
    ref = x.float() @ dequantize(qweight, scales, zeros, bits, group, K, dtype=torch.float32).t()
    if bias is not None:
        ref += bias.float()
    out = torch.full((m, N), float("nan"), device=DEVICE, dtype=dtype)
    w = prepare_weight(qweight, scales, zeros, bits, group, K) if prepared else qweight
    args = () if prepared else (scales, zeros, bits, group, K)
    y = quant_matmul(x, w, *args, bias=bias, cfg=cfg, out=out)
    assert y.data_ptr() == out.data_ptr()
    assert rel_err(y, ref) < TOL[dtype]


# xw, the tensor-core kernel in the plain orientation (out = x @ W^T, the weight tile as the B
# operand), forced for M from 17 to 130: N = 40 is never a multiple of BLOCK_N (64 > N: one partial
# tile), K = 200 never a multiple of the K-step (32-128 codes); groups of 32 / 64 / 128 and
# per-channel; scale / zero after the MMA (post) and folded into the tile (pre), K-blocks spanning
# several groups (per-element scales: 4-bit g32 with 64 codes, 2-bit g32 with 64 codes), split-K,
# symmetric (zeros = 2^(b-1)) and asymmetric, bias always.
XW_CASES = [  # (cfg, bits, group, dtype, M, sym)
    (Cfg("xw", 32, 32, 16, 1, post_zero=False), 4, 128, torch.float16, 33, False),
    (Cfg("xw", 32, 32, 16, 2, post_zero=True), 4, 32, torch.bfloat16, 32, True),
    (Cfg("xw", 64, 32, 32, 1, post_zero=False), 4, 64, torch.bfloat16, 64, False),
    (Cfg("xw", 64, 64, 32, 3, post_zero=True), 4, -1, torch.float16, 130, False),
    (Cfg("xw", 64, 64, 64, 1, post_zero=False), 4, 128, torch.float16, 32, True),  # 128 codes a step
    (Cfg("xw", 32, 32, 32, 2, post_zero=True), 4, 128, torch.bfloat16, 130, False),
    (Cfg("xw", 64, 32, 32, 1, post_zero=False), 4, 32, torch.float16, 64, False),  # 2 groups a K-block
    (Cfg("xw", 16, 32, 32, 1, post_zero=True), 8, -1, torch.bfloat16, 17, True),  # bf16 W8: fp32 codes
    (Cfg("xw", 32, 32, 32, 2, post_zero=False), 8, 32, torch.float16, 130, False),
    (Cfg("xw", 32, 64, 16, 1, post_zero=False), 8, 64, torch.bfloat16, 33, False),
    (Cfg("xw", 32, 32, 64, 2, post_zero=True), 8, 128, torch.float16, 17, True),
    (Cfg("xw", 32, 32, 16, 2, post_zero=False), 2, 32, torch.bfloat16, 33, True),  # 2-bit: per element
    (Cfg("xw", 32, 32, 16, 1, post_zero=True), 2, -1, torch.float16, 64, False),
]


def make_problem(n, k, bits, group, dtype, m, bias=True, sym=False):
    """A random [n, k] weight (zero points 2^(b-1) when sym), m tokens, a bias (or None) and the fp32 reference."""
    qweight, scales, zeros, _ = make_weight(n, k, bits, group, dtype)
    if sym:
        zeros.fill_(2 ** (bits - 1))
    x = torch.randn(m, k, device=DEVICE, dtype=dtype)
    b = torch.randn(n, device=DEVICE, dtype=dtype) if bias else None
    ref = x.float() @ dequantize(qweight, scales, zeros, bits, group, k, dtype=torch.float32).t()
    if b is not None:
        ref += b.float()
    return qweight, scales, zeros, x, b, ref


def check_appended_kind(monkeypatch, w, flag: str, configs, kind: str, offered: dict):
    """A kind of candidates switched by the module flag Q.<flag>: with it off, `configs` offers none; with it on,
    the candidates hold the kind exactly for the token counts `offered` marks, and never as the untimed default."""
    monkeypatch.setattr(Q, flag, False)
    for m in offered:
        assert configs(m, w) == []
    monkeypatch.setattr(Q, flag, True)
    for m, want in offered.items():
        cands = Q.candidates(m, w, torch.float16)
        assert any(c.kind == kind for c in cands) == want, m
        assert cands[0].kind != kind


def _biased_problem(bits, group, k, dtype, m, sym):
    return make_problem(N, k, bits, group, dtype, m, sym=sym)


def _check_xw(cfg, bits, group, k, dtype, m, sym, prepared):
    qweight, scales, zeros, x, bias, ref = _biased_problem(bits, group, k, dtype, m, sym)
    out = torch.full((m, N), float("nan"), device=DEVICE, dtype=dtype)
    w = prepare_weight(qweight, scales, zeros, bits, group, k) if prepared else qweight
    args = () if prepared else (scales, zeros, bits, group, k)
    y = quant_matmul(x, w, *args, bias=bias, cfg=cfg, out=out)
    assert y.data_ptr() == out.data_ptr()
    err = rel_err(y, ref)
    assert err < TOL[dtype], f"{cfg} rel err {err:.2e}"


@pytest.mark.parametrize("cfg,bits,group,dtype,m,sym", XW_CASES)
@pytest.mark.parametrize("prepared", [False, True])
def test_xw_matches_reference(cfg, bits, group, dtype, m, sym, prepared):
    _check_xw(cfg, bits, group, K, dtype, m, sym, prepared)


@pytest.mark.parametrize("m,dtype", [(64, torch.float16), (130, torch.bfloat16)])
def test_xw_candidates_match_reference(m, dtype):
    """Every xw config the tuner would time (W4 g128 and W8 per-channel) gives the right product."""
    for bits, group in ((4, 128), (8, -1)):
        qweight, scales, zeros, _ = make_weight(N, K, bits, group, dtype)
        cfgs = xw_configs(m, prepare_weight(qweight, scales, zeros, bits, group, K))
        assert cfgs and all(c.kind == "xw" for c in cfgs)
        for cfg in cfgs:
            _check_xw(cfg, bits, group, K, dtype, m, False, True)


# gemv2, the CUDA-core decode kernel over int32 words: K a whole number of 256-code chunks or not
# (576 with g=128 ends in a 64-code group; 200 ends mid-chunk), groups of 32 / 64 / 128 and
# per-channel, with and without prefetch, split-K, symmetric (zeros = 2^(b-1)) and asymmetric.
GEMV2_CASES = [  # (cfg, bits, group, K, dtype, M, sym)
    (Cfg("gemv2", 1, 16, 128, 1, 2), 4, 128, 576, torch.float16, 1, False),
    (Cfg("gemv2", 4, 32, 128, 2, 1, stages=2), 4, 128, 576, torch.bfloat16, 3, True),  # prefetch
    (Cfg("gemv2", 16, 16, 128, 2, 1), 4, 32, 200, torch.float16, 16, False),
    (Cfg("gemv2", 4, 16, 128, 1, 1), 4, -1, 200, torch.bfloat16, 3, False),
    (Cfg("gemv2", 1, 32, 128, 2, 1), 4, 128, 512, torch.float16, 1, True),  # no masks in the loop
    (Cfg("gemv2", 2, 16, 128, 2, 1), 8, 64, 200, torch.bfloat16, 2, False),
    (Cfg("gemv2", 1, 16, 128, 3, 1, stages=2), 2, 128, 600, torch.float16, 1, False),
    (Cfg("gemv2", 1, 16, 128, 2, 4), 4, 128, 1100, torch.float16, 1, False),  # 4 chunks a trip (the default)
]


@pytest.mark.parametrize("cfg,bits,group,k,dtype,m,sym", GEMV2_CASES)
def test_gemv2_matches_reference(cfg, bits, group, k, dtype, m, sym, monkeypatch):
    monkeypatch.setattr(Q, "GEMV2_COPY", "1")  # on Hopper "auto" leaves the copy out where the Gluon kernel runs
    qweight, scales, zeros, x, bias, ref = _biased_problem(bits, group, k, dtype, m, sym)
    w = prepare_weight(qweight, scales, zeros, bits, group, k)
    assert w.qwords is not None
    out = torch.full((m, N), float("nan"), device=DEVICE, dtype=dtype)
    y = quant_matmul(x, w, bias=bias, cfg=cfg, out=out)
    assert rel_err(y, ref) < TOL[dtype]
    if m == 1:  # an unprepared weight is re-packed on the fly
        y2 = quant_matmul(x, qweight, scales, zeros, bits, group, k, bias=bias, cfg=cfg)
        assert torch.equal(y2, y)


def test_weight_without_the_gemv2_copy_still_runs(monkeypatch):
    """EFFOPT_QMM_GEMV2_COPY=0: prepare_weight keeps no second copy of the codes, gemv2 is never a candidate,
    and one token still gets the right product (from another kernel)."""
    monkeypatch.setattr(Q, "GEMV2_COPY", "0")
    qweight, scales, zeros, x, bias, ref = _biased_problem(4, 128, 512, torch.float16, 1, False)
    w = prepare_weight(qweight, scales, zeros, 4, 128, 512)
    assert w.qwords is None
    assert all(c.kind != "gemv2" for c in Q.candidates(1, w, torch.float16))
    assert rel_err(quant_matmul(x, w, bias=bias), ref) < TOL[torch.float16]


def test_gemv2_copy_kept_where_the_gluon_kernel_cannot_take_the_weight(monkeypatch):
    """"auto" keeps gemv2's copy off Hopper and for weights the Gluon W4 kernel does not take (3-bit, groups of
    32), drops it where that kernel runs; "1" / "0" force it; anything else is refused, naming the variable."""
    cpu = torch.device("cpu")
    monkeypatch.setattr(Q, "GEMV2_COPY", "auto")
    assert Q._keep_gemv2_copy(cpu, 4, 128, 512)
    hopper = torch.device("cuda") if ON_GPU and qmatmul_wgmma.available(torch.device("cuda")) else None
    if hopper is not None:
        assert not Q._keep_gemv2_copy(hopper, 4, 128, 512)
        assert Q._keep_gemv2_copy(hopper, 4, 32, 512) and Q._keep_gemv2_copy(hopper, 3, 128, 512)
    monkeypatch.setattr(Q, "GEMV2_COPY", "1")
    assert Q._keep_gemv2_copy(hopper or cpu, 4, 128, 512)
    monkeypatch.setattr(Q, "GEMV2_COPY", "0")
    assert not Q._keep_gemv2_copy(cpu, 4, 128, 512)
    monkeypatch.setattr(Q, "GEMV2_COPY", "yes")
    with pytest.raises(ValueError, match="EFFOPT_QMM_GEMV2_COPY"):
        Q._keep_gemv2_copy(cpu, 4, 128, 512)


def test_pack_words_layout():
    """Code c * 32 + t of chunk r sits at bits [c*b, (c+1)*b) of word r * 32 + t (zero padded)."""
    for bits in (2, 4, 8):
        k = 700
        codes = torch.randint(0, 2**bits, (3, k))
        words = pack_words(pack_codes(codes, bits), bits, k)
        cpw = 32 // bits
        chunks = -(-k // (32 * cpw))
        assert words.shape == (3, 32 * chunks) and words.dtype == torch.int32
        kk = torch.arange(32 * cpw * chunks)
        r, c, t = kk // (32 * cpw), (kk % (32 * cpw)) // 32, kk % 32
        got = (words[:, r * 32 + t].long() >> (c * bits)) & (2**bits - 1)
        assert torch.equal(got[:, :k], codes) and not got[:, k:].any()


def test_batched_input_and_default_dispatch():
    qweight, scales, zeros, _ = make_weight(N, K, 4, 64, torch.float16)
    x = torch.randn(2, 3, K, device=DEVICE, dtype=torch.float16)
    ref = x.float() @ dequantize(qweight, scales, zeros, 4, 64, K, dtype=torch.float32).t()
    y = quant_matmul(x, qweight, scales, zeros, 4, 64, K)  # CPU: torch path; GPU: tuned kernels
    assert y.shape == (2, 3, N) and y.dtype == torch.float16
    assert rel_err(y, ref) < TOL[torch.float16]


@pytest.mark.parametrize("m", [1, 2, 3, 16, 31, 32, 64, 1024])
def test_candidates_are_valid(m):
    qweight, scales, zeros, _ = make_weight(64, 256, 4, 128, torch.float16, "cpu")
    w = prepare_weight(qweight, scales, zeros, 4, 128, 256)
    cands = candidates(m, w, torch.float16)
    assert cands and all(c.kind in ("mma", "xw", "gemv", "gemv2", "dequant") for c in cands)
    assert cands[0].kind != "xw"  # the untimed default stays the swapped kernel (or gemv2)
    assert (m >= XW_MIN_M) == any(c.kind == "xw" for c in cands)
    assert (m <= 4) == any(c.kind == "gemv" for c in cands)
    assert (m <= 2) == (cands[0].kind == "gemv2")  # the untimed default for one or two tokens
    assert (m <= 2) == any(c.kind == "gemv2" for c in cands)
    assert not cands[0].zero_in_tile and (m <= 64) == any(c.zero_in_tile for c in cands)
    assert len(set(cands)) == len(cands)


def test_wrong_input_raises():
    qweight, scales, zeros, _ = make_weight(8, 64, 4, 32, torch.float16)
    with pytest.raises(ValueError):
        quant_matmul(torch.randn(2, 63, device=DEVICE, dtype=torch.float16), qweight, scales, zeros, 4, 32, 64)
    with pytest.raises(ValueError):
        quant_matmul(torch.randn(2, 64, device=DEVICE, dtype=torch.float16), qweight)


@pytest.mark.parametrize("name,bits,plane,dtype,offset", [
    ("_PTX_F16_LO4", 4, 0, torch.float16, 1024), ("_PTX_F16_HI4", 4, 1, torch.float16, 1024),
    ("_PTX_BF16_LO4", 4, 0, torch.bfloat16, 128), ("_PTX_BF16_HI4", 4, 1, torch.bfloat16, 128),
    ("_PTX_F16_B8", 8, 0, torch.float16, 1024)])
def test_ptx_code_conversion_gives_offset_plus_code(name, bits, plane, dtype, offset):
    """The GPU-only PTX conversions (`_plane_to_half`), emulated bit for bit on every byte value:
    element i of four packed bytes becomes OFFSET + code of plane `plane` of byte i, exactly as
    `_codes_to_float` on (byte >> plane * bits) & mask."""
    ptx = getattr(Q, name).value
    data = torch.randperm(256, generator=torch.Generator().manual_seed(0))  # every byte once, mixed quads
    for quad in data.view(-1, 4).tolist():
        lo, hi = run_ptx(ptx, int.from_bytes(bytes(quad), "little"))
        got = halves(lo, dtype) + halves(hi, dtype)
        assert got == [offset + ((byte >> plane * bits) & (2**bits - 1)) for byte in quad]


def test_ptx_configs_need_cuda_and_can_be_turned_off(monkeypatch):
    qweight, scales, zeros, _ = make_weight(64, 256, 4, 128, torch.float16, "cpu")
    w = prepare_weight(qweight, scales, zeros, 4, 128, 256)
    monkeypatch.setattr(Q, "PTX_CANDIDATES", True)
    assert not any(c.ptx for m in (1, 16, 64, 256) for c in candidates(m, w, torch.float16))  # not on CUDA
    if ON_GPU:
        wg = prepare_weight(*(t.cuda() for t in (qweight, scales, zeros)), 4, 128, 256)
        assert any(c.ptx for c in candidates(16, wg, torch.float16))
        monkeypatch.setattr(Q, "PTX_CANDIDATES", False)  # EFFOPT_QMM_PTX=0
        assert not any(c.ptx for m in (1, 16, 64, 256) for c in candidates(m, wg, torch.float16))
    if not ON_GPU:  # the interpreter runs no PTX: a forced ptx config is refused, by name
        x = torch.randn(3, 256, dtype=torch.float16)
        with pytest.raises(ValueError, match="ptx"):
            quant_matmul(x, w, cfg=Cfg("mma", 16, 32, 32, 1, x_split=True, ptx=True))


# PTX conversion on the GPU (the interpreter runs no PTX): 4-bit fp16 / bf16 and 8-bit fp16, scale and
# zero after the MMA and folded into the tile, split-K, several K-blocks a trip, x split or strided.
PTX_CASES = [
    (Cfg("mma", 16, 64, 64, 4, step_blocks=2, x_split=True, ptx=True), 4, 128, torch.float16, 1),
    (Cfg("mma", 16, 64, 64, 2, x_split=True, ptx=True), 4, 128, torch.bfloat16, 16),
    (Cfg("mma", 64, 64, 32, 2, ptx=True), 4, 32, torch.float16, 64),
    (Cfg("mma", 128, 128, 64, 1, post_zero=False, x_split=True, warps=8, ptx=True), 4, 128, torch.float16, 300),
    (Cfg("mma", 128, 64, 32, 1, post_zero=False, ptx=True), 4, -1, torch.bfloat16, 130),
    (Cfg("mma", 16, 64, 128, 2, ptx=True), 8, -1, torch.float16, 3),
    (Cfg("mma", 64, 64, 64, 1, post_zero=False, ptx=True), 8, 64, torch.float16, 64),
    (Cfg("mma", 16, 64, 64, 4, step_blocks=2, x_split=True, ptx=True, zero_in_tile=True), 4, 128, torch.float16, 16),
    (Cfg("mma", 16, 64, 64, 2, x_split=True, ptx=True, zero_in_tile=True), 4, -1, torch.bfloat16, 3),
]


@pytest.mark.skipif(not ON_GPU, reason="PTX runs on a GPU only (its bit-level logic is tested above)")
@pytest.mark.parametrize("cfg,bits,group,dtype,m", PTX_CASES)
def test_ptx_configs_match_reference(cfg, bits, group, dtype, m):
    qweight, scales, zeros, x, bias, ref = _biased_problem(bits, group, K, dtype, m, sym=False)
    out = torch.full((m, N), float("nan"), device=DEVICE, dtype=dtype)
    y = quant_matmul(x, qweight, scales, zeros, bits, group, K, bias=bias, cfg=cfg, out=out)
    assert rel_err(y, ref) < TOL[dtype], cfg


def test_scratch_buffers_are_poisoned_in_tests():
    from kernels import attention, qmatmul

    assert qmatmul.DEBUG_POISON and attention.DEBUG_POISON  # the autouse fixture is active


# `_qmm_swz_kernel` over `shuffle_w4` codes (opt-in: EFFOPT_QMM_SWZ=1 builds them): K a multiple of 64,
# groups of 64 / 128 / per-channel, split-K (3 splits of 5 or 9 blocks: uneven), 1 or 2 blocks a trip
# (2 with an odd block count runs past K), symmetric and asymmetric; PTX conversion on a GPU only.
SWZ_CASES = [  # (cfg, group, K, dtype, M, sym)
    (Cfg("swz", 16, 64, 32, 1, 1), 128, 256, torch.float16, 3, False),
    (Cfg("swz", 32, 64, 32, 3, 2), 64, 576, torch.bfloat16, 17, False),
    (Cfg("swz", 16, 64, 32, 2, 2), -1, 320, torch.float16, 16, True),
    (Cfg("swz", 64, 64, 32, 3, 1), 64, 320, torch.bfloat16, 64, True),
    (Cfg("swz", 32, 64, 32, 2, 2, post_zero=False), 128, 576, torch.float16, 40, False),  # scale in the tile
    (Cfg("swz", 16, 64, 32, 1, 1, post_zero=False), -1, 256, torch.bfloat16, 5, True),
    (Cfg("swz", 128, 64, 32, 2, 1, post_zero=False, warps=8), 128, 256, torch.float16, 130, False),  # 2 M tiles
]


@pytest.mark.parametrize("ptx", [False, True] if ON_GPU else [False])
@pytest.mark.parametrize("cfg,group,k,dtype,m,sym", SWZ_CASES)
def test_swz_matches_reference(cfg, group, k, dtype, m, sym, ptx, monkeypatch):
    monkeypatch.setattr(Q, "SWZ_CODES", True)
    if ON_GPU:
        k *= 8
    qweight, scales, zeros, x, bias, ref = _biased_problem(4, group, k, dtype, m, sym)
    w = prepare_weight(qweight, scales, zeros, 4, group, k)
    assert w.qswz is not None and w.qswz.shape == (N, k // 8)
    out = torch.full((m, N), float("nan"), device=DEVICE, dtype=dtype)
    y = quant_matmul(x, w, bias=bias, cfg=dataclasses.replace(cfg, ptx=ptx), out=out)
    assert rel_err(y, ref) < TOL[dtype]


def test_shuffle_w4_layout():
    """Nibble 4a + 16b of word (kb, c, wd) of a row holds the code of k = 64 kb + 32 wd + 8 a + 2 c + b."""
    k = 192
    codes = torch.randint(0, 16, (3, k))
    words = Q.shuffle_w4(pack_codes(codes, 4), k)
    assert words.shape == (3, k // 8) and words.dtype == torch.int32
    kk = torch.arange(k)
    kb, wd, a, c, b = kk // 64, (kk % 64) // 32, (kk % 32) // 8, (kk % 8) // 2, kk % 2
    got = (words[:, kb * 8 + c * 2 + wd].long() >> (4 * a + 16 * b)) & 0xF
    assert torch.equal(got, codes)


@pytest.mark.parametrize("name,dtype,offset", [("_SWZ_F16", torch.float16, 1024), ("_SWZ_BF16", torch.bfloat16, 128)])
def test_swz_ptx_gives_a_code_pair(name, dtype, offset):
    """The one-LOP3 conversion: (OFFSET + bits [0, 4), OFFSET + bits [16, 20)) of the word, as 16-bit floats."""
    ptx = getattr(Q, name).value
    for word in torch.randint(0, 2**32, (64,), generator=torch.Generator().manual_seed(0), dtype=torch.int64).tolist():
        lo, hi = run_ptx(ptx, word)
        assert halves(lo | hi << 16, dtype) == [offset + (word & 0xF), offset + ((word >> 16) & 0xF)]


def test_swz_configs_are_opt_in_and_never_the_default(monkeypatch):
    qweight, scales, zeros, _ = make_weight(64, 256, 4, 128, torch.float16, DEVICE)
    monkeypatch.setattr(Q, "SWZ_CODES", False)  # the default, whatever EFFOPT_QMM_SWZ says here
    assert prepare_weight(qweight, scales, zeros, 4, 128, 256).qswz is None
    monkeypatch.setattr(Q, "SWZ_CODES", True)
    w = prepare_weight(qweight, scales, zeros, 4, 128, 256)
    for m in (1, 2, 3, 16, 64, 128, 256, 512):
        cands = candidates(m, w, torch.float16)
        assert any(c.kind == "swz" for c in cands) == (2 < m <= 256)
        assert cands[0].kind != "swz"
    if ON_GPU:  # (on CPU an untuned call takes the torch path) a pick made for shuffled codes is never
        # applied to the same shape without them: the tuner's key says whether the weight has them
        keys = []
        monkeypatch.setattr(Q, "choose", lambda key, cands, run: keys.append(key) or cands[-1])
        x = torch.randn(16, 256, device=DEVICE, dtype=torch.float16)
        quant_matmul(x, w)
        monkeypatch.setattr(Q, "SWZ_CODES", False)
        quant_matmul(x, prepare_weight(qweight, scales, zeros, 4, 128, 256))  # same scale strides, no shuffle
        assert keys[0][:-1] == keys[1][:-1] and keys[0][-1] != keys[1][-1]
    g32 = prepare_weight(*make_weight(64, 256, 4, 32, torch.float16, DEVICE)[:3], 4, 32, 256)
    assert g32.qswz is None  # groups smaller than a 64-code block
    with pytest.raises(ValueError, match="shuffled codes"):
        quant_matmul(torch.randn(3, 256, device=DEVICE, dtype=torch.float16), g32, cfg=Cfg("swz", 16, 64, 32))


def test_mma_sync_switch_is_scoped_to_the_launch(monkeypatch):
    """`_tune.mma_sync` sets DISABLE_MMA_V3 only inside, restoring whatever was there (also on an error)."""
    from kernels._tune import mma_sync

    monkeypatch.delenv("DISABLE_MMA_V3", raising=False)
    with mma_sync(False):
        assert "DISABLE_MMA_V3" not in os.environ
    with mma_sync(True):
        assert os.environ["DISABLE_MMA_V3"] == "1"
    assert "DISABLE_MMA_V3" not in os.environ
    monkeypatch.setenv("DISABLE_MMA_V3", "0")
    with pytest.raises(RuntimeError), mma_sync(True):
        raise RuntimeError
    assert os.environ["DISABLE_MMA_V3"] == "0"


def test_mma_sync_configs_are_appended_on_hopper_for_few_tokens(monkeypatch):
    qweight, scales, zeros, _ = make_weight(64, 256, 4, 128, torch.float16)
    w = prepare_weight(qweight, scales, zeros, 4, 128, 256)
    monkeypatch.setattr(Q, "MMA_V2_CANDIDATES", False)  # EFFOPT_QMM_V2=0
    assert not any(c.mma_v2 for m in (1, 16, 64, 256) for c in candidates(m, w, torch.float16))
    monkeypatch.setattr(Q, "MMA_V2_CANDIDATES", True)
    monkeypatch.setattr(Q, "MS_CANDIDATES", False)  # (those would come after these)
    hopper = ON_GPU and torch.cuda.get_device_capability()[0] == 9
    for m in (1, 3, 16, 64, 256):
        cands = candidates(m, w, torch.float16)
        v2 = [c for c in cands if c.mma_v2]
        assert bool(v2) == (hopper and m <= 16)  # sm_90 only: elsewhere Triton's dot is mma.sync already
        assert not cands[0].mma_v2 and all(c.mma_v2 for c in cands[len(cands) - len(v2):])  # last, never first
        assert all(c.kind == "mma" and dataclasses.replace(c, mma_v2=False) in cands for c in v2)
    x = torch.randn(3, 256, device=DEVICE, dtype=torch.float16)
    with pytest.raises(ValueError, match="mma_v2"):  # no silent wgmma for a kind without the variant
        quant_matmul(x, w, cfg=Cfg("xw", 32, 32, 16, 1, post_zero=False, mma_v2=True))


# mma.sync copies on a GPU: the PTX conversion with the zero point in the tile or after, plain conversion,
# fp16 / bf16, split-K, 1-2 K-blocks a trip, 3-64 tokens (tails of M)
MMA_SYNC_CASES = [  # (cfg, bits, group, dtype, M)
    (Cfg("mma", 16, 64, 64, 4, step_blocks=2, x_split=True, ptx=True, zero_in_tile=True, mma_v2=True), 4, 128,
     torch.float16, 16),
    (Cfg("mma", 16, 64, 64, 2, x_split=True, ptx=True, mma_v2=True), 4, -1, torch.bfloat16, 3),
    (Cfg("mma", 16, 128, 64, 8, step_blocks=2, x_split=True, ptx=True, zero_in_tile=True, warps=8, mma_v2=True),
     4, 128, torch.bfloat16, 13),
    (Cfg("mma", 64, 64, 32, 2, mma_v2=True), 4, 32, torch.float16, 64),
]


@pytest.mark.skipif(not ON_GPU, reason="mma.sync vs wgmma is a GPU compiler choice")
@pytest.mark.parametrize("cfg,bits,group,dtype,m", MMA_SYNC_CASES)
def test_mma_sync_configs_match_reference(cfg, bits, group, dtype, m):
    qweight, scales, zeros, x, bias, ref = _biased_problem(bits, group, K, dtype, m, sym=False)
    w = prepare_weight(qweight, scales, zeros, bits, group, K)
    out = torch.full((m, N), float("nan"), device=DEVICE, dtype=dtype)
    y = quant_matmul(x, w, bias=bias, cfg=cfg, out=out)
    assert rel_err(y, ref) < TOL[dtype], cfg
    y_wgmma = quant_matmul(x, w, bias=bias, cfg=dataclasses.replace(cfg, mma_v2=False))
    assert rel_err(y, y_wgmma.float()) < TOL[dtype], cfg
