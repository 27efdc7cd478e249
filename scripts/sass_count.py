"""Compile one effopt kernel config for sm_90 offline (no GPU) and count the SASS of its main loop.

Uses whichever Triton is importable (the device has 3.6; `pip install --target DIR triton==3.6.0`
and PYTHONPATH=DIR gives the same compiler on a CPU machine) and the ptxas / nvdisasm it ships.
Pointer, stride and size arguments get the divisibility-by-16 hint a launch on the benchmark's
shapes gives them, so loads vectorize as they do on the device. Prints registers, shared memory and, for the longest
loop (the backward branch spanning the most instructions), its instruction count and the most
frequent opcodes. Counts are not timings (results/kernels.md has a case where they disagree).

    python scripts/sass_count.py decode --quant --cvt 1 [--qk-int8 1] [--v-t] [--block-n 128 --warps 4 --stages 3]
    python scripts/sass_count.py qmatmul --bits 4 --block-m 16 --block-n 64 --block-kb 64 --split-k 4 \\
        --step 2 --x-split [--ptx] [--zero-in-tile] [--bf16] [--v2]
    python scripts/sass_count.py gemv2 --block-m 1 --split-k 4 --step 4 --stages 1   # decode GEMV (M = 1)
    python scripts/sass_count.py swz --block-m 16 --split-k 4 --step 4 --ptx   # W4 over shuffle_w4 codes
    python scripts/sass_count.py wg --block-n 64 --block-m 128 --stages 6 [--ws]   # the Gluon wgmma W4 kernels
    python scripts/sass_count.py ms --block-n 128 --block-m 16 --step 2 --split-k 4   # Gluon mma.sync, M <= 64
    python scripts/sass_count.py ms --ws --block-n 128 --warps 4 --step 4 --stages 3 --maxnreg 128   # fed by TMA
        (--dump FILE writes the whole SASS; --x-split: x arrives pre-permuted)
    python scripts/sass_count.py candidates   # compile every mma config the tuner may try (~15 min)
    python scripts/sass_count.py ms --ws --wgmma --block-m 128 --block-n 64 --step 2 --stages 3   # on wgmma
        (--natural: x read as it lies, the codes converted in natural K order)
    python scripts/sass_count.py attn-ws [--head-dim 64] [--stages 3] [--full] [--window] [--overlap [--pingpong]]
    python scripts/sass_count.py rope-store [--quant] [--bf16]   # the fused RoPE + KV-cache write
    python scripts/sass_count.py smoke   # one config of every kernel variant compiles (CI runs it)
"""
import argparse
import collections
import dataclasses
import inspect
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from kernels import attention as A  # noqa: E402
from kernels import attention_ws as AW  # noqa: E402
from kernels import fused as F  # noqa: E402
from kernels import int8_matmul as I  # noqa: E402
from kernels import qmatmul as Q  # noqa: E402
from kernels import qmatmul_mma as MS  # noqa: E402
from kernels import qmatmul_wgmma as WG  # noqa: E402
from kernels._tune import mma_sync  # noqa: E402

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def compile_sm90(fn, const: dict, ptrs: dict, floats=(), multiples=(), warps=4, stages=3, maxnreg=None, pdl=False):
    """triton.compile for sm_90a: constexprs `const`, pointer types `ptrs`, other args i32 (or fp32
    for `floats`); pointers, strides and the integer args in `multiples` are hinted divisible by 16,
    as a launch with such values specializes them. Gluon kernels compile through their own source
    class (num_stages means nothing to them)."""
    names = list(inspect.signature(fn.fn).parameters)
    sig = {n: "constexpr" if n in const else ptrs.get(n, "fp32" if n in floats else "i32") for n in names}
    hints = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if n not in const and (n in ptrs or n.startswith("stride") or n in multiples)}
    source = ASTSource
    if getattr(fn, "is_gluon", lambda: False)():
        from triton.experimental.gluon._runtime import GluonASTSource as source
    src = source(fn, sig, constexprs={(names.index(k),): v for k, v in const.items()}, attrs=hints)
    opts = dict(num_warps=warps, num_stages=stages, **({"maxnreg": maxnreg} if maxnreg else {}),
                **({"launch_pdl": True} if pdl else {}))
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)


