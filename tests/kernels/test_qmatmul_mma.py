"""The Gluon mma.sync W4 kernel for up to 64 tokens (kernels/qmatmul_mma.py).

On CPU: its K order (the codes a lane loads, the pairs one LOP3 makes of them, the joins and permutes that
place them, and the same reordering of x in each lane) gives the plain product, emulated in torch op for op;
and the PTX of its code conversion, emulated bit for bit, gives q - z exactly for every code and zero point.
On a Hopper GPU:
the kernel against the float32 reference, with tails of N and M, uneven split-K, groups of 64 / 128 and
per-channel, fp16 / bf16, bias, the scale after the MMA or in the tile. The sm_90 compile (and that both
layout conversions are free) is checked by tests/kernels/test_compile_sm90.py."""
import pytest
import torch

from kernel_testing import DEVICE, ON_GPU, PTXAS, poison_scratch, rel_err, run_script  # noqa: F401 (autouse fixture)
from kernels import qmatmul as Q
from kernels import qmatmul_mma as MS
from kernels import qmatmul_wgmma as W
from kernels.qmatmul import Cfg, prepare_weight, quant_matmul, unpack_codes
from test_qmatmul import TOL, check_appended_kind, make_problem, make_weight

HOPPER = ON_GPU and W.available(torch.device("cuda"))
needs_hopper = pytest.mark.skipif(not HOPPER, reason="Gluon mma.sync kernel: Hopper GPU only")


