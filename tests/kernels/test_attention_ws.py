"""The warp-specialized Gluon attention forward (`kernels.attention_ws`) against the float32 torch reference on a
Hopper GPU; on CPU: its refusals, its place among the tuner's candidates, and an offline sm_90 compile."""
import math
import re

import pytest
import torch

from kernel_testing import DEVICE, PTXAS, rel_err, run_script
from kernels import attention as A
from kernels import attention_ws as AW
from kernels import qmatmul_wgmma as W
from test_attention import TOL, qkv, reference

HOPPER = DEVICE == "cuda" and W.available(torch.device("cuda"))
needs_hopper = pytest.mark.skipif(not HOPPER, reason="Gluon attention forward: Hopper GPU only")

# (B, H, Hkv, Sq, Skv, D, causal, window, dtype): lengths 1, 127 and 1023, GQA with Sq < Skv (bottom-right), a key
# tile past the last key, full attention, a sliding window
CASES = [
    (1, 2, 1, 1, 1, 64, True, None, torch.float16),
    (1, 4, 1, 127, 127, 128, True, None, torch.bfloat16),
    (2, 8, 2, 300, 560, 128, True, None, torch.float16),
    (1, 2, 2, 200, 200, 128, False, None, torch.float16),
    (1, 4, 2, 700, 700, 64, True, 150, torch.bfloat16),
    (1, 2, 1, 1023, 1023, 128, True, None, torch.float16),
]


@needs_hopper
@pytest.mark.parametrize("stages,overlap,pingpong", [(2, False, False), (3, False, False), (2, True, False),
                                                     (2, True, True)])
@pytest.mark.parametrize("case", CASES)
def test_ws_forward_matches_reference(case, stages, overlap, pingpong):
    b, h, hkv, sq, skv, d, causal, window, dtype = case
    q, k, v = qkv(b, h, hkv, sq, skv, d, dtype)
    o = torch.full((b, h, sq, d), float("nan"), device=DEVICE, dtype=dtype)
    lse = torch.full((b * h, sq), float("nan"), device=DEVICE)
    AW.forward(q, k, v, causal, 1 / math.sqrt(d), window, o, lse, stages=stages, overlap=overlap, pingpong=pingpong)
    assert rel_err(o, reference(q, k, v, causal, 1 / math.sqrt(d), window)) < TOL[dtype]
    # lse (log2 units) against the reference's
    s = (q.float() @ k.float().repeat_interleave(h // hkv, 1).transpose(-1, -2)) / math.sqrt(d)
    pos = torch.arange(sq, device=DEVICE)[:, None] + skv - sq
    cols = torch.arange(skv, device=DEVICE)[None, :]
    keep = (cols <= pos) if causal else torch.ones_like(cols <= pos)
    if window:
        keep = keep & (cols > pos - window)
    ref_lse = torch.logsumexp(s.masked_fill(~keep, float("-inf")), -1).reshape(b * h, sq) * math.log2(math.e)
    assert torch.allclose(lse, ref_lse, atol=2e-2, rtol=1e-3)


@needs_hopper
def test_ws_forward_takes_strided_heads_and_the_tuner_entry():
    """q, k, v as views of [B, S, H, D] (transformers' layout) are copied to contiguous heads first; the tuner's
    ("ws", ...) configs run the same kernels through `_attn_forward`."""
    b, h, s, d = 2, 4, 333, 128
    q, k, v = (torch.randn(b, s, h, d, device=DEVICE, dtype=torch.float16).transpose(1, 2) for _ in range(3))
    ref = reference(q, k, v, True, 1 / math.sqrt(d))
    o, _ = AW.forward(q, k, v, True, 1 / math.sqrt(d), None)
    assert rel_err(o, ref) < TOL[torch.float16]
    for cfg in (("ws", 2, False, False), ("ws", 2, True, False), ("ws", 2, True, True)):
        o2, _ = A._attn_forward(q, k, v, True, 1 / math.sqrt(d), None, cfg)
        assert rel_err(o2, ref) < TOL[torch.float16], cfg


def test_ws_forward_refuses_other_head_dims_and_pingpong_alone():
    q = torch.zeros(1, 1, 4, 32, dtype=torch.float16)
    with pytest.raises(ValueError, match="head dim 64 or 128"):
        AW.forward(q, q, q, True, 1.0, None)
    with pytest.raises(ValueError, match="overlap=True"):
        AW.forward(q, q, q, True, 1.0, None, pingpong=True)


def test_ws_configs_are_offered_last_and_only_on_hopper(monkeypatch):
    monkeypatch.setattr(A, "interpreting", lambda: False)  # the GPU candidate list
    cfgs = A._fwd_cfgs(128, True, True)
    assert cfgs[-4:] == [("ws", 2, False, False), ("ws", 3, False, False), ("ws", 2, True, False),
                         ("ws", 2, True, True)] and cfgs[0][0] != "ws"
    assert all(c[0] != "ws" for c in A._fwd_cfgs(128, True))
    assert not AW.available(torch.zeros(1, 1, 1, 64))  # never for CPU tensors
    if HOPPER:
        assert AW.available(torch.zeros(1, 1, 1, 64, device="cuda", dtype=torch.bfloat16))
        assert not AW.available(torch.zeros(1, 1, 1, 64, device="cuda"))  # fp32: the Triton kernel's


@pytest.mark.skipif(not W.HAVE_GLUON or not PTXAS.exists(), reason="needs Gluon and the ptxas Triton ships")
@pytest.mark.parametrize("args", [["--head-dim", "64", "--window", "--stages", "3"],
                                  ["--head-dim", "128", "--full", "--stages", "2", "--overlap", "--pingpong"]])
def test_ws_forward_compiles_for_sm90_within_an_sms_shared_memory(args):
    """Head dim 64 with a sliding window, 3 slots; the overlapped form with ping-pong, full attention (the causal
    d=128 forms are in sass_count.py's smoke list)."""
    out = run_script("sass_count.py", "attn-ws", *args)
    shared = int(re.search(r"shared (\d+) B", out).group(1))
    assert 0 < shared <= 227 * 1024