def compile_wgmma(block_n=64, block_m=128, warps=4, stages=6, split_k=1, bf16=False, specialized=False):
    """`kernels.qmatmul_wgmma._w4_wgmma[_ws]_kernel` for sm_90 (W4 g128), as `launch` specializes it."""
    act = "*bf16" if bf16 else "*fp16"
    const = dict(GROUP=128, OFFSET=128.0 if bf16 else 1024.0,
                 LO_ASM=(Q._PTX_BF16_LO4 if bf16 else Q._PTX_F16_LO4).value,
                 HI_ASM=(Q._PTX_BF16_HI4 if bf16 else Q._PTX_F16_HI4).value, HAS_BIAS=False, BLOCK_N=block_n,
                 BLOCK_M=block_m, SPLIT_K=split_k, STAGES=stages,
                 **(WG.ws_layouts if specialized else WG.layouts)(block_n, block_m, warps))
    ptrs = dict(x_ptr=act, qw_ptr="*u8", s_ptr=act, z_ptr=act, bias_ptr=act, out_ptr=act, ws_ptr="*fp32",
                lock_ptr="*i32")
    kernel = WG._w4_wgmma_ws_kernel if specialized else WG._w4_wgmma_kernel
    return compile_sm90(kernel, const, ptrs, (), ("N", "K"), warps, stages)


def compile_mma_sync(block_n=128, block_m=16, warps=4, step=2, split_k=4, bf16=False, scale_in_tile=False, stages=2,
                     gather=None):
    """`kernels.qmatmul_mma._w4_mma_sync_kernel` for sm_90 (W4 g128), as `launch` specializes it. Its two
    `convert_layout(..., assert_trivial=True)` make the compile fail if a code or x value would have to move."""
    act = "*bf16" if bf16 else "*fp16"
    const = dict(GROUP=128, F16=not bf16,
                 HAS_BIAS=False, BLOCK_N=block_n, BLOCK_M=block_m, SPLIT_K=split_k, STEP=step,
                 X_PERMUTED=block_m >= MS.X_GATHER_MIN_M if gather is None else gather,
                 SCALE_IN_TILE=scale_in_tile, PREFETCH=stages >= 2,
                 **MS.layouts(block_n, block_m, warps))
    ptrs = dict(x_ptr=act, qw_ptr="*i32", s_ptr=act, z_ptr=act, bias_ptr=act, out_ptr=act, ws_ptr="*fp32",
                lock_ptr="*i32")
    return compile_sm90(MS._w4_mma_sync_kernel, const, ptrs, (), ("N", "K"), warps, 1)


def compile_mma_sync_ws(block_n=64, block_m=16, warps=4, step=4, split_k=4, stages=3, bf16=False,
                        scale_in_tile=False, maxnreg=None, halves=1, wgmma=False, natural=False, pdl=0):
    """`kernels.qmatmul_mma._w4_mma_sync_ws_kernel` (bulk copies by a producer warp) for sm_90, W4 g128, with
    the descriptors' block shapes and shared layouts `qmatmul_mma.ws_descriptors` gives them."""
    dt = "bf16" if bf16 else "fp16"
    act = "*" + dt
    lay = MS.layouts(block_n, block_m, warps, wgmma, natural)
    smem = MS.ws_shared_layouts(step)
    const = dict(GROUP=128, F16=not bf16, HAS_BIAS=False, BLOCK_N=block_n, BLOCK_M=block_m, SPLIT_K=split_k,
                 STEP=step, STAGES=stages, HALVES=halves,
                 HALF_REGS=MS.ws_half_regs(maxnreg or 128) if halves == 2 else 0,
                 X_PERMUTED=MS.X_NATURAL if natural else MS.X_WGMMA if wgmma else block_m >= MS.X_GATHER_MIN_M,
                 SCALE_IN_TILE=scale_in_tile or wgmma,
                 W_L=lay["W_L"], X_L=lay["X_L"], MMA_L=lay["MMA_L"], OUT_L=lay["OUT_L"], C_L=lay.get("C_L"), PDL=pdl)
    ptrs = dict(x_desc=f"tensordesc<{dt}[{block_m}, 64],{smem['x']!r}>",
                q_desc=f"tensordesc<i32[{block_n}, {8 * step}],{smem['codes']!r}>",
                s_desc=f"tensordesc<{dt}[1, {block_n}],{smem['scales']!r}>",
                z_desc=f"tensordesc<{dt}[1, {block_n}],{smem['scales']!r}>",
                bias_ptr=act, out_ptr=act, ws_ptr="*fp32", lock_ptr="*i32")
    return compile_sm90(MS._w4_mma_sync_ws_kernel, const, ptrs, (), ("N", "K"), warps, 1, maxnreg, bool(pdl))