def _operand_a(words: torch.Tensor) -> torch.Tensor:
    """`_codes_operand` in torch: int32 [R, 8] words of a block -> the codes in the kernel's K order [R, 64]."""
    w3 = words.to(torch.int64).reshape(-1, 4, 2)
    pairs = []
    for q in range(4):
        v = w3 >> ((q % 2) * 8 + (q // 2) * 4)
        pairs.append(torch.stack([v & 0xF, (v >> 16) & 0xF], -1))  # the LOP3's low / high half
    a = torch.stack([torch.stack(pairs[:2], -1), torch.stack(pairs[2:], -1)], -1)  # gl.join = stack(-1)
    return a.permute(0, 2, 5, 4, 1, 3).reshape(-1, 64)


def _operand_b(x_block: torch.Tensor, permuted: bool = False) -> torch.Tensor:
    """`_x_operand` in torch: x [M, 64] (`permute_x`'s order when permuted) -> [64, M] in the kernel's K order."""
    if permuted:
        return x_block.reshape(-1, 4, 4, 2, 2).permute(2, 3, 1, 4, 0).reshape(64, -1)
    return x_block.reshape(-1, 4, 2, 2, 2, 2).permute(2, 5, 4, 1, 3, 0).reshape(64, -1)


def test_kernel_k_order_gives_the_plain_product():
    torch.manual_seed(0)
    qweight = torch.randint(0, 256, (24, 96), dtype=torch.uint8)  # K = 192: three blocks
    x = torch.randn(5, 192, dtype=torch.float64)
    ref = unpack_codes(qweight, 4, 192).double() @ x.t()
    words, xp = qweight.view(torch.int32), MS.permute_x(x)
    for permuted, xs in ((False, x), (True, xp)):  # reordered in registers, or pre-permuted by the gather
        got = sum(_operand_a(words[:, 8 * b:8 * b + 8]).double() @ _operand_b(xs[:, 64 * b:64 * b + 64], permuted)
                  for b in range(3))
        assert torch.allclose(got, ref, atol=1e-9), permuted
    # SIGMA (the docstring's table) is what the chain does: operand k = 16t + 8h + 2c + e holds column
    # 16c + SIGMA[4t + 2h + e]
    cols = _operand_b(torch.arange(64.0)[None, :])[:, 0].long()
    k = torch.arange(64)
    t, h, c, e = k // 16, (k % 16) // 8, (k % 8) // 2, k % 2
    assert torch.equal(cols, 16 * c + torch.tensor(MS.SIGMA)[4 * t + 2 * h + e])
    want = [[16 * g + j for g in range(4) for j in MS.SIGMA]]
    assert MS.permute_x(torch.arange(64.0)[None, :]).long().tolist() == want


def _halves(bits: torch.Tensor, dtype) -> torch.Tensor:
    """int64 16-bit patterns -> their float16 / bfloat16 values, as float64."""
    return (bits & 0xFFFF).to(torch.int32).to(torch.int16).view(dtype).double()


def _hex(asm, pattern: str) -> int:
    import re

    return int(re.search(pattern, asm.value).group(1), 16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_code_pair_conversion_gives_q_minus_z_exactly(dtype):
    """The PTX strings the kernel compiles (`_pair_asm`, `_neg_asm`), emulated bit for bit: LOP3, then the packed
    FMA with the zero point's addend, give q - z for every code and zero point of each of a word's 4 pairs."""
    f16 = dtype == torch.float16
    # (conversion, zero point addend, shift) of the pairs q = 0..3: real codes (0, 4), (2, 6), (1, 5), (3, 7)
    pairs = ([(MS._LO_F16, MS._NEG_F16, 0), (MS._LO_F16, MS._NEG_F16, 8), (MS._HI_F16, MS._NEG16_F16, 0),
              (MS._HI_F16, MS._NEG16_F16, 8)] if f16 else
             [(MS._LO_BF16, MS._NEG_BF16, s) for s in (0, 8, 4, 12)])
    codes = torch.arange(16 ** 2).reshape(-1, 1) // torch.tensor([1, 16]) % 16  # every pair of codes
    z = torch.arange(16, dtype=torch.float64)
    for q, (asm, neg, shift) in enumerate(pairs):
        nib = ((0, 4), (2, 6), (1, 5), (3, 7))[q]
        others = 0xFFFFFFFF & ~((0xF << (4 * nib[0])) | (0xF << (4 * nib[1])))  # the word's other codes: 15
        word = others | (codes[:, 0] << (4 * nib[0])) | (codes[:, 1] << (4 * nib[1]))
        r = ((word >> shift) & _hex(asm, r"\$2, (0x[0-9a-f]+)")) | _hex(asm, r"\$2, 0x[0-9a-f]+, (0x[0-9a-f]+)")
        mul = _halves(torch.tensor(_hex(asm, r"mov.b32 k, (0x[0-9a-f]+)")), dtype)
        addend = (z * _halves(torch.tensor(_hex(neg, r"mov.b16 m, (0x[0-9a-f]+)")), dtype)
                  + _halves(torch.tensor(_hex(neg, r"mov.b16 c, (0x[0-9a-f]+)")), dtype))
        for half, code in ((r, codes[:, 0]), (r >> 16, codes[:, 1])):  # the FMA's low / high half
            got = _halves(half, dtype)[:, None] * mul + addend[None, :]
            assert torch.equal(got, (code[:, None] - z[None, :]).double()), q


def test_layouts_want_whole_mma_tiles():
    if not W.HAVE_GLUON:
        pytest.skip("this Triton has no Gluon")
    MS.layouts(128, 16, 4)
    for bn, bm, warps in ((96, 16, 4), (128, 128, 4), (32, 16, 4)):
        with pytest.raises(ValueError, match="block_n"):
            MS.layouts(bn, bm, warps)


def test_ms_launch_wants_trips_inside_a_group_or_of_whole_groups():
    """Refused before any launch: 2 blocks a trip over groups of 3 blocks; 4 blocks a trip over K = 6 blocks."""
    x = torch.zeros(2, 384)
    for group, step in ((192, 2), (64, 4)):
        with pytest.raises(ValueError, match="trips"):
            MS.launch(x, torch.zeros(8, 192, dtype=torch.uint8), None, None, group, None, None, None, None,
                      block_n=64, block_m=8, split_k=1, warps=4, step=step)


def test_ms_configs_can_be_left_out_and_launches_refused_off_hopper(monkeypatch):
    qweight, scales, zeros, _ = make_weight(64, 256, 4, 128, torch.float16)
    w = prepare_weight(qweight, scales, zeros, 4, 128, 256)
    check_appended_kind(monkeypatch, w, "MS_CANDIDATES", Q.ms_configs, "ms",
                        {m: HOPPER for m in (1, 16, 64, 65)})  # from 65 tokens: the wgmma form
    if not HOPPER:
        with pytest.raises(ValueError, match="Hopper"):
            quant_matmul(torch.randn(3, 256, device=DEVICE, dtype=torch.float16), w, cfg=Cfg("ms", 16, 64, 32, 1))


def test_ws_launch_wants_ring_slots_and_whole_warpgroups():
    x = torch.zeros(2, 256)
    for stages, warps in ((1, 4), (3, 2)):
        with pytest.raises(ValueError, match="warpgroups"):
            MS.launch(x, torch.zeros(8, 128, dtype=torch.uint8), None, None, 128, None, None, None, None,
                      block_n=64, block_m=8, split_k=1, warps=warps, step=2, stages=stages, specialized=True)
    with pytest.raises(ValueError, match="shared memory"):  # two rings of 3 slots of 4 blocks at 64 tokens: 245 KB
        MS.launch(torch.zeros(64, 2048), torch.zeros(64, 1024, dtype=torch.uint8), None, None, 128, None, None, None,
                  None, block_n=64, block_m=64, split_k=1, warps=4, step=4, stages=3, specialized=True, halves=2)
    for halves, warps, specialized, stages in ((3, 4, True, 3), (2, 8, True, 3), (2, 4, False, 2)):  # ws, 4 warps
        with pytest.raises(ValueError, match="halves"):
            MS.launch(x, torch.zeros(8, 128, dtype=torch.uint8), None, None, 128, None, None, None, None,
                      block_n=64, block_m=8, split_k=1, warps=warps, step=2, stages=stages, specialized=specialized,
                      halves=halves)
    for wgmma, dtype in ((False, torch.float16), (True, torch.bfloat16)):  # natural: the wgmma form, fp16 x
        with pytest.raises(ValueError, match="natural"):
            MS.launch(x.to(dtype), torch.zeros(8, 128, dtype=torch.uint8), None, None, 128, None, None, None, None,
                      block_n=64, block_m=64, split_k=1, warps=4, step=2, stages=3, specialized=True,
                      scale_in_tile=True, wgmma=wgmma, natural=True)
    for block_m, warps in ((256, 8), (256, 4), (128, 8)):  # one block a trip on wgmma: wrong on an H200 there
        with pytest.raises(ValueError, match="step 1"):
            MS.launch(torch.zeros(256, 256, dtype=torch.float16), torch.zeros(8, 128, dtype=torch.uint8), None, None,
                      128, None, None, None, None, block_n=64, block_m=block_m, split_k=1, warps=warps, step=1,
                      stages=3, specialized=True, scale_in_tile=True, wgmma=True)
    for specialized, stages, pdl in ((False, 2, 1), (True, 3, 3)):  # a dependent launch: modes 1, 2 of the ws kernel
        with pytest.raises(ValueError, match="pdl"):
            MS.launch(x, torch.zeros(8, 128, dtype=torch.uint8), None, None, 128, None, None, None, None,
                      block_n=64, block_m=8, split_k=1, warps=4, step=2, stages=stages, specialized=specialized,
                      pdl=pdl)
    for specialized, pre, warps in ((False, True, 4), (True, False, 4), (True, True, 2)):  # ws, scale in tile, 4-8 warps
        with pytest.raises(ValueError, match="wgmma"):
            MS.launch(x, torch.zeros(8, 128, dtype=torch.uint8), None, None, 128, None, None, None, None,
                      block_n=64, block_m=8, split_k=1, warps=warps, step=2, stages=3, specialized=specialized,
                      scale_in_tile=pre, wgmma=True)


@pytest.mark.parametrize("programs,warps,smem,halves", [
    (256, 4, 78_000, 1), (512, 4, 52_000, 1), (512, 4, 64_000, 1), (256, 8, 40_000, 1), (100, 4, 30_000, 1),
    (4096, 4, 52_000, 1), (128, 4, 104_000, 2), (256, 4, 104_000, 2), (64, 4, 140_000, 2), (512, 4, 60_000, 2)])
def test_ws_launch_regs_fit_the_grid_in_one_wave_where_an_sm_can(programs, warps, smem, halves):
    """An SM holds 65536 registers and 227 KB of shared memory; a program is halves * warps + 4 warps at the cap
    (smem: the whole program's, both halves' rings)."""
    sms = 132
    regs = MS.ws_launch_regs(programs, warps, smem, sms, halves)
    top = 128 if halves == 1 else 168
    assert 64 <= regs <= top and regs % 8 == 0
    total = halves * warps + 4
    fit = min(65536 // (32 * total * regs), 227 * 1024 // smem)  # programs an SM at this cap
    want = min(-(-programs // sms), 227 * 1024 // smem)
    assert fit >= want or regs == 64  # one wave where registers allow; the floor otherwise
    if regs < top:  # no lower than needed: one step up would not fit
        assert 65536 // (32 * total * (regs + 8)) < want


@pytest.mark.parametrize("regs", [64, 80, 128, 168])
def test_ws_half_regs_share_the_cap_between_the_halves(regs):
    """Three warpgroups at the cap (two halves' MMA warps, the producers) hold 3 * regs a thread; the producers
    keep 24 and each half gets an even share, in setmaxnreg's steps of 8 up to 256, and not much less."""
    half = MS.ws_half_regs(regs)
    assert half % 8 == 0 and 24 <= half <= 256
    assert 24 + 2 * half <= 3 * regs < 24 + 2 * (half + 8) or half == 256


@pytest.mark.skipif(not W.HAVE_GLUON or not PTXAS.exists(), reason="needs Gluon and the ptxas Triton ships")
@pytest.mark.parametrize("bn,bm,step,stages", [(128, 16, 4, 3), (64, 64, 2, 4)])
def test_ws_smem_estimate_covers_the_compiled_kernel(bn, bm, step, stages):
    """`ws_smem_bytes` (which sets the launch register cap) is at least what ptxas gives the kernel (sm_90),
    compiled by `scripts/sass_count.py` in a process without the interpreter."""
    import re

    args = ["ms", "--ws", "--block-n", str(bn), "--block-m", str(bm), "--warps", "4", "--step", str(step),
            "--split-k", "2", "--stages", str(stages), "--maxnreg", "128"] + (["--pre"] if bm >= 32 else [])
    shared = int(re.search(r"shared (\d+) B", run_script("sass_count.py", *args)).group(1))
    est = MS.ws_smem_bytes(bn, bm, step, stages, 128)
    assert shared <= est < shared + 4096


CASES = [  # (block_m tokens, block_n rows, split_k, step, warps, M, N, K, group, dtype, bias, scale in the tile)
    (16, 128, 1, 2, 4, 16, 256, 512, 128, torch.float16, False, False),
    (16, 64, 3, 1, 4, 13, 200, 1280, 64, torch.bfloat16, True, False),  # M and N tails, 20 blocks over 3 splits
    (8, 128, 4, 2, 8, 1, 2048 + 24, 4096, 128, torch.float16, True, False),
    (16, 128, 2, 2, 4, 16, 520, 2048, -1, torch.bfloat16, False, False),  # per-channel
    (8, 64, 1, 1, 4, 3, 320, 768, 128, torch.float16, True, False),
    (64, 64, 2, 2, 4, 64, 256, 2048, 128, torch.float16, True, True),
    (32, 64, 3, 1, 4, 20, 200, 1280, 64, torch.bfloat16, False, True),  # M and N tails
    # trips of whole groups: 2 groups of 128 / 4 groups of 64 a trip
    (8, 128, 2, 4, 4, 1, 520, 2048, 128, torch.float16, True, False),
    (16, 64, 3, 4, 4, 16, 200, 1280, 64, torch.bfloat16, False, False),
    (64, 64, 2, 4, 4, 40, 256, 2048, 128, torch.float16, True, True),
]


@needs_hopper
@pytest.mark.parametrize("bm,bn,sk,step,warps,m,n,k,group,dtype,bias,pre", CASES)
def test_ms_kernel_matches_reference(bm, bn, sk, step, warps, m, n, k, group, dtype, bias, pre):
    qweight, scales, zeros, x, b, ref = make_problem(n, k, 4, group, dtype, m, bias)
    out = torch.full((m, n), float("nan"), device=DEVICE, dtype=dtype)
    # loads issued at the trip's start / one trip ahead; x reordered by a gather first / by each warp
    for stages, gather in ((1, bm >= 32), (2, bm < 32)):
        cfg = Cfg("ms", bm, bn, 32, sk, step, post_zero=not pre, x_split=gather, warps=warps, stages=stages)
        for w in (prepare_weight(qweight, scales, zeros, 4, group, k), qweight):  # group-major scales, and plain
            args = () if w is not qweight else (scales, zeros, 4, group, k)
            for _ in range(2):  # the second launch finds the split-K counters re-armed
                out.fill_(float("nan"))
                y = quant_matmul(x, w, *args, bias=b, cfg=cfg, out=out)
                assert rel_err(y, ref) < TOL[dtype], cfg
    # the warp-specialized form (4 or 8 MMA warps), fed by bulk copies through 2 or 3 ring slots: prepared weights;
    # with 4 MMA warps also as two halves of K a program (a half of 0 or 1 trips where a split is short)
    w = prepare_weight(qweight, scales, zeros, 4, group, k)
    for stages, halves in ((2, 1), (3, 1)) + (((2, 2), (3, 2)) if warps == 4 else ()):
        if halves * MS.ws_smem_bytes(bn, bm, step, stages, min(group, k) if group > 0 else k) > MS.SMEM_BYTES:
            continue  # two rings too large for an SM (launch refuses them: test_ws_launch_wants_...)
        cfg = Cfg("ms", bm, bn, 32, sk, step, post_zero=not pre, x_split=bm >= 32, warps=warps, stages=stages,
                  specialized=True, halves=halves)
        for _ in range(2):
            out.fill_(float("nan"))
            assert rel_err(quant_matmul(x, w, bias=b, cfg=cfg, out=out), ref) < TOL[dtype], cfg
    # the block MMAs on wgmma (x read by the tensor cores from the ring), 4 MMA warps
    natural = (False, True) if dtype == torch.float16 else (False,)  # x as it lies (fp16 only)
    for stages, halves, nat in [(s, h, n) for s, h in ((2, 1), (3, 1), (2, 2)) for n in natural] if warps == 4 else ():
        if halves * MS.ws_smem_bytes(bn, bm, step, stages, min(group, k) if group > 0 else k) > MS.SMEM_BYTES:
            continue
        cfg = Cfg("ms", bm, bn, 32, sk, step, post_zero=False, warps=4, stages=stages, specialized=True, wgmma=True,
                  halves=halves, natural=nat)
        for _ in range(2):
            out.fill_(float("nan"))
            assert rel_err(quant_matmul(x, w, bias=b, cfg=cfg, out=out), ref) < TOL[dtype], cfg


@needs_hopper
@pytest.mark.parametrize("cfg,m", [
    (Cfg("ms", 8, 64, 32, 1, 4, warps=4, stages=3, specialized=True, halves=2, pdl=2), 1),  # the M = 1 form
    (Cfg("ms", 16, 64, 32, 4, 4, warps=4, stages=3, specialized=True, pdl=1), 16),  # split-K: shared counters
    (Cfg("ms", 16, 64, 32, 4, 4, warps=4, stages=3, specialized=True, pdl=2), 16),
    (Cfg("ms", 64, 64, 32, 2, 2, post_zero=False, warps=4, stages=3, specialized=True, wgmma=True, natural=True,
         pdl=2), 64),
])
def test_dependent_launch_reads_x_only_after_the_kernel_before(cfg, m):
    """pdl: in a chain where each call's x is the output of the kernel launched right before it (the previous
    call, then a rescale), eagerly and replayed as a CUDA graph, every output equals the plain launch's bit for
    bit: x (and the split-K counters) are read only after the grid before is done."""
    import dataclasses

    n = k = 1024
    qweight, scales, zeros, x, _, _ = make_problem(n, k, 4, 128, torch.float16, m, False)
    w = prepare_weight(qweight, scales, zeros, 4, 128, k)

    def chain(c, x0, outs):
        x = x0
        for out in outs:
            y = quant_matmul(x, w, cfg=c, out=out)
            x = y / y.abs().amax(dim=1, keepdim=True)  # this kernel writes the next call's x
        return outs

    def buffers():
        return [torch.full((m, n), float("nan"), device=DEVICE, dtype=torch.float16) for _ in range(6)]

    plain = chain(dataclasses.replace(cfg, pdl=0), x, buffers())
    outs = buffers()
    chain(cfg, x, outs)
    assert all(torch.equal(a, b) for a, b in zip(plain, outs)), cfg
    for o in outs:
        o.fill_(float("nan"))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        chain(cfg, x, outs)
    for o in outs:
        o.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(plain, outs)), cfg


@needs_hopper
@pytest.mark.parametrize("bm,bn,warps,sk,m,n,k,group,dtype,bias", [
    (128, 64, 4, 1, 200, 320, 1024, 128, torch.float16, True),  # two token tiles, the second short; N tail
    (128, 64, 4, 2, 128, 256, 2048, -1, torch.bfloat16, False),  # per-channel, split-K
    (128, 64, 4, 3, 77, 200, 1280, 64, torch.float16, False),  # 20 blocks over 3 splits
    (256, 128, 8, 1, 300, 320, 1024, 128, torch.bfloat16, True),  # two warpgroups of MMA warps, 256-token tiles
    (128, 128, 8, 3, 64, 200, 1280, 64, torch.float16, False),
])
def test_ms_wgmma_many_tokens_matches_reference(bm, bn, warps, sk, m, n, k, group, dtype, bias):
    """On wgmma the kernel takes any number of tokens, in tiles of up to 256 (x read from shared memory), on one or
    two warpgroups of MMA warps."""
    qweight, scales, zeros, x, b, ref = make_problem(n, k, 4, group, dtype, m, bias)
    w = prepare_weight(qweight, scales, zeros, 4, group, k)
    out = torch.full((m, n), float("nan"), device=DEVICE, dtype=dtype)
    for stages, natural in ((2, False), (3, False)) + (((2, True), (3, True)) if dtype == torch.float16 else ()):
        cfg = Cfg("ms", bm, bn, 32, sk, 2, post_zero=False, warps=warps, stages=stages, specialized=True, wgmma=True,
                  natural=natural)  # natural: x as it lies, no gather
        for _ in range(2):
            out.fill_(float("nan"))
            assert rel_err(quant_matmul(x, w, bias=b, cfg=cfg, out=out), ref) < TOL[dtype], cfg


def test_natural_conversion_gives_each_lane_its_adjacent_codes_minus_the_zero():
    """`_NAT_F16` emulated bit for bit (PRMT with lane c's selector as `_codes_operand_natural` builds it, then
    LOP3 and the FMA): byte c of a word, codes 2c and 2c + 1 (the adjacent columns 8 wd + 2c, 8 wd + 2c + 1), gives
    (q - z) for both, with the addend `_blocks_wgmma` mixes from `_zero_addends`' two (low half at OFFSET, high at
    OFFSET / 16), for every byte, lane and zero point; the word's other bytes do not leak in."""
    dtype = torch.float16
    asm = MS._NAT_F16
    byte = torch.arange(256)
    z = torch.arange(16, dtype=torch.float64)
    mul = _halves(torch.tensor(_hex(asm, r"mov.b32 k, (0x[0-9a-f]+)")), dtype), \
        _halves(torch.tensor(_hex(asm, r"mov.b32 k, (0x[0-9a-f]+)")) >> 16, dtype)
    addend = [z * _halves(torch.tensor(_hex(neg, r"mov.b16 m, (0x[0-9a-f]+)")), dtype)
              + _halves(torch.tensor(_hex(neg, r"mov.b16 c, (0x[0-9a-f]+)")), dtype)
              for neg in (MS._NEG_F16, MS._NEG16_F16)]  # the low half's, the high half's
    for c in range(4):
        word = (0xA5C35A3C & ~(0xFF << (8 * c))) | (byte << (8 * c))  # byte c under test
        sel = c * 0x101 + 0x4040
        src = [(word >> (8 * i)) & 0xFF for i in range(4)] + [torch.zeros_like(word)] * 4  # prmt's 8 bytes
        r = sum(src[(sel >> (4 * i)) & 0x7] << (8 * i) for i in range(4))
        r = (r & _hex(asm, r"lop3.b32 r, r, (0x[0-9a-f]+)")) | _hex(asm, r"lop3.b32 r, r, 0x[0-9a-f]+, (0x[0-9a-f]+)")
        for h, (half, code) in enumerate(((r, byte & 0xF), (r >> 16, byte >> 4))):
            got = _halves(half, dtype)[:, None] * mul[h] + addend[h][None, :]
            assert torch.equal(got, (code[:, None] - z[None, :]).double()), (c, h)


def test_permute_x_wgmma_puts_each_column_where_the_codes_operand_has_it():
    """Position k = 16t + 8h + 2c + e of a 64-column block is where `_codes_operand` puts real column
    16c + 8 (t // 2) + 4e + 2h + t % 2 (`_x_operand`'s order); and `permute_x`'s position 16c + 4t + 2h + e holds
    the same column (the register path's order)."""
    x = torch.arange(2 * 128, dtype=torch.float32).reshape(2, 128)
    got = MS.permute_x_wgmma(x)
    reg = MS.permute_x(x)
    for blk in range(2):
        for k in range(64):
            t, h, c, e = k // 16, (k // 8) % 2, (k // 2) % 4, k % 2
            col = blk * 64 + 16 * c + 8 * (t // 2) + 4 * e + 2 * h + t % 2
            assert got[1, blk * 64 + k] == x[1, col], k
            assert reg[1, blk * 64 + 16 * c + 4 * t + 2 * h + e] == x[1, col], k


def test_fp16_x_is_read_as_it_lies_unless_asked_otherwise(monkeypatch):
    """EFFOPT_QMM_NATURAL: "1" (the default) every wgmma-form candidate reads fp16 x as it lies, "0" gathers it,
    "both" times both; bf16 x is always gathered."""
    import dataclasses

    monkeypatch.setattr(W, "available", lambda device: True)  # the Hopper candidate list, on any machine
    qweight, scales, zeros, _ = make_weight(256, 1024, 4, 128, torch.float16, "cpu")
    w = prepare_weight(qweight, scales, zeros, 4, 128, 1024)
    monkeypatch.setattr(Q, "NATURAL_MODE", "0")
    base = Q.ms_wgmma_configs(64, w, torch.float16)
    assert base and not any(c.natural for c in base)
    monkeypatch.setattr(Q, "NATURAL_MODE", "1")
    natural = Q.ms_wgmma_configs(64, w, torch.float16)
    assert all(c.natural for c in natural) and [dataclasses.replace(c, natural=False) for c in natural] == base
    monkeypatch.setattr(Q, "NATURAL_MODE", "both")
    assert Q.ms_wgmma_configs(64, w, torch.float16) == base + natural
    for mode in ("0", "1", "both"):
        monkeypatch.setattr(Q, "NATURAL_MODE", mode)
        assert Q.ms_wgmma_configs(64, w, torch.bfloat16) == base


def test_warp_specialized_decode_configs_launch_as_dependents(monkeypatch):
    """EFFOPT_QMM_PDL: up to 16 tokens every warp-specialized candidate carries the mode (1 by default, 0 off, 2
    weights first); the plain kernel's candidates and those from 32 tokens never do."""
    monkeypatch.setattr(W, "available", lambda device: True)  # the Hopper candidate list, on any machine
    qweight, scales, zeros, _ = make_weight(256, 1024, 4, 128, torch.float16, "cpu")
    w = prepare_weight(qweight, scales, zeros, 4, 128, 1024)
    for mode in (1, 0, 2):
        monkeypatch.setattr(Q, "PDL_MODE", mode)
        for m in (1, 16, 64):
            cfgs = Q.ms_configs(m, w)
            ws = [c for c in cfgs if c.specialized]
            assert ws and any(c.halves == 2 for c in ws)
            assert all(c.pdl == (mode if m <= 16 else 0) for c in ws), (mode, m)
            assert all(c.pdl == 0 for c in cfgs if not c.specialized)
    assert all(c.pdl == 0 for c in Q.ms_wgmma_configs(64, w, torch.float16))
