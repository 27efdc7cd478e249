"""W8A8 kernels (kernels.int8_matmul): codes identical to effopt's quantize_per_token, int32 sums
equal to the exact integer product, epilogue and ActQuantLinear's kernel path equal to its torch path."""
import types

import pytest
import torch

from kernel_testing import DEVICE, ON_GPU, poison_scratch, rel_err  # noqa: F401 (autouse fixture)

from kernels import int8_matmul as I  # noqa: E402

from effopt.nn import act_quant_linear as AQ  # noqa: E402

SMALL = I.Cfg(16, 32, 32, swap=True, stages=1)  # decode orientation: out^T = W @ x^T
WIDE = I.Cfg(16, 32, 32, swap=False, stages=1)  # out = x @ W^T
SIZES = [(m, n, k) for m in (1, 3, 17) for n in (16, 48) for k in (32, 100, 257)]


def as_u8(w: torch.Tensor) -> torch.Tensor:
    """int8 codes -> uint8 codes with zero point 128 (how ActQuantLinear stores them)."""
    return (w.to(torch.int16) + 128).to(torch.uint8)


def codes(*shape, lo=-127, hi=127):
    return torch.randint(lo, hi + 1, shape, device=DEVICE, dtype=torch.int8)


def exact_product(xq: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """xq @ w^T in int64, on the CPU (CUDA has no int64 matmul), back on xq's device."""
    return (xq.cpu().long() @ w.cpu().long().t()).to(xq.device)


def assert_rounded(y: torch.Tensor, ref: torch.Tensor):
    """y is the float32 result `ref` cast to y.dtype. Bit for bit under the interpreter, which runs
    the torch path's operations in its order; except bf16 there, as the interpreter truncates fp32 to
    bf16 (1 ulp). On a GPU within half an ulp of the cast plus a few fp32 ulps of the row's scale
    (a fused multiply-add rounds acc * xs * ws + bias once where torch rounds twice)."""
    assert y.dtype in (torch.float16, torch.bfloat16, torch.float32) and not y.isnan().any()
    if not ON_GPU and y.dtype != torch.bfloat16:
        assert torch.equal(y, ref.to(y.dtype))
        return
    mant = {torch.float16: 10, torch.bfloat16: 7, torch.float32: 23}[y.dtype]
    ref = ref.double()
    tol = (1.0 if not ON_GPU else 0.5) * 2.0 ** -mant * ref.abs()
    if ON_GPU:
        tol += 2.0 ** -21 * ref.abs().amax(dim=-1, keepdim=True)
    assert ((y.double() - ref).abs() <= tol).all()


# ----------------------------------------------------------------------------------------------
# quantize_rows
# ----------------------------------------------------------------------------------------------
def poisoned_pair(m, k):
    """Outputs no correct run leaves as they are: code -128 never comes out, neither does NaN."""
    return (torch.full((m, k), -128, device=DEVICE, dtype=torch.int8),
            torch.full((m, 1), float("nan"), device=DEVICE, dtype=torch.float32))


@pytest.mark.parametrize("m,k", [(1, 32), (3, 100), (17, 257), (2, 3000)])  # 3000: the two-pass loop
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_quantize_rows_equals_quantize_per_token(m, k, dtype):
    x = (torch.randn(m, k, device=DEVICE) * torch.rand(m, 1, device=DEVICE) * 10).to(dtype)
    x[0, : k // 4] = 0  # zeros and a row's sign pattern do not change anything
    out = poisoned_pair(m, k)
    q, s = I.quantize_rows(x, out=out)
    assert q.data_ptr() == out[0].data_ptr() and s.data_ptr() == out[1].data_ptr()
    ref_q, ref_s = AQ.quantize_per_token(x)
    assert torch.equal(q, ref_q) and torch.equal(s, ref_s)
    assert q.abs().max() == 127


def test_quantize_rows_ties_round_to_even_and_zero_rows():
    """x / scale exactly k + 0.5 must round like torch.round (half to even): 2.5 -> 2, 3.5 -> 4."""
    amax = torch.tensor([3.0, 100.0, 0.37, 1e4], device=DEVICE)
    scale = amax * I.INV_QMAX  # what quantize_rows computes from the row maximum (fp32)
    half = torch.arange(-120, 120, device=DEVICE, dtype=torch.float32) + 0.5
    x = half[None, :] * scale[:, None]  # rounded products; keep those whose quotient is still a tie
    x = torch.cat([amax[:, None], x], dim=1)
    ties = (x / scale[:, None]) == torch.cat([torch.full_like(amax[:, None], 127.0), half.expand(4, -1)], 1)
    assert ties[:, 1:].float().mean() > 0.5  # most of the constructed values are exact ties
    x = torch.cat([x, torch.zeros(1, x.shape[1], device=DEVICE)])  # an all-zero row: codes 0
    q, s = I.quantize_rows(x, out=poisoned_pair(*x.shape))
    ref_q, ref_s = AQ.quantize_per_token(x)
    assert torch.equal(q, ref_q) and torch.equal(s, ref_s)
    tie_codes = q[:4, 1:][ties[:, 1:]].long()
    tie_vals = (x[:4, 1:] / scale[:, None])[ties[:, 1:]]
    assert (tie_codes % 2 == 0).all() and ((tie_codes - tie_vals).abs() == 0.5).all()  # to even, both ways
    assert (tie_codes > tie_vals).any() and (tie_codes < tie_vals).any()
    assert not q[4].any() and s[4].item() == pytest.approx(1e-8 / 127)


# ----------------------------------------------------------------------------------------------
# int8_matmul_scaled
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("m,n,k", SIZES)
@pytest.mark.parametrize("cfg", [SMALL, WIDE], ids=["swap", "wide"])
def test_int32_sums_are_exact(m, n, k, cfg):
    """Unit scales, no bias, fp32 out: the output is the exact integer product, converted to fp32
    once (as the reference: int64 product -> fp32). int8 and uint8-with-zero-128 weights alike."""
    xq, w = codes(m, k), codes(n, k)
    ref = exact_product(xq, w).float()
    ones_m, ones_n = torch.ones(m, 1, device=DEVICE), torch.ones(n, device=DEVICE)
    for wt in (w, as_u8(w)):
        out = torch.full((m, n), float("nan"), device=DEVICE)
        y = I.int8_matmul_scaled(xq, ones_m, wt, ones_n, None, torch.float32, cfg=cfg, out=out)
        assert y.data_ptr() == out.data_ptr() and torch.equal(y, ref)


@pytest.mark.parametrize("cfg", [SMALL, WIDE], ids=["swap", "wide"])
def test_int32_sums_past_fp32_precision(cfg):
    """Sums near 2^25: an fp32 accumulation would lose their low bits, int32 keeps every one."""
    m, n, k = 3, 16, 2080
    xq, w = codes(m, k, lo=90), codes(n, k, lo=90)
    w[0] = -w[0]  # large negative sums too
    exact = exact_product(xq, w)
    assert exact.abs().min() > 2**24
    y = I.int8_matmul_scaled(xq, torch.ones(m, 1, device=DEVICE), as_u8(w), torch.ones(n, device=DEVICE),
                             None, torch.float32, cfg=cfg)
    assert torch.equal(y, exact.float())


@pytest.mark.parametrize("m,n,k", [(1, 48, 100), (3, 16, 257), (17, 48, 32), (17, 16, 257)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("has_bias", [False, True])
def test_epilogue_matches_reference(m, n, k, dtype, has_bias):
    """acc * xs * ws + bias, cast to fp16 / bf16, against the same arithmetic in torch."""
    xq, w = codes(m, k), codes(n, k)
    xs = torch.rand(m, 1, device=DEVICE) * 0.05 + 1e-3
    ws = (torch.rand(n, 1, device=DEVICE) * 0.01 + 1e-4).to(dtype)  # [N, 1] in the layer's dtype
    bias = torch.randn(n, device=DEVICE, dtype=dtype) if has_bias else None
    ref = I.int8_matmul_scaled_ref(xq, xs, w, ws, bias, torch.float32)
    for cfg in (SMALL, WIDE):
        out = torch.full((m, n), float("nan"), device=DEVICE, dtype=dtype)
        y = I.int8_matmul_scaled(xq, xs, as_u8(w), ws, bias, dtype, cfg=cfg, out=out)
        assert y.dtype == dtype
        assert_rounded(y, ref)


@pytest.mark.parametrize("m", [1, 17, 100])
def test_every_gpu_candidate_is_correct(m, monkeypatch):
    """The GPU's tile configs (large tiles over a small, ragged problem) give the exact result."""
    monkeypatch.setattr(I, "interpreting", lambda: False)
    cands = I.candidates(m, 48, 300)
    monkeypatch.undo()
    assert all(c.block_k >= 32 and c.block_m >= 16 and c.block_n >= 16 for c in cands)
    if m <= I.SMALL_M:  # decode: tokens on the MMA's narrow side
        assert all(c.swap for c in cands)
    if m > 64:
        assert not any(c.swap for c in cands)
    xq, w = codes(m, 300), codes(48, 300)
    xs, ws = torch.rand(m, 1, device=DEVICE), torch.rand(48, device=DEVICE)
    ref = I.int8_matmul_scaled_ref(xq, xs, w, ws, None, torch.float32)
    for cfg in cands:
        y = I.int8_matmul_scaled(xq, xs, as_u8(w), ws, None, torch.float32, cfg=cfg,
                                 out=torch.full((m, 48), float("nan"), device=DEVICE))
        assert rel_err(y, ref) < 1e-6, cfg


def test_bad_arguments_raise():
    xq, w = codes(3, 64), codes(16, 64)
    xs, ws = torch.ones(3, 1, device=DEVICE), torch.ones(16, device=DEVICE)
    with pytest.raises(ValueError):
        I.int8_matmul_scaled(xq, xs, codes(16, 63), ws)
    with pytest.raises(ValueError):
        I.int8_matmul_scaled(xq, xs, w.float(), ws)
    with pytest.raises(ValueError):
        I.int8_matmul_scaled(xq, xs, w, ws[:8])
    with pytest.raises(ValueError):
        I.int8_matmul_scaled(xq, xs, w, ws, out=torch.empty(3, 16, device=DEVICE))  # fp32, not fp16
    with pytest.raises(ValueError):
        I.quantize_rows(torch.randn(2, 3, 4, device=DEVICE))


# ----------------------------------------------------------------------------------------------
# w8a8_linear and ActQuantLinear's kernel path
# ----------------------------------------------------------------------------------------------
def test_kernel_dispatch(monkeypatch):
    """ActQuantLinear takes the kernel path on CUDA, for inputs that need no gradient, once opted in."""
    def fake(cuda=True, dtype=torch.float16, grad=False):
        return types.SimpleNamespace(is_cuda=cuda, dtype=dtype, requires_grad=grad)

    monkeypatch.setattr(AQ, "USE_W8A8_KERNEL", False)
    assert AQ.w8a8_kernel(fake()) is None  # the default until measured on a GPU
    monkeypatch.setattr(AQ, "USE_W8A8_KERNEL", True)
    assert AQ.w8a8_kernel(fake()) is I.w8a8_linear
    assert AQ.w8a8_kernel(fake(dtype=torch.bfloat16)) is I.w8a8_linear
    assert AQ.w8a8_kernel(fake(cuda=False)) is None
    assert AQ.w8a8_kernel(fake(dtype=torch.float64)) is None
    assert AQ.w8a8_kernel(fake(grad=True)) is None
    with torch.no_grad():
        assert AQ.w8a8_kernel(fake(grad=True)) is I.w8a8_linear
    assert AQ.w8a8_kernel(torch.randn(2, 4)) is None  # a CPU tensor: the torch path


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("has_bias", [False, True])
def test_act_quant_linear_kernel_path_matches_torch_path(dtype, has_bias, monkeypatch):
    """The layer's forward through w8a8_linear (its CUDA branch, forced here) vs its torch path."""
    torch.manual_seed(1)
    linear = torch.nn.Linear(100, 48, bias=has_bias).to(DEVICE, dtype)
    layer = AQ.ActQuantLinear.from_weight(linear.weight, linear.bias)
    x = torch.randn(2, 9, 100, device=DEVICE, dtype=dtype)  # M = 18 rows over two leading dims
    x[0, 0] *= 50  # one outlier token
    with torch.no_grad():
        monkeypatch.setattr(AQ, "w8a8_kernel", lambda _x: None)
        want = layer(x)  # torch path (quantize_per_token, int8 product, float rescale)
        monkeypatch.setattr(AQ, "w8a8_kernel", lambda _x: lambda *a: I.w8a8_linear(*a, cfg=WIDE))
        got = layer(x)
        monkeypatch.setattr(AQ, "w8a8_kernel", lambda _x: lambda *a: I.w8a8_linear(*a, cfg=SMALL))
        got_swap = layer(x[:, :3])
    assert got.shape == want.shape and got.dtype == dtype
    assert torch.equal(got_swap, got[:, :3])  # a row's result does not depend on the tile
    # the torch path's float32 result before its cast to dtype, recomputed here
    xq, xs = AQ.quantize_per_token(x.reshape(-1, 100))
    ref = I.int8_matmul_scaled_ref(xq, xs, layer.int_weight(), layer.scales, layer.bias, torch.float32)
    assert torch.equal(want.reshape(-1, 48), ref.to(dtype))
    assert_rounded(got.reshape(-1, 48), ref)


def test_w8a8_linear_close_to_float():
    """End to end (with its default config) against the float layer: W8A8 quantization error only."""
    torch.manual_seed(2)
    weight = torch.randn(48, 257, device=DEVICE) * 0.05
    x = torch.randn(3, 257, device=DEVICE)
    layer = AQ.ActQuantLinear.from_weight(weight, None)
    y = I.w8a8_linear(x, layer.qweight, layer.scales)
    assert rel_err(y, x @ weight.t()) < 2e-2