def compile_attn_ws(head_dim=128, stages=2, causal=True, window=False, bf16=False, overlap=False, pingpong=False):
    """`kernels.attention_ws._attn_fwd_ws_kernel` (the warp-specialized Gluon attention forward; overlap: its
    `_attn_fwd_ws_overlap_kernel` form, pingpong: with its warpgroups taking turns) for sm_90, with the
    descriptors' block shapes and the launch's register cap."""
    dt = "bf16" if bf16 else "fp16"
    lay = AW.smem_layout()
    warps = 4 if overlap else AW.WARPS
    const = dict(HEAD_DIM=head_dim, BLOCK_M=AW.BLOCK_M, BLOCK_N=AW.BLOCK_N, STAGES=stages, CAUSAL=causal,
                 HAS_WINDOW=window, **(dict(PINGPONG=pingpong) if overlap else {}), **AW.layouts(head_dim, warps))
    ptrs = dict(q_desc=f"tensordesc<{dt}[{AW.BLOCK_M}, {head_dim}],{lay!r}>",
                k_desc=f"tensordesc<{dt}[{AW.BLOCK_N}, {head_dim}],{lay!r}>",
                v_desc=f"tensordesc<{dt}[{AW.BLOCK_N}, {head_dim}],{lay!r}>", o_ptr="*" + dt, lse_ptr="*fp32")
    kernel = AW._attn_fwd_ws_overlap_kernel if overlap else AW._attn_fwd_ws_kernel
    return compile_sm90(kernel, const, ptrs, ("qk_scale",), (), warps, 1, AW.LAUNCH_REGS)


def loop_histogram(sass: str):
    """(instructions, Counter of opcodes) of the longest backward-branch loop in nvdisasm output."""
    lines = sass.splitlines()
    labels = {ln.rstrip(":"): i for i, ln in enumerate(lines) if re.match(r"^\.L_x_\d+:", ln)}
    loops = [(i - labels[m.group(1)], labels[m.group(1)], i) for i, ln in enumerate(lines)
             if (m := re.search(r"BRA `\((\.L_x_\d+)\)", ln)) and labels.get(m.group(1), i) < i]
    if not loops:
        return 0, collections.Counter()
    _, start, end = max(loops)
    ops = collections.Counter(m.group(1) for ln in lines[start:end + 1]
                              if (m := re.match(r"\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+ )?([A-Z0-9_.]+)", ln)))
    return sum(ops.values()), ops


