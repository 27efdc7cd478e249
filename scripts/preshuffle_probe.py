"""Probe for a Marlin-style pre-shuffled 4-bit layout: does Triton feed the MMA from it without shuffles?

A 64-row tile of 4-bit weights is the A operand of the MMA (as in `_qmm_kernel`, out^T = W x^T). In that
operand a thread holds rows g and g + 8 and the k pairs 2c, 2c + 1, 2c + 8, 2c + 9 of every 16-wide k
tile, which are not adjacent in a row-major tile: today's kernel reads them from shared memory two bytes at
a time and re-packs them with PRMTs. Here the codes are in `kernels.qmatmul.shuffle_w4`'s order (each
64-k block of a row 8 int32 words, word (c, wd) holding in its nibble 4a + 16b the code of
k = 8 (2 wd + a) + 2c + b): a thread's 32 codes are two 8-byte runs, one LOP3 turns a shifted word into a
half2 of two codes in MMA order, and a `trans` + `join` (a chain Triton 3.6 carries the operand layout
back through) restores the k order, so x is read as is. `_qmm_swz_kernel` is built on it.

    python scripts/preshuffle_probe.py             # sm_90 SASS of the probe's loop, per variant (no GPU)
    TRITON_INTERPRET=1 python scripts/preshuffle_probe.py   # exactness of the layout (CPU)

Needs a Triton whose compiler targets sm_90 (the device's 3.6: `pip install --target DIR triton==3.6.0`).
"""
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from kernels.qmatmul import _swz_pair, shuffle_w4  # noqa: E402 (the layout _qmm_swz_kernel reads)


@triton.jit
def _probe(w_ptr, x_ptr, o_ptr, K, stride_xm, BLOCK_M: tl.constexpr, SHUFFLED: tl.constexpr, PTX: tl.constexpr):
    """o[64, BLOCK_M] = codes[64, K] @ x[BLOCK_M, K]^T, codes shuffled (int32 words) or plain (bytes, 2 a byte)."""
    rows = tl.arange(0, 64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, 64)
    acc = tl.zeros((64, BLOCK_M), tl.float32)
    for kb in range(0, K // 64):
        if SHUFFLED:
            cc, ww, sh = tl.arange(0, 4), tl.arange(0, 2), 4 * tl.arange(0, 4)
            words = tl.load(w_ptr + rows[:, None, None] * (K // 8) + kb * 8 + cc[None, :, None] * 2 + ww[None, None, :])
            lo, hi = _swz_pair(words[:, :, :, None] >> sh[None, None, None, :], 1, PTX)  # [64, c, wd, a] each
            lo = tl.trans(lo.reshape(64, 4, 8), 0, 2, 1)  # [64, (wd, a), c]
            hi = tl.trans(hi.reshape(64, 4, 8), 0, 2, 1)
            w = tl.join(lo, hi).reshape(64, 64)  # k = 8 (wd, a) + 2 c + b
        else:
            byts = tl.load(w_ptr.to(tl.pointer_type(tl.uint8)) + rows[:, None] * (K // 2) + kb * 32
                           + tl.arange(0, 32)[None, :])
            w = tl.join((byts & 0xF).to(tl.int16), (byts >> 4).to(tl.int16)).reshape(64, 64)
            w = (w | 0x6400).to(tl.float16, bitcast=True)
        xt = tl.load(x_ptr + offs_m[None, :] * stride_xm + kb * 64 + offs_k[:, None])
        acc = tl.dot(w - 1024.0, xt, acc)
    tl.store(o_ptr + rows[:, None] * BLOCK_M + offs_m[None, :], acc)


def check_on_cpu():
    torch.manual_seed(0)
    n, k, m = 64, 192, 16
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    x = torch.randn(m, k).half()
    ref = codes.float() @ x.float().t()
    plain = (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()
    for shuffled, w in ((True, shuffle_w4(plain, k)), (False, plain)):
        out = torch.full((n, m), float("nan"))
        _probe[(1,)](w, x, out, k, x.stride(0), BLOCK_M=m, SHUFFLED=shuffled, PTX=False)
        err = (out - ref).abs().max().item()
        print(f"{'shuffled' if shuffled else 'plain'}: max abs error {err:.2e}")
        assert err < 1e-3


def sass_counts():
    import sass_count as S

    print(f"triton {triton.__version__}, sm_90, 4 warps, 3 stages, M = 16 (per thread a trip: 32 codes)")
    ptrs = dict(w_ptr="*i32", x_ptr="*fp16", o_ptr="*fp32")
    for name, shuffled, ptx in (("plain bytes", False, False), ("shuffled", True, False),
                                ("shuffled + LOP3", True, True)):
        kernel = S.compile_sm90(_probe, dict(BLOCK_M=16, SHUFFLED=shuffled, PTX=ptx), ptrs, (), ("K",), 4, 3)
        sass = S.disassemble(kernel)
        count, ops = S.loop_histogram(sass)
        keep = ("LDS", "STS", "BAR", "PRMT", "LOP3", "SHF", "HADD2", "HGMMA")
        print(f"{name:16s} loop {count:3d} instructions: "
              + "  ".join(f"{op} {n}" for op, n in sorted(ops.items()) if op.startswith(keep)))


if __name__ == "__main__":
    check_on_cpu() if os.environ.get("TRITON_INTERPRET") == "1" else sass_counts()