def disassemble(kernel, tool: str = "nvdisasm") -> str:
    """The compiled kernel's SASS (nvdisasm) or resource usage (tool "cuobjdump")."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        args = ["-res-usage"] if tool == "cuobjdump" else []
        return subprocess.run([os.path.join(BIN, tool), *args, f.name], capture_output=True, text=True).stdout


def report(kernel, top: int, dump: str = None):
    usage, sass = disassemble(kernel, "cuobjdump"), disassemble(kernel)
    if dump:  # the whole SASS, to read the loop's instructions in order
        with open(dump, "w") as f:
            f.write(sass)
    regs = re.search(r"REG:(\d+)", usage)
    count, ops = loop_histogram(sass)
    print(f"triton {triton.__version__} | registers {regs.group(1) if regs else '?'} | "
          f"shared {kernel.metadata.shared} B | main loop {count} instructions")
    print("  " + "  ".join(f"{op} {n}" for op, n in ops.most_common(top)))


def compile_candidates():
    """Compile every `_qmm_kernel` config `candidates()` offers (PTX copies included) for the bench's
    weight kinds, M = 1-1024 and fp16 / bf16; print the count and any failure. A config that fails to
    compile on the device's Triton would break the tuner there, which catches only OutOfResources."""
    seen, failed = set(), []
    for bits, group in ((4, 128), (8, -1), (4, 32), (2, 64)):
        for dtype, act in ((torch.float16, "*fp16"), (torch.bfloat16, "*bf16")):
            k = 4096
            groups = k // (k if group < 0 else group)
            w = Q.prepare_weight(torch.zeros(64, k * bits // 8, dtype=torch.uint8), torch.ones(64, groups, dtype=dtype),
                                 torch.zeros(64, groups, dtype=dtype), bits, group, k)
            dq = Q._dq_mode(dtype, bits)
            for m in (1, 16, 64, 128, 1024):
                cfgs = [c for c in Q.candidates(m, w, dtype) if c.kind == "mma"]
                cfgs += [dataclasses.replace(c, ptx=True) for c in cfgs] if (bits, dq) in Q.PTX_OK else []
                for c in cfgs:
                    mode = Q._group_mode(w, c.block_kb)
                    const = dict(BITS=bits, GROUP_MODE=mode, DQ=dq, POST_ZERO=c.post_zero and mode != 0,
                                 X_SPLIT=c.x_split and bits == 4, HAS_BIAS=False, UPCAST=False, BLOCK_M=c.block_m,
                                 BLOCK_N=c.block_n, BLOCK_KB=c.block_kb, SPLIT_K=c.split_k,
                                 STEP_BLOCKS=c.step_blocks, PTX=c.ptx, ZERO_IN_TILE=c.zero_in_tile)
                    key = (tuple(sorted(const.items())), c.warps, c.stages, act)
                    if key in seen:
                        continue
                    seen.add(key)
                    ptrs = dict(x_ptr=act, qw_ptr="*u8", s_ptr=act, z_ptr=act, bias_ptr=act, out_ptr=act,
                                ws_ptr="*fp32", lock_ptr="*i32")
                    try:
                        compile_sm90(Q._qmm_kernel, const, ptrs, (), ("N", "K", "KB", "GROUP"), c.warps, c.stages)
                    except Exception as e:  # noqa: BLE001 - report every failing config
                        failed.append((bits, group, dtype, m, c, str(e).splitlines()[-1][:160]))
    print(f"triton {triton.__version__}: {len(seen) - len(failed)} of {len(seen)} mma configs compile for sm_90")
    for f in failed:
        print("  FAILED", *f)


def _check_pdl(kernel):
    """A kernel built for a programmatic dependent launch: the launch flag set, both griddepcontrol forms in it."""
    ptx = kernel.asm["ptx"]
    if not kernel.metadata.launch_pdl or "griddepcontrol.wait" not in ptx or "launch_dependents" not in ptx:
        raise RuntimeError("no dependent launch: launch_pdl unset or griddepcontrol missing from the PTX")


def compile_smoke():
    """Compile one config of each kernel variant the GPU path launches (sm_90); exit 1 on any failure.

    The interpreter runs kernels without Triton's type checks, so a kernel can pass every CPU test and
    still fail to compile (a name bound to two dtypes in two branches did, 2026-11-30):
    tests/kernels/test_compile_sm90.py runs this on CI, with whatever Triton is installed."""
    dec = dict(HEAD_DIM=128, BLOCK_D=128, BLOCK_R=16, BLOCK_N=128, UPCAST=False, FUSED_MERGE=True, CVT=1,
               QK_INT8=False, MERGE_R=4, MERGE_CHUNK=A.MERGE_CHUNK, PDL=0)
    dec_ptrs = dict(Q="*bf16", KS="*fp32", VS="*fp32", O_PART="*fp32", LSE_PART="*fp32", LENS="*i32", OUT="*bf16",
                    LOCK="*i32")
    attn = dict(HEAD_DIM=128, BLOCK_D=128, BLOCK_M=128, BLOCK_N=128, CAUSAL=True, HAS_WINDOW=False, UPCAST=False)
    attn_ptrs = dict(Q="*bf16", K="*bf16", V="*bf16", O="*bf16", LSE="*fp32")
    rope_ptrs = dict(x_ptr="*bf16", cos_ptr="*bf16", sin_ptr="*bf16", pos_ptr="*i64", q_ptr="*bf16")
    qmm_ptrs = dict(x_ptr="*fp16", qw_ptr="*u8", s_ptr="*fp16", z_ptr="*fp16", bias_ptr="*fp16", out_ptr="*fp16",
                    ws_ptr="*fp32", lock_ptr="*i32")
    gemv2 = dict(GROUP=128, BITS=4, GROUP_MODE=1, FLUSH=4, GPOW=128, MASK_K=False, HAS_BIAS=False, BLOCK_M=1,
                 BLOCK_N=64, STEP=2, SPLIT_K=4, STAGES=1)
    gemv2_ptrs = dict(qmm_ptrs, qw_ptr="*i32")
    cases = {
        "decode bf16": (A._decode_split, dict(dec, QUANT=False, V_T=False), dict(dec_ptrs, K="*bf16", V="*bf16")),
        "decode int8": (A._decode_split, dict(dec, QUANT=True, V_T=False), dict(dec_ptrs, K="*i8", V="*i8")),
        "decode int8, V [D, S]": (A._decode_split, dict(dec, QUANT=True, V_T=True), dict(dec_ptrs, K="*i8", V="*i8")),
        "decode bf16, dependent launches (PDL 2)": (A._decode_split, dict(dec, QUANT=False, V_T=False, PDL=2),
                                                    dict(dec_ptrs, K="*bf16", V="*bf16")),
        "decode merge, dependent launch": (A._decode_merge, dict(HEAD_DIM=128, BLOCK_D=128, ROWS=4, CHUNK=8, PDL=True),
                                           dict(O_PART="*fp32", LSE_PART="*fp32", OUT="*bf16")),
        "attention forward": (A._attn_fwd, dict(attn, TMA=False), attn_ptrs),
        "attention forward, TMA": (A._attn_fwd, dict(attn, TMA=True), attn_ptrs),
        "rope + KV store": (F._rope_store_kv_kernel, dict(D=128, HALF=64, INT8=False),
                            dict(rope_ptrs, k_ptr="*bf16", v_ptr="*bf16", ks_ptr="*bf16", vs_ptr="*bf16")),
        "rope + KV store, int8": (F._rope_store_kv_kernel, dict(D=128, HALF=64, INT8=True),
                                  dict(rope_ptrs, k_ptr="*i8", v_ptr="*i8", ks_ptr="*fp32", vs_ptr="*fp32")),
        "W4 matmul, M=16 pick": (Q._qmm_kernel, dict(BITS=4, GROUP_MODE=1, DQ=1, POST_ZERO=True, X_SPLIT=True,
                                                     HAS_BIAS=False, UPCAST=False, BLOCK_M=16, BLOCK_N=64,
                                                     BLOCK_KB=64, SPLIT_K=4, STEP_BLOCKS=2, PTX=True,
                                                     ZERO_IN_TILE=True), qmm_ptrs),
        "W4 matmul, M=16 pick, mma.sync": (Q._qmm_kernel, dict(BITS=4, GROUP_MODE=1, DQ=1, POST_ZERO=True,
                                                               X_SPLIT=True, HAS_BIAS=False, UPCAST=False,
                                                               BLOCK_M=16, BLOCK_N=64, BLOCK_KB=64, SPLIT_K=4,
                                                               STEP_BLOCKS=2, PTX=True, ZERO_IN_TILE=True,
                                                               MMA_V2=True), qmm_ptrs),
        "W4 matmul, xw M=128 pick": (Q._qmm_xw_kernel, dict(BITS=4, GROUP_MODE=1, DQ=1, POST_ZERO=False,
                                                            HAS_BIAS=False, UPCAST=False, BLOCK_M=128,
                                                            BLOCK_N=128, BLOCK_KB=64, SPLIT_K=2), qmm_ptrs),
        "W4 gemv2, M=1": (Q._gemv2_kernel, gemv2, gemv2_ptrs),
        "W4 matmul, shuffled codes": (Q._qmm_swz_kernel, dict(GROUP=128, GROUP_MODE=1, DQ=1, HAS_BIAS=False,
                                                              UPCAST=False, PTX=True, BLOCK_M=16, BLOCK_N=64, SPLIT_K=4,
                                                              STEP=2, SCALE_IN_TILE=False),
                                      dict(qmm_ptrs, qs_ptr="*i32")),
        "W8A8 matmul": (I._w8a8_kernel, dict(W_U8=False, SWAP=False, EVEN_K=True, HAS_BIAS=False, BLOCK_M=128,
                                             BLOCK_N=128, BLOCK_K=128, GROUP_M=8),
                        dict(x_ptr="*i8", xs_ptr="*fp32", w_ptr="*i8", ws_ptr="*fp32", bias_ptr="*fp16",
                             out_ptr="*fp16")),
        "attention backward dQ": (A._attn_bwd_dq, dict(attn, BLOCK_M=64, BLOCK_N=64),
                                  dict(attn_ptrs, DO="*bf16", DELTA="*fp32", DQ="*bf16")),
    }
    if WG.HAVE_GLUON:
        cases["W4 matmul, Gluon wgmma"] = dict(split_k=2)
        cases["W4 matmul, Gluon wgmma, warp-specialized"] = dict(split_k=2, specialized=True, stages=4)
        cases["W4 matmul, Gluon mma.sync, M=16"] = compile_mma_sync
        cases["W4 matmul, Gluon mma.sync, M=64"] = lambda: compile_mma_sync(64, 64, scale_in_tile=True)
        cases["W4 matmul, Gluon mma.sync, warp-specialized"] = lambda: compile_mma_sync_ws(128, 16, 4, 4, 4, 3,
                                                                                           maxnreg=128)
        cases["W4 matmul, Gluon mma.sync, warp-specialized, two halves"] = lambda: compile_mma_sync_ws(
            64, 16, 4, 4, 1, 4, maxnreg=168, halves=2)
        cases["W4 matmul, Gluon mma.sync, two halves, dependent launch (weights first)"] = lambda: _check_pdl(
            compile_mma_sync_ws(64, 8, 4, 4, 1, 3, maxnreg=168, halves=2, pdl=2))
        cases["W4 matmul, Gluon warp-specialized, wgmma"] = lambda: compile_mma_sync_ws(
            64, 128, 4, 2, 1, 3, scale_in_tile=True, maxnreg=128, wgmma=True)
        cases["W4 matmul, Gluon warp-specialized, wgmma, x as it lies"] = lambda: compile_mma_sync_ws(
            128, 256, 8, 2, 1, 3, scale_in_tile=True, maxnreg=168, wgmma=True, natural=True)
        cases["attention forward, Gluon warp-specialized"] = lambda: compile_attn_ws(128, 2, True, False, True)
        cases["attention forward, Gluon warp-specialized, overlapped"] = lambda: compile_attn_ws(
            128, 2, True, False, True, overlap=True)
        cases["attention forward, Gluon warp-specialized, overlapped, ping-pong"] = lambda: compile_attn_ws(
            128, 2, True, False, True, overlap=True, pingpong=True)
    failed = 0
    for name, case in cases.items():
        try:
            if callable(case):
                case()
                print(f"ok      {name}")
                continue
            if isinstance(case, dict):
                compile_wgmma(**case)
                print(f"ok      {name}")
                continue
            fn, const, ptrs = case
            with mma_sync(const.get("MMA_V2", False)):
                kernel = compile_sm90(fn, const, ptrs, ("qk_scale", "sm_scale"), ("SPLIT_LEN", "N", "K", "KB", "GROUP"),
                                      8 if const.get("BLOCK_M", 0) >= 128 else 4, 3)
            if const.get("MMA_V2"):  # the switch took: mma.sync (HMMA), no wgmma (HGMMA)
                sass = disassemble(kernel)
                if "HMMA" not in sass or "HGMMA" in sass:
                    raise RuntimeError("DISABLE_MMA_V3 did not give mma.sync")
            print(f"ok      {name}")
        except Exception as e:  # noqa: BLE001 - report every failing kernel
            failed += 1
            print(f"FAILED  {name}: {str(e).splitlines()[-1][:300]}")
    print(f"triton {triton.__version__}: {len(cases) - failed} of {len(cases)} kernels compile for sm_90")
    sys.exit(1 if failed else 0)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("kernel", choices=["decode", "qmatmul", "gemv2", "swz", "wg", "ms", "attn-ws", "candidates",
                                       "rope-store", "smoke"])
    ap.add_argument("--warps", type=int, default=4)
    ap.add_argument("--stages", type=int, default=3)
    ap.add_argument("--top", type=int, default=14)
    ap.add_argument("--block-n", type=int, default=None)
    # decode
    ap.add_argument("--quant", action="store_true", help="decode, rope-store: int8 cache")
    ap.add_argument("--v-t", action="store_true", help="decode: int8 V stored [D, S] per head")
    ap.add_argument("--cvt", type=int, default=A.INT8_CONVERT, help="decode: int8 conversion mode")
    ap.add_argument("--qk-int8", type=int, default=0, help="decode: q as int8 in 1 or 2 slices (qk_int8)")
    ap.add_argument("--fused", action="store_true", help="decode: the merge fused into the split kernel")
    ap.add_argument("--pdl", type=int, default=0, help="decode, ms --ws: dependent-launch mode (0, 1, 2)")
    ap.add_argument("--group-rows", type=int, default=16, help="decode: MMA rows (GQA group x tokens, >= 16)")
    # qmatmul
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-mode", type=int, default=1)
    ap.add_argument("--block-m", type=int, default=16)
    ap.add_argument("--block-kb", type=int, default=64)
    ap.add_argument("--split-k", type=int, default=1)
    ap.add_argument("--step", type=int, default=1)
    ap.add_argument("--x-split", action="store_true")
    ap.add_argument("--pre", action="store_true", help="qmatmul, swz, ms: scale (and zero) in the tile (post_zero off)")
    ap.add_argument("--ptx", action="store_true")
    ap.add_argument("--zero-in-tile", action="store_true")
    ap.add_argument("--bf16", action="store_true", help="activations in bf16 (default fp16)")
    ap.add_argument("--v2", action="store_true", help="qmatmul: tl.dot as mma.sync, not wgmma (mma_sync)")
    ap.add_argument("--ws", action="store_true", help="wg, ms: the warp-specialized kernel")
    ap.add_argument("--dump", default=None, help="write the whole SASS to this file")
    ap.add_argument("--maxnreg", type=int, default=None, help="ms --ws: ptxas's register cap")
    ap.add_argument("--halves", type=int, default=1, help="ms --ws: 2 = each program's K range in two halves")
    ap.add_argument("--head-dim", type=int, default=128, help="attn-ws: 64 or 128")
    ap.add_argument("--full", action="store_true", help="attn-ws: no causal mask")
    ap.add_argument("--window", action="store_true", help="attn-ws: a sliding window")
    ap.add_argument("--overlap", action="store_true", help="attn-ws: the overlapped two-partition form")
    ap.add_argument("--pingpong", action="store_true", help="attn-ws --overlap: warpgroups take turns at the MMAs")
    ap.add_argument("--wgmma", action="store_true", help="ms --ws: the block MMAs on wgmma, x read from shared memory")
    ap.add_argument("--natural", action="store_true", help="ms --ws --wgmma: x as it lies, codes in natural order")
    a = ap.parse_args()
    if a.kernel == "candidates":
        return compile_candidates()
    if a.kernel == "smoke":
        return compile_smoke()
    if a.kernel == "ms" and a.ws:  # its warp-specialized form, --stages ring slots
        return report(compile_mma_sync_ws(a.block_n or 64, a.block_m, a.warps, a.step, a.split_k, a.stages, a.bf16,
                                          a.pre, a.maxnreg, a.halves, a.wgmma, a.natural, a.pdl), a.top, a.dump)
    if a.kernel == "attn-ws":  # the warp-specialized Gluon attention forward, causal unless --full
        return report(compile_attn_ws(a.head_dim, a.stages, not a.full, a.window, a.bf16, a.overlap,
                                      a.pingpong), a.top, a.dump)
    if a.kernel == "ms":  # the Gluon mma.sync kernel: --block-n rows, --block-m tokens, --step blocks a trip
        kernel = compile_mma_sync(a.block_n or 128, a.block_m, a.warps, a.step, a.split_k, a.bf16, a.pre, a.stages,
                                  a.x_split or None)
        return report(kernel, a.top, a.dump)
    if a.kernel == "wg":  # the Gluon wgmma kernel: --block-n rows, --block-m tokens
        return report(compile_wgmma(a.block_n or 64, a.block_m, a.warps, a.stages, a.split_k, a.bf16, a.ws), a.top)
    if a.kernel == "rope-store":  # kernels.fused.rope_store_kv, float or int8 caches (--quant), head dim 128
        act = "*bf16" if a.bf16 else "*fp16"
        cache, scales = ("*i8", "*fp32") if a.quant else (act, act)
        ptrs = dict(x_ptr=act, cos_ptr=act, sin_ptr=act, pos_ptr="*i64", q_ptr=act, k_ptr=cache, v_ptr=cache,
                    ks_ptr=scales, vs_ptr=scales)
        return report(compile_sm90(F._rope_store_kv_kernel, dict(D=128, HALF=64, INT8=a.quant), ptrs, (), (),
                                   a.warps, a.stages), a.top)
    if a.kernel == "decode":
        cache = "*i8" if a.quant else "*bf16"
        const = dict(HEAD_DIM=128, BLOCK_D=128, BLOCK_R=a.group_rows, BLOCK_N=a.block_n or 128, QUANT=a.quant,
                     UPCAST=False, FUSED_MERGE=a.fused, CVT=a.cvt, QK_INT8=a.qk_int8, V_T=a.v_t,
                     MERGE_R=4, MERGE_CHUNK=A.MERGE_CHUNK, PDL=a.pdl)
        ptrs = dict(Q="*bf16", K=cache, V=cache, KS="*fp32", VS="*fp32", O_PART="*fp32", LSE_PART="*fp32",
                    LENS="*i32", OUT="*bf16", LOCK="*i32")
        kernel = compile_sm90(A._decode_split, const, ptrs, ("qk_scale",), ("SPLIT_LEN",), a.warps, a.stages)
    elif a.kernel == "gemv2":  # the CUDA-core decode GEMV over pack_words codes, W4 g128 (the M = 1 pick)
        act = "*bf16" if a.bf16 else "*fp16"
        const = dict(GROUP=128, BITS=4, GROUP_MODE=1, FLUSH=4, GPOW=128, MASK_K=False, HAS_BIAS=False,
                     BLOCK_M=a.block_m, BLOCK_N=a.block_n or 64, STEP=a.step, SPLIT_K=a.split_k, STAGES=a.stages)
        ptrs = dict(x_ptr=act, qw_ptr="*i32", s_ptr=act, z_ptr=act, bias_ptr=act, out_ptr=act,
                    ws_ptr="*fp32", lock_ptr="*i32")
        kernel = compile_sm90(Q._gemv2_kernel, const, ptrs, (), ("N", "K", "R"), a.warps, 1)
    elif a.kernel == "swz":  # W4 over shuffled codes, groups of 128 (--group-mode 2: per channel)
        act = "*bf16" if a.bf16 else "*fp16"
        const = dict(GROUP=128 if a.group_mode == 1 else 1, GROUP_MODE=a.group_mode, DQ=2 if a.bf16 else 1,
                     HAS_BIAS=False, UPCAST=False, PTX=a.ptx, BLOCK_M=a.block_m, BLOCK_N=64, SPLIT_K=a.split_k,
                     STEP=a.step, SCALE_IN_TILE=a.pre)
        ptrs = dict(x_ptr=act, qs_ptr="*i32", s_ptr=act, z_ptr=act, bias_ptr=act, out_ptr=act, ws_ptr="*fp32",
                    lock_ptr="*i32")
        kernel = compile_sm90(Q._qmm_swz_kernel, const, ptrs, (), ("N", "K"), a.warps, a.stages)
    else:
        act = "*bf16" if a.bf16 else "*fp16"
        dq = Q._dq_mode(torch.bfloat16 if a.bf16 else torch.float16, a.bits)
        const = dict(BITS=a.bits, GROUP_MODE=a.group_mode, DQ=dq, POST_ZERO=not a.pre, X_SPLIT=a.x_split,
                     HAS_BIAS=False, UPCAST=False, BLOCK_M=a.block_m, BLOCK_N=a.block_n or 64,
                     BLOCK_KB=a.block_kb, SPLIT_K=a.split_k, STEP_BLOCKS=a.step, PTX=a.ptx,
                     ZERO_IN_TILE=a.zero_in_tile, MMA_V2=a.v2)
        ptrs = dict(x_ptr=act, qw_ptr="*u8", s_ptr=act, z_ptr=act, bias_ptr=act, out_ptr=act, ws_ptr="*fp32",
                    lock_ptr="*i32")
        with mma_sync(a.v2):
            kernel = compile_sm90(Q._qmm_kernel, const, ptrs, (), ("N", "K", "KB", "GROUP"), a.warps, a.stages)
    report(kernel, a.top)


if __name__ == "__main__":
    main()
