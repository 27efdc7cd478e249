"""W4A16 matmul for a few tokens (M <= 64) on mma.sync, and for any number on wgmma (below), written in Gluon: the
codes go from global memory straight into the MMA's register operand, with no byte permutes on their way.

Why: at 16 tokens `qmatmul._qmm_kernel` spends its time issuing instructions. Its sm_90 SASS (mma.sync
build) has 3.75 instructions per 4-bit code. The largest group, 138 of 480 a trip, is PRMT byte permutes,
plus shared-memory reads. They put each code where the MMA operand layout wants it (results/kernels.md).
Here the K order is chosen so that no code has to move:

  * A thread of an m16n8k16 MMA holds, per 16-wide k tile, the k pairs 2c, 2c + 1 and 2c + 8, 2c + 9 of
    rows g and g + 8 (lane = 4g + c). Any permutation of K applied to both operands gives the same
    product, so the kernel lets lane c of a quad own the real codes 16c .. 16c + 15 of every 64-code
    block. In the plain packed layout those are 8 adjacent bytes: one 8-byte load a row, no shuffled copy.
  * One LOP3 (`_pair_asm`) turns a word into a pair of codes as two 16-bit floats OFFSET + q: the low
    nibbles of a byte pair after `& 0x000f000f`, and, in fp16, the high ones in place as 1024 + 16 q
    (`& 0x00f000f0`), so one shift by 8 serves a word's 4 pairs: real codes (0, 4), (2, 6), (1, 5),
    (3, 7) of the word's 8 (bf16 has 7 mantissa bits: shifts by 4, 8 and 12 instead). One packed FMA
    then makes q - z exactly (* 1/16 for the high nibbles). These pairs fill the operand's 8 registers a row
    per block; a chain of `join`, `permute` and `reshape` names that placement, and the final
    `convert_layout` is checked to be free (`assert_trivial`).
  * x needs the same order, and lane c needs exactly x's 16 columns 16c .. 16c + 15 of a block: one 32-byte
    run a token. Position p of the operand holds column SIGMA[p] (a fixed swap of index bits). Every warp
    needs all of x, so x goes through shared memory: a ring of 3 trips filled by cp.async 2 trips ahead,
    one copy a program (loaded by each warp from global memory, the 32-byte runs used half of every sector
    they touched, and the loads moved 11.2M sectors through L1 for 34 MB of weights: ncu, results/kernels.md).
    Up to 16 tokens each lane reorders its registers (one PRMT per operand register); from 32 tokens x comes
    pre-permuted by one gather a call (`permute_x`; at 16 tokens that gather was slower).

Per 64-code block and thread, this leaves: 2-4 wide loads, issued a trip ahead (stages=2); a LOP3 and a
packed FMA a code pair and a shift a word; 4 MMAs a 16-row tile and 8 tokens; and one scale FMA a group and
accumulator (or, with SCALE_IN_TILE, one multiply a code pair instead, which saves registers at 32-64 tokens).
The split-K finish is the wgmma module's. GPU only, and Hopper-tuned; the Triton interpreter does not run Gluon.

`_w4_mma_sync_ws_kernel` runs the same block math fed differently: one producer warp brings each trip's x,
codes, scales and zeros into a ring of shared-memory slots with bulk (TMA) copies, so the MMA warps keep no
loads in flight in registers and compute no addresses (sm_90 SASS, 128 rows on 4 warps, 16 tokens, 4 blocks a
trip: 528 loop instructions against about 630). ncu of the register-fed kernel had shown its warps waiting on
global loads issued a whole trip earlier (18% of stall samples; loading two trips ahead in registers was
slower still).

Measured on an H200 (results/kernels.md, 2026-12-01, the section from 03:42 UTC), the tuner's picks, now the
warp-specialized form with a trip's codes in one bulk copy: 8192^2 at 16 tokens 14.6 us (2.59x cuBLAS fp16; with
32-byte boxes, one a block, 15.4-15.6 in the same session), at 64 tokens 32.3 us (1.27x; unchanged by the boxes);
4096x14336: 12.7 (2.81x; was 15.5-17.5) and 30.6 us (1.30x). At one token (an 8-token tile) it now beats the
CUDA-core GEMV: 13.5 against 14.3 us (8192^2), 12.2 against 13.7. With each program running its K range as two
halves (`HALVES=2`; the section from 04:43 UTC): 8192^2 at 16 tokens 12.6 us (2.97x, the tuner's pick), one token
12.7-12.8, 64 tokens 30.8-31.3; at 4096x14336 the 4-way split-K picks stay faster.

On wgmma (`wgmma=True`, from 32 tokens; `_blocks_wgmma`): the same conversion gives each block's (q - z) * s as
the register A operand of an asynchronous warpgroup MMA, and x, put in the kernel's K order once a call
(`permute_x_wgmma`), is its B operand, read by the tensor cores from the ring slot: no warp loads x, and one
block's MMA runs while the warps convert the next. Any number of tokens, in tiles of up to 256, on one or two
warpgroups of MMA warps (64 or 128 rows). H200, the tuner's picks (results/kernels.md, the section from 05:39 UTC
2026-12-01), against cuBLAS fp16 in the same run: 8192^2 at 64 tokens 24.2 us (1.66x; 32.4 on mma.sync), 128
tokens 32.6 (1.22x), 256 tokens 54.4 (0.85x), 1024 tokens 203 (0.84x); 4096x14336: 24.5 (1.63x), 35.5 (1.12x).
With the gather a Triton kernel (`kernels.x_order`; the section from 07:02 UTC): 64 tokens 21.9 us (1.84x), 128
30.2 (1.32x), 256 49.5 (0.95x), 1024 186 (0.93x), of which the gather is 9.8 us.

`natural=True` (X_NATURAL, fp16 x; the default for fp16, EFFOPT_QMM_NATURAL=0 gathers) drops the gather: every
lane of a quad loads all 8 words of its rows, and lane c converts byte c of each word (codes 8 wd + 2c and
8 wd + 2c + 1, one PRMT, one LOP3 and one FMA a pair: `_codes_operand_natural`), which is where wgmma's A
operand wants adjacent columns, so x is read as it lies. sm_90 SASS at 64 rows x 128 tokens, 4 blocks a trip:
1,143 loop instructions against 1,060, the same wgmma pipelining (one group in flight). H200 (the section from
10:24 UTC 2026-12-01), the tuner's picks: 8192^2 20.1 us at 64 tokens (1.98x cuBLAS; gathered 22.7), 256 tokens
50.3 (1.00x), 1024 tokens 177.9 (0.98x; gathered 188.9); 4096x14336 at 1024 tokens 150.9 (1.00x; gathered 169.4).
"""
import torch
import triton

from kernels import qmatmul_wgmma as WG
from kernels import x_order as XO


def _pair_asm(mask: int, fill: int, fma: str, mul: int):
    """(w & mask) | fill (one LOP3: two 16-bit floats OFFSET + q, or OFFSET + 16 q for a high nibble), then one
    packed FMA: * mul + $3 ($3 = -(OFFSET + z) twice, or -(OFFSET / 16 + z) for 16 q): q - z, exact."""
    return triton.language.constexpr(
        f"{{\n.reg .b32 r, k;\nlop3.b32 r, $2, {mask:#010x}, {fill:#010x}, 0xea;\nmov.b32 k, {mul:#010x};\n"
        f"{fma} r, r, k, $3;\nmov.b32 {{$0, $1}}, r;\n}}")


# fp16: the low nibbles of a byte pair as 1024 + q, the high ones in place as 1024 + 16 q (* 1/16: 64 + q), so
# one shift (by 8) a word gives its 4 pairs; bf16 (7 mantissa bits) has room for the low nibbles only
_LO_F16 = _pair_asm(0x000F000F, 0x64006400, "fma.rn.f16x2", 0x3C003C00)  # * 1.0
_HI_F16 = _pair_asm(0x00F000F0, 0x64006400, "fma.rn.f16x2", 0x2C002C00)  # * 1/16
_LO_BF16 = _pair_asm(0x000F000F, 0x43004300, "fma.rn.bf16x2", 0x3F803F80)  # 128 + q, * 1.0


def _neg_asm(fma: str, minus_one: int, minus_offset: int):
    """z -> -(OFFSET + z) = z * -1 - OFFSET in one FMA, packed twice into an int32."""
    return triton.language.constexpr(
        f"{{\n.reg .b16 t, m, c;\nmov.b16 m, {minus_one:#06x};\nmov.b16 c, {minus_offset:#06x};\n"
        f"{fma} t, $1, m, c;\nmov.b32 $0, {{t, t}};\n}}")


# x as it lies (X_NATURAL, fp16): byte b of a word (codes 2b, 2b + 1, adjacent columns) copied to bytes 0 and 2 by
# one PRMT with a per-lane selector ($3), then the low nibble at bits 0-3 (1024 + q) and the high one at bits 20-23
# (1024 + 16 q, * 1/16) by one LOP3, and one FMA with the mixed addend ($4: -(1024 + z) low, -(64 + z) high)
_NAT_F16 = triton.language.constexpr(
    "{\n.reg .b32 r, k;\nprmt.b32 r, $2, 0, $3;\nlop3.b32 r, r, 0x00f0000f, 0x64006400, 0xea;\n"
    "mov.b32 k, 0x2c003c00;\nfma.rn.f16x2 r, r, k, $4;\nmov.b32 {$0, $1}, r;\n}")

_NEG_F16 = _neg_asm("fma.rn.f16", 0xBC00, 0xE400)  # -1024
_NEG16_F16 = _neg_asm("fma.rn.f16", 0xBC00, 0xD400)  # -64: for the high nibbles' 1024 + 16 q, scaled by 1/16
_NEG_BF16 = _neg_asm("fma.rn.bf16", 0xBF80, 0xC300)  # -128

if WG.HAVE_GLUON:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy, mma_v2
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, warpgroup_mma,
                                                                  warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

BLOCK_K = 64  # codes per block: 32 bytes a row, 8 bytes a lane
_BK = triton.language.constexpr(BLOCK_K)  # the same, for the kernels
# Lane c's operand position p = 4t + 2h + e (k tile t, pair h, element e) holds its column 16c + SIGMA[p]:
# the bits (p3, p2, p1, p0) of p are bits (3, 0, 1, 2) of the column (see the docstring).
SIGMA = (0, 4, 2, 6, 1, 5, 3, 7, 8, 12, 10, 14, 9, 13, 11, 15)
SMEM_BYTES = 227 * 1024  # shared memory a program may take on sm_90
X_WGMMA = 2  # X_PERMUTED value: x in the kernel's K order (`permute_x_wgmma`), read by wgmma from shared memory
_X_WGMMA = triton.language.constexpr(X_WGMMA)
# X_PERMUTED value: x as it lies, read by wgmma from shared memory; the codes converted in natural K order
# (`_codes_operand_natural`, fp16 only), so no gather a call
X_NATURAL = 3
_X_NATURAL = triton.language.constexpr(X_NATURAL)
WGMMA_WIDE_REGS = 168  # launch cap for a 256-token wgmma tile: ptxas wants 158 for its accumulators and operands
X_GATHER_MIN_M = 32  # from here x is pre-permuted by a gather (`permute_x`) instead of in each lane's registers


def ws_launch_regs(programs: int, warps: int, smem_bytes: int, sms: int, halves: int = 1) -> int:
    """The warp-specialized kernel's register cap at launch. Its programs hold the MMA warps (of each half) and
    the producers' warpgroup (halves * warps + 4 warps), all at this cap; `setmaxnreg` then hands the producers'
    share to the MMA warps (4 MMA warps at cap R run at 2R - 24; each of two halves at `ws_half_regs`). The cap lets the
    grid run in one wave where the SM's 64K registers and 227 KB of shared memory allow (an SM fits
    65536 // (32 (halves * warps + 4) R) programs), from 128 (2 programs of 4 MMA warps an SM; one program of
    two halves: 168) down to 64 (4 programs; their MMA warps at 104 registers, no spills in sm_90 SASS)."""
    per_sm = min(-(-programs // sms), max(1, SMEM_BYTES // max(smem_bytes, 1)))
    regs = 65536 // (32 * (halves * warps + 4) * per_sm) // 8 * 8
    return max(64, min(128 if halves == 1 else 168, regs))


def ws_half_regs(regs: int) -> int:
    """Registers of each half's MMA warps in a program of two halves at launch cap `regs`: the three warpgroups'
    3 * regs less the producers' 24, shared evenly (a multiple of 8, at most 256: `setmaxnreg`'s range)."""
    return min(256, (3 * regs - 24) // 2 // 8 * 8)


def ws_smem_bytes(block_n: int, block_m: int, step: int, stages: int, group: int) -> int:
    """Shared memory of one warp-specialized program: `stages` trips of x, codes, scales and zeros."""
    gpt = max(1, step * BLOCK_K // group)
    return stages * (step * (block_m * BLOCK_K * 2 + block_n * 32) + 2 * gpt * block_n * 2 + 16) + 1024


def fits(bits: int, group: int, in_features: int, m: int, wgmma: bool = False) -> bool:
    """4-bit codes, K and the group whole 64-code blocks, at most 64 tokens (on wgmma: any number, in tiles of
    up to 256)."""
    return bits == 4 and in_features % BLOCK_K == 0 and group % BLOCK_K == 0 and (m <= 64 or wgmma)


def permute_x(x2: torch.Tensor) -> torch.Tensor:
    """x [M, K] with every 16 columns in SIGMA order, the order the kernel's operand takes: column bits
    (j3, j2, j1, j0) to position bits (j3, j0, j1, j2). One copy (`kernels.x_order`'s gather on the GPU),
    safe in graph capture."""
    return XO.permute_blocks(x2, XO.SIGMA_AXES)


def permute_x_wgmma(x2: torch.Tensor) -> torch.Tensor:
    """x [M, K] with every 64 columns in the kernel's K order, so that wgmma can read it from shared memory as
    the B operand of `_codes_operand`'s A: order position bits (t1, t0, h, c1, c0, e) = column bits
    (j3, j0, j1, c1, c0, j2) of a column 16c + 8 j3 + 4 j2 + 2 j1 + j0 (`_x_operand`). One copy."""
    return XO.permute_blocks(x2, XO.WGMMA_AXES)


if WG.HAVE_GLUON:

    @gluon.jit
    def _w4_mma_sync_kernel(
        x_ptr,  # x, or `permute_x(x)` with X_PERMUTED
        qw_ptr,  # the packed codes viewed as int32 [N, K / 8]
        s_ptr, z_ptr, bias_ptr, out_ptr, ws_ptr, lock_ptr,
        M, N, K,
        stride_xm, stride_qn, stride_sn, stride_sg, stride_om,
        GROUP: gl.constexpr,  # codes per group (K for per-channel)
        F16: gl.constexpr,  # x in fp16 (else bf16): the code conversion adds OFFSET 1024 (else 128) to a code
        HAS_BIAS: gl.constexpr,
        BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr, SPLIT_K: gl.constexpr,
        STEP: gl.constexpr,  # 64-code blocks a loop trip (unrolled): part of one group, or whole groups
        X_PERMUTED: gl.constexpr,  # x arrives in SIGMA order (else each lane reorders its registers)
        SCALE_IN_TILE: gl.constexpr,  # (q - z) * s in x's dtype (one rounding), no fp32 partial: the same loop
        # length at 64 tokens in sm_90 SASS, but 146 registers against 180 (3 programs an SM instead of 2)
        PREFETCH: gl.constexpr,  # the next trip's loads are issued before this trip's MMAs (registers x2)
        W_L: gl.constexpr, X_L: gl.constexpr, XC_L: gl.constexpr, XS_L: gl.constexpr, MMA_L: gl.constexpr,
        OUT_L: gl.constexpr,
    ):
        A_L: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA_L, k_width=2)
        B_L: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=MMA_L, k_width=2)
        pid, pid_k, n0, m0, n_steps, it0, n_it = WG._tile_and_steps(M, N, K, BLOCK_N, BLOCK_M, SPLIT_K,
                                                                    STEP * _BK)
        dt = x_ptr.dtype.element_ty
        GPB: gl.constexpr = GROUP // _BK  # blocks a group

        rows = gl.minimum(n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, W_L)), N - 1)  # past N: dropped
        w_ptrs = qw_ptr + rows[:, None] * stride_qn + gl.arange(0, 8, layout=gl.SliceLayout(0, W_L))[None, :]
        # tokens past M read a valid row (their outputs are dropped at the store): unmasked copies
        tok = gl.minimum(m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, XC_L)), M - 1)
        x_ptrs = x_ptr + tok[:, None] * stride_xm + gl.arange(0, STEP * _BK, layout=gl.SliceLayout(0, XC_L))[None, :]
        a_rows = gl.minimum(n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, A_L)), N - 1)
        acc_rows = gl.minimum(n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, MMA_L)), N - 1)
        z_ptrs = z_ptr + rows * stride_sn  # the zero points, in the codes' layout: their conversion subtracts them
        s_ptrs = s_ptr + (a_rows if SCALE_IN_TILE else acc_rows) * stride_sn
        last = n_steps - 1  # copies and prefetches past this split's last trip re-read an in-bounds one

        # x goes through shared memory, copied once a program: every warp needs all of it, and lane c's 32-byte
        # run per token would use half of each sector it touches if each warp loaded it from global memory
        x_smem = gl.allocate_shared_memory(dt, [3, BLOCK_M, STEP * _BK], XS_L)  # 3 trips: copies 2 trips ahead
        for j in gl.static_range(2):
            _copy_x_trip(x_smem, j, x_ptrs, gl.minimum(it0 + j, last), STEP)
        acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, MMA_L)
        if PREFETCH:
            nxt = _load_trip(w_ptrs, z_ptrs, s_ptrs, stride_sg, gl.minimum(it0, last), GROUP, STEP)
            for i in range(n_it):
                cur = nxt
                nxt = _load_trip(w_ptrs, z_ptrs, s_ptrs, stride_sg, gl.minimum(it0 + i + 1, last), GROUP, STEP)
                acc = _trip(acc, cur, x_smem, x_ptrs, i, it0 + i, last, GROUP, F16, X_PERMUTED, SCALE_IN_TILE,
                            BLOCK_N, BLOCK_M, STEP, X_L, A_L, B_L, MMA_L)
        else:
            for i in range(n_it):
                acc = _trip(acc, _load_trip(w_ptrs, z_ptrs, s_ptrs, stride_sg, it0 + i, GROUP, STEP), x_smem, x_ptrs,
                            i, it0 + i, last, GROUP, F16, X_PERMUTED, SCALE_IN_TILE, BLOCK_N, BLOCK_M, STEP, X_L, A_L,
                            B_L, MMA_L)
        async_copy.wait_group(0)
        WG._epilogue(acc, out_ptr, bias_ptr, ws_ptr, lock_ptr, pid, pid_k, n0, m0, N, M, stride_om, HAS_BIAS,
                     BLOCK_N, BLOCK_M, SPLIT_K, OUT_L)

    @gluon.jit
    def _w4_mma_sync_ws_kernel(
        x_desc, q_desc, s_desc, z_desc,  # bulk-copy descriptors: x [M, K], codes int32 [N, K / 8], scales, zeros [G, N]
        bias_ptr, out_ptr, ws_ptr, lock_ptr,
        M, N, K, stride_om,
        GROUP: gl.constexpr, F16: gl.constexpr, HAS_BIAS: gl.constexpr,
        BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr, SPLIT_K: gl.constexpr, STEP: gl.constexpr,
        STAGES: gl.constexpr,  # ring slots of one trip each (x, codes, scales, zeros)
        X_PERMUTED: gl.constexpr, SCALE_IN_TILE: gl.constexpr,
        W_L: gl.constexpr, X_L: gl.constexpr, MMA_L: gl.constexpr, OUT_L: gl.constexpr,
        C_L: gl.constexpr,  # X_NATURAL: [rows, words, lanes of a quad] (`_codes_operand_natural`)
        HALVES: gl.constexpr,  # 2: the program's K range in two halves, each with its own ring and MMA warps
        HALF_REGS: gl.constexpr,  # with HALVES 2: the second half's MMA warps' registers (`ws_half_regs`)
        PDL: gl.constexpr = 0,  # launched as a programmatic dependent: 1 wait first, 2 the weights' first trips before
    ):
        """`_w4_mma_sync_kernel` fed by one producer warp: each trip's x, codes, scales and zeros arrive by bulk
        (TMA) copies into a ring of STAGES slots, counted on the slot's `ready` barrier, so the kernel's warps hold
        no loads in flight in registers and compute no addresses; they read a slot from shared memory, run the
        same block math (`_blocks`) and free the slot (`empty`). A trip's codes land as one [BLOCK_N, STEP * 8]
        box of words, swizzled (a quad's 8-byte reads of a block hit distinct banks), x as [BLOCK_M, 64] per block
        with the 128-byte swizzle (each token row's 16-byte chunks rotated: a lane's two tokens in distinct banks). Rows
        past M or N read as zeros and their outputs are dropped.

        HALVES 2 runs the program's trips as two halves side by side, each with its own producer warp, ring and 4
        MMA warps; the second half parks its sum in shared memory for the first. One program then streams as two
        did, without the split-K finish between them (on an H200 that finish cost 1.2 us at 8192^2, 16 tokens).

        PDL (launched with `launch_pdl`, sm_90): the kernel lets the next grid launch at once and is itself
        scheduled during the previous grid's tail. 1: each producer waits for that grid (`griddepcontrol.wait`)
        before its first copy; 2: it first copies the codes, scales and zeros of its first STAGES trips, then
        waits, then copies x: the weight must not be written by the kernel launched right before this one. The
        epilogue waits too, so no write of this grid can land before the previous grid is done."""
        GPT: gl.constexpr = (STEP * _BK) // GROUP if STEP * _BK >= GROUP else 1  # groups whose scales a trip reads
        TRIP_BYTES: gl.constexpr = STEP * (BLOCK_M * _BK * 2 + BLOCK_N * 32) + 2 * GPT * BLOCK_N * 2
        pid, pid_k, n0, m0, n_steps, it0, n_it = WG._tile_and_steps(M, N, K, BLOCK_N, BLOCK_M, SPLIT_K, STEP * _BK)
        ONE: gl.constexpr = X_PERMUTED >= _X_WGMMA  # every ring runs >= 1 trip (`_ws_consume`); clamped: a real one
        x_smem, q_smem, s_smem, z_smem, ready, empty = _ws_ring(x_desc, q_desc, s_desc, z_desc, BLOCK_N, BLOCK_M, STEP,
                                                                STAGES, GPT)
        if PDL:
            gdc_launch_dependents()
        if HALVES == 1:
            fence_async_shared()  # the initialised barriers, visible to the copy engine
            acc, = gl.warp_specialize([
                (_ws_consume, (x_smem, q_smem, s_smem, z_smem, ready, empty, n_it, GROUP, F16, X_PERMUTED,
                               SCALE_IN_TILE, BLOCK_N, BLOCK_M, STEP, STAGES, GPT, W_L, X_L, MMA_L, C_L)),
                (_ws_produce, (x_desc, q_desc, s_desc, z_desc, x_smem, q_smem, s_smem, z_smem, ready, empty,
                               gl.minimum(it0, n_steps - 1), n_it, m0, n0, GROUP, STEP, STAGES, GPT, TRIP_BYTES, ONE,
                               PDL)),
            ], [1], [24])
        else:  # the second half: its own ring, producer and MMA warps, its sum parked in `red`
            xb, qb, sb, zb, rb, eb = _ws_ring(x_desc, q_desc, s_desc, z_desc, BLOCK_N, BLOCK_M, STEP, STAGES, GPT)
            red = gl.allocate_shared_memory(gl.float32, [BLOCK_N, BLOCK_M],
                                            gl.SwizzledSharedLayout(1, 1, 1, order=[1, 0]))
            done = gl.allocate_shared_memory(gl.int64, [1, 1], mbarrier.MBarrierLayout())
            mbarrier.init(done.index(0), count=1)  # one thread of the second half, once its sum is parked
            fence_async_shared()
            h = n_it // 2  # trips of the first half
            acc, = gl.warp_specialize([
                (_ws_consume, (x_smem, q_smem, s_smem, z_smem, ready, empty, h, GROUP, F16, X_PERMUTED, SCALE_IN_TILE,
                               BLOCK_N, BLOCK_M, STEP, STAGES, GPT, W_L, X_L, MMA_L, C_L)),
                (_ws_produce, (x_desc, q_desc, s_desc, z_desc, x_smem, q_smem, s_smem, z_smem, ready, empty,
                               gl.minimum(it0, n_steps - 1), h, m0, n0, GROUP, STEP, STAGES, GPT, TRIP_BYTES, ONE,
                               PDL)),
                (_ws_produce, (x_desc, q_desc, s_desc, z_desc, xb, qb, sb, zb, rb, eb, gl.minimum(it0 + h, n_steps - 1),
                               n_it - h, m0, n0, GROUP, STEP, STAGES, GPT, TRIP_BYTES, ONE, PDL)),
                (_ws_consume_park, (xb, qb, sb, zb, rb, eb, n_it - h, red, done, GROUP, F16, X_PERMUTED,
                                    SCALE_IN_TILE, BLOCK_N, BLOCK_M, STEP, STAGES, GPT, W_L, X_L, MMA_L, C_L)),
            ], [1, 1, 4], [24, 24, HALF_REGS])
            mbarrier.wait(done.index(0), 0)
            acc += red.load(MMA_L)  # the same layout both halves hold their sums in
        if PDL:
            gdc_wait()  # returns at once: the producers waited before this grid's x arrived
        WG._epilogue(acc, out_ptr, bias_ptr, ws_ptr, lock_ptr, pid, pid_k, n0, m0, N, M, stride_om, HAS_BIAS,
                     BLOCK_N, BLOCK_M, SPLIT_K, OUT_L)

    @gluon.jit
    def _ws_produce(x_desc, q_desc, s_desc, z_desc, x_smem, q_smem, s_smem, z_smem, ready, empty, it0, n_it, m0, n0,
                    GROUP: gl.constexpr, STEP: gl.constexpr, STAGES: gl.constexpr, GPT: gl.constexpr,
                    TRIP_BYTES: gl.constexpr, ONE: gl.constexpr, PDL: gl.constexpr = 0):
        """The producer warp: trip i's copies into slot i % STAGES once the consumers have freed it (with ONE, at
        least one trip: trip it0's again when the range is empty). PDL 1: after the previous grid is done; PDL 2:
        the weights of the first STAGES trips before that (each slot's first pass is free), x after."""
        n = gl.maximum(n_it, ONE)
        if PDL == 2:
            for i in range(gl.minimum(n, STAGES)):
                mbarrier.expect(ready.index(i), TRIP_BYTES)  # x's bytes are counted here too: they land later
                _ws_copy_weights(q_desc, s_desc, z_desc, q_smem, s_smem, z_smem, ready.index(i), i, (it0 + i) * STEP,
                                 n0, GROUP, STEP, GPT)
        if PDL:
            gdc_wait()
        for i in range(n):
            slot = i % STAGES
            # a fresh barrier counts as having completed the phase before its first: the first pass is free
            mbarrier.wait(empty.index(slot), ((i // STAGES) & 1) ^ 1)
            bar = ready.index(slot)
            blk = (it0 + i) * STEP
            if PDL != 2 or i >= STAGES:
                mbarrier.expect(bar, TRIP_BYTES)
                _ws_copy_weights(q_desc, s_desc, z_desc, q_smem, s_smem, z_smem, bar, slot, blk, n0, GROUP, STEP, GPT)
            for sub in gl.static_range(STEP):
                WG._tma_load(x_desc, [m0, (blk + sub) * _BK], bar, x_smem.index(slot * STEP + sub))

    @gluon.jit
    def _ws_copy_weights(q_desc, s_desc, z_desc, q_smem, s_smem, z_smem, bar, slot, blk, n0, GROUP: gl.constexpr,
                         STEP: gl.constexpr, GPT: gl.constexpr):
        """One trip's codes (one box), scales and zeros into ring slot `slot`, counted on `bar`."""
        WG._tma_load(q_desc, [n0, blk * 8], bar, q_smem.index(slot))
        for gi in gl.static_range(GPT):
            g = (blk * _BK) // GROUP + gi
            WG._tma_load(s_desc, [g, n0], bar, s_smem.index(slot * GPT + gi))
            WG._tma_load(z_desc, [g, n0], bar, z_smem.index(slot * GPT + gi))

    @gluon.jit
    def _ws_ring(x_desc, q_desc, s_desc, z_desc, BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr, STEP: gl.constexpr,
                 STAGES: gl.constexpr, GPT: gl.constexpr):
        """A ring of STAGES slots (x, codes, scales, zeros of one trip each) and its initialised barriers."""
        x_smem = gl.allocate_shared_memory(x_desc.dtype, [STAGES * STEP, BLOCK_M, _BK], x_desc.layout)
        q_smem = gl.allocate_shared_memory(q_desc.dtype, [STAGES, BLOCK_N, STEP * 8], q_desc.layout)
        s_smem = gl.allocate_shared_memory(s_desc.dtype, [STAGES * GPT, 1, BLOCK_N], s_desc.layout)
        z_smem = gl.allocate_shared_memory(z_desc.dtype, [STAGES * GPT, 1, BLOCK_N], z_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for j in gl.static_range(STAGES):
            mbarrier.init(ready.index(j), count=1)  # the producer's arrive, with the copies' bytes
            mbarrier.init(empty.index(j), count=1)  # one consumer thread, once every consumer warp has read it
        return x_smem, q_smem, s_smem, z_smem, ready, empty

    @gluon.jit
    def _ws_consume_park(x_smem, q_smem, s_smem, z_smem, ready, empty, n_it, red, done, GROUP: gl.constexpr,
                         F16: gl.constexpr, X_PERMUTED: gl.constexpr, SCALE_IN_TILE: gl.constexpr,
                         BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr, STEP: gl.constexpr, STAGES: gl.constexpr,
                         GPT: gl.constexpr, W_L: gl.constexpr, X_L: gl.constexpr, MMA_L: gl.constexpr,
                         C_L: gl.constexpr):
        """The second half's MMA warps: `_ws_consume` over their own ring, then their sum parked in `red` for
        the first half's warps (`done`)."""
        acc, = _ws_consume(x_smem, q_smem, s_smem, z_smem, ready, empty, n_it, GROUP, F16, X_PERMUTED, SCALE_IN_TILE,
                           BLOCK_N, BLOCK_M, STEP, STAGES, GPT, W_L, X_L, MMA_L, C_L)
        red.store(acc)
        WG._barrier()  # every warp's part of the sum is stored
        mbarrier.arrive(done.index(0))

    @gluon.jit
    def _ws_consume(x_smem, q_smem, s_smem, z_smem, ready, empty, n_it, GROUP: gl.constexpr, F16: gl.constexpr,
                    X_PERMUTED: gl.constexpr, SCALE_IN_TILE: gl.constexpr, BLOCK_N: gl.constexpr,
                    BLOCK_M: gl.constexpr, STEP: gl.constexpr, STAGES: gl.constexpr, GPT: gl.constexpr,
                    W_L: gl.constexpr, X_L: gl.constexpr, MMA_L: gl.constexpr, C_L: gl.constexpr):
        """The kernel's own warps: per trip, wait for its slot, read the codes, zeros and scales into registers,
        run the block math, and free the slot after a barrier (every warp past its reads of it)."""
        A_L: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA_L, k_width=2)
        S_L: gl.constexpr = gl.SliceLayout(1, A_L) if SCALE_IN_TILE else gl.SliceLayout(1, MMA_L)
        acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, MMA_L)
        if X_PERMUTED >= _X_WGMMA:  # a loop known to run: else ptxas finds the zeros of an empty range inside the
            n_run = gl.maximum(n_it, 1)  # MMA pipeline and waits for every wgmma; an empty range's trip is dropped
        else:
            n_run = n_it
        for i in range(n_run):
            slot = i % STAGES
            mbarrier.wait(ready.index(slot), (i // STAGES) & 1)
            words = ()
            for sub in gl.static_range(STEP):
                words = words + (q_smem.index(slot).slice(sub * 8, 8, dim=1).load(W_L),)
            zs = ()
            ss = ()
            for gi in gl.static_range(GPT):
                zs = zs + (z_smem.index(slot * GPT + gi).reshape([BLOCK_N]).load(gl.SliceLayout(1, W_L)),)
                ss = ss + (s_smem.index(slot * GPT + gi).reshape([BLOCK_N]).load(S_L),)
            if X_PERMUTED >= _X_WGMMA:  # frees the previous trip's slot once its MMAs are done
                acc = _blocks_wgmma(acc, (words, zs, ss), x_smem, slot * STEP, empty, (i + STAGES - 1) % STAGES,
                                    i > 0, GROUP, F16, X_PERMUTED == _X_NATURAL, BLOCK_N, STEP, A_L, C_L)
            else:
                B_L: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=MMA_L, k_width=2)
                acc = _blocks(acc, (words, zs, ss), x_smem, slot * STEP, True, GROUP, F16, X_PERMUTED,
                              SCALE_IN_TILE, BLOCK_N, BLOCK_M, STEP, X_L, A_L, B_L, MMA_L)
                WG._barrier()  # every consumer warp is past its reads of this slot
                mbarrier.arrive(empty.index(slot))
        if X_PERMUTED >= _X_WGMMA:
            acc = warpgroup_mma_wait(0, deps=[acc])
            acc = gl.where(n_it > 0, acc, 0.0)
        return (acc,)

    @gluon.jit
    def _trip(acc, loads, x_smem, x_ptrs, i, it, last, GROUP: gl.constexpr, F16: gl.constexpr,
              X_PERMUTED: gl.constexpr, SCALE_IN_TILE: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr,
              STEP: gl.constexpr, X_L: gl.constexpr, A_L: gl.constexpr, B_L: gl.constexpr, MMA_L: gl.constexpr):
        """Loop trip i (K trip `it`): its STEP blocks' MMAs from `loads` (`_load_trip`) and x's ring slot i % 3,
        after starting the copy of trip it + 2's x into the slot trip i - 1 read."""
        async_copy.wait_group(1)  # this thread's copy of trip i has landed (trip i + 1 may not have)
        WG._barrier()  # every thread's has; and every warp is done with slot (i + 2) % 3, read in trip i - 1
        _copy_x_trip(x_smem, (i + 2) % 3, x_ptrs, gl.minimum(it + 2, last), STEP)
        return _blocks(acc, loads, x_smem, i % 3, False, GROUP, F16, X_PERMUTED, SCALE_IN_TILE, BLOCK_N, BLOCK_M, STEP,
                       X_L, A_L, B_L, MMA_L)

    @gluon.jit
    def _blocks(acc, loads, x_smem, x_at, X_BLOCKS: gl.constexpr, GROUP: gl.constexpr, F16: gl.constexpr,
                X_PERMUTED: gl.constexpr, SCALE_IN_TILE: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr,
                STEP: gl.constexpr, X_L: gl.constexpr, A_L: gl.constexpr, B_L: gl.constexpr, MMA_L: gl.constexpr):
        """acc + one trip's STEP blocks: codes, zero points and scales `loads` (as `_load_trip` returns them), and
        x in shared memory: buffer x_at [BLOCK_M, STEP * 64], or with X_BLOCKS buffers x_at + sub [BLOCK_M, 64]."""
        GPB: gl.constexpr = GROUP // _BK  # blocks a group
        words, zs, ss = loads
        for sub in gl.static_range(STEP):
            if sub % GPB == 0:  # (static) a group starts: its zero points and scales
                nz, nz16 = _zero_addends(zs[sub // GPB], F16)
                if SCALE_IN_TILE:
                    s_a = ss[sub // GPB]
                else:
                    s = ss[sub // GPB].to(gl.float32)
                    part = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, MMA_L)
            if X_BLOCKS:
                xb = x_smem.index(x_at + sub).load(X_L)
            else:
                xb = x_smem.index(x_at).slice(sub * _BK, _BK, dim=1).load(X_L)
            b = _x_operand(xb, X_PERMUTED, BLOCK_M, B_L)
            if SCALE_IN_TILE:
                acc = mma_v2(_codes_operand(words[sub], nz, nz16, F16, BLOCK_N, A_L) * s_a[:, None], b, acc)
            else:
                part = mma_v2(_codes_operand(words[sub], nz, nz16, F16, BLOCK_N, A_L), b, part)
                if sub % GPB == GPB - 1 or sub == STEP - 1:  # (static) the group's last block of this trip
                    acc += s[:, None] * part
        return acc

    @gluon.jit
    def _blocks_wgmma(acc, loads, x_smem, x_at, empty, prev, release, GROUP: gl.constexpr, F16: gl.constexpr,
                      NATURAL: gl.constexpr, BLOCK_N: gl.constexpr, STEP: gl.constexpr, A_L: gl.constexpr,
                      C_L: gl.constexpr):
        """`_blocks` on wgmma: each block's (q - z) * s goes from registers into an asynchronous warpgroup MMA as
        its A operand, and x (`permute_x_wgmma`: already in the kernel's K order; NATURAL: as it lies, the codes
        converted in natural order) is its B operand, read by the tensor cores from the ring slot x_at + sub, so no
        warp loads x. Each block's MMA runs while the warps convert the next one, across trips too: once the
        trip's first MMA is issued, every earlier one is done, and with `release` the previous trip's slot `prev`
        is freed. One MMA is left in flight."""
        GPB: gl.constexpr = GROUP // _BK  # blocks a group
        words, zs, ss = loads
        for sub in gl.static_range(STEP):
            if sub % GPB == 0:  # (static) a group starts: its zero points and scales
                nz, nz16 = _zero_addends(zs[sub // GPB], F16)
                if NATURAL:  # the low half's addend from nz, the high half's from nz16
                    nzm = (nz & 0xFFFF) | (nz16 & -65536)
                s_a = ss[sub // GPB]
            if NATURAL:
                a = _codes_operand_natural(words[sub], nzm, BLOCK_N, A_L, C_L) * s_a[:, None]
            else:
                a = _codes_operand(words[sub], nz, nz16, F16, BLOCK_N, A_L) * s_a[:, None]
            acc = warpgroup_mma(a, x_smem.index(x_at + sub).permute((1, 0)), acc, is_async=True)
            acc = warpgroup_mma_wait(1, deps=[acc])
            if sub == 0:  # the previous trip's MMAs are done in every consumer warp: its slot is free (predicated,
                WG._barrier()  # not branched: a branch here makes ptxas wait for every wgmma)
                mbarrier.arrive(empty.index(prev), pred=release)
        return acc

    @gluon.jit
    def _load_trip(w_ptrs, z_ptrs, s_ptrs, stride_sg, it, GROUP: gl.constexpr, STEP: gl.constexpr):
        """The register loads of trip `it`: the codes of its STEP blocks, and the zero points and scales of each
        group that starts in it (all STEP blocks when the trip lies inside one group)."""
        GPB: gl.constexpr = GROUP // _BK
        words = ()
        zs = ()
        ss = ()
        for sub in gl.static_range(STEP):
            blk = it * STEP + sub
            words = words + (gl.load(w_ptrs + blk * 8),)
            if sub % GPB == 0:
                g = (blk * _BK) // GROUP
                zs = zs + (gl.load(z_ptrs + g * stride_sg),)
                ss = ss + (gl.load(s_ptrs + g * stride_sg),)
        return words, zs, ss

    @gluon.jit
    def _copy_x_trip(x_smem, slot, x_ptrs, it, STEP: gl.constexpr):
        """cp.async of trip `it`'s x [BLOCK_M, STEP * 64] into ring slot `slot`, one commit group (one copy: Gluon
        puts a barrier between two copies into one buffer)."""
        WG._async_load(x_smem.index(slot), x_ptrs + it * (STEP * _BK))
        async_copy.commit_group()

    @gluon.jit
    def _zero_addends(z, F16: gl.constexpr):
        """A group's `_neg_pair` addends for `_codes_operand`: at OFFSET and (fp16) at OFFSET / 16 for the high
        nibbles; bf16 shifts every pair to the low nibbles, so its second is the first again (unread)."""
        if F16:
            nz = _neg_pair(z, _NEG_F16, F16)
            nz16 = _neg_pair(z, _NEG16_F16, F16)
        else:
            nz = _neg_pair(z, _NEG_BF16, F16)
            nz16 = nz
        return nz, nz16

    @gluon.jit
    def _neg_pair(z, NEG_ASM: gl.constexpr, F16: gl.constexpr):
        """-(OFFSET + z) (or -(OFFSET / 16 + z)) in x's dtype, twice in an int32: the addend of `_pair_asm`'s
        FMA. One FMA and one pack a row and group; exact (small integers)."""
        if F16:
            zz = z.to(gl.float16)
        else:
            zz = z.to(gl.bfloat16)
        return gl.inline_asm_elementwise(NEG_ASM, "=r,h", [zz], dtype=gl.int32, is_pure=True, pack=1)

    @gluon.jit
    def _pair(asm: gl.constexpr, w, nz, F16: gl.constexpr):
        """[row, c, wd] words and packed addends -> [row, c, wd, 2]: one code pair a word (`_pair_asm`)."""
        if F16:
            lo, hi = gl.inline_asm_elementwise(asm, "=h,=h,r,r", [w, nz], dtype=(gl.float16, gl.float16),
                                               is_pure=True, pack=1)
        else:
            lo, hi = gl.inline_asm_elementwise(asm, "=h,=h,r,r", [w, nz], dtype=(gl.bfloat16, gl.bfloat16),
                                               is_pure=True, pack=1)
        return gl.join(lo, hi)

    @gluon.jit
    def _codes_operand(words, nz, nz16, F16: gl.constexpr, BLOCK_N: gl.constexpr, A_L: gl.constexpr):
        """int32 [BLOCK_N, 8] words of a 64-code block (lane c of a quad holds words 2c, 2c + 1 of its rows)
        -> q - z as the MMA's A operand [BLOCK_N, 64] in the kernel's K order, without moving a value. nz /
        nz16: `_neg_pair` of each row's zero point at OFFSET and OFFSET / 16."""
        w3 = words.reshape([BLOCK_N, 4, 2])  # [row, c, wd]: word wd of lane c
        z3 = gl.broadcast(nz[:, None], words)[0].reshape([BLOCK_N, 4, 2])
        z16 = gl.broadcast(nz16[:, None], words)[0].reshape([BLOCK_N, 4, 2])
        pairs = ()
        for q in gl.static_range(4):  # real codes (0, 4), (2, 6), (1, 5), (3, 7) of a word's 8
            if F16:  # no shift for a high nibble: 1024 + 16 q, scaled by 1/16 in the FMA
                if q == 0:
                    pair = _pair(_LO_F16, w3, z3, F16)
                elif q == 1:
                    pair = _pair(_LO_F16, w3 >> 8, z3, F16)
                elif q == 2:
                    pair = _pair(_HI_F16, w3, z16, F16)
                else:
                    pair = _pair(_HI_F16, w3 >> 8, z16, F16)
            else:
                pair = _pair(_LO_BF16, w3 >> ((q % 2) * 8 + (q // 2) * 4), z3, F16)
            pairs = pairs + (pair,)  # [row, c, wd, e]
        # pair q = 2j + i goes to k tile t = 2 wd + j, pair h = i: k = 32 wd + 16 j + 8 i + 2 c + e
        a = gl.join(gl.join(pairs[0], pairs[1]), gl.join(pairs[2], pairs[3]))  # [row, c, wd, e, i, j]
        a = a.permute([0, 2, 5, 4, 1, 3]).reshape([BLOCK_N, _BK])
        return gl.convert_layout(a, A_L, assert_trivial=True)

    @gluon.jit
    def _codes_operand_natural(words, nzm, BLOCK_N: gl.constexpr, A_L: gl.constexpr, C_L: gl.constexpr):
        """int32 [BLOCK_N, 8] words of a 64-code block (every lane of a quad holds all 8 of its rows) -> q - z as
        wgmma's A operand [BLOCK_N, 64] in natural K order (fp16): lane c of a quad takes byte c of each word, the
        adjacent codes 8 wd + 2c and 8 wd + 2c + 1, which is where the operand wants them; nzm: each row's mixed
        addend (`_NAT_F16`)."""
        w3 = gl.convert_layout(words, gl.SliceLayout(2, C_L), assert_trivial=True)[:, :, None]  # [row, wd, 1]
        b = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, C_L)))  # the lane's byte
        sel = (b * 0x101 + 0x4040)[None, None, :]  # PRMT: byte b to bytes 0 and 2, zeros to bytes 1 and 3
        w3, sel = gl.broadcast(w3, sel)  # [row, wd, c]
        z3 = gl.convert_layout(nzm, gl.SliceLayout(1, gl.SliceLayout(2, C_L)), assert_trivial=True)[:, None, None]
        z3 = gl.broadcast(z3, w3)[0]
        lo, hi = gl.inline_asm_elementwise(_NAT_F16, "=h,=h,r,r,r", [w3, sel, z3], dtype=(gl.float16, gl.float16),
                                           is_pure=True, pack=1)
        a = gl.join(lo, hi).reshape([BLOCK_N, _BK])  # [row, wd, c, e] -> k = 8 wd + 2c + e
        return gl.convert_layout(a, A_L, assert_trivial=True)

    @gluon.jit
    def _x_operand(x, X_PERMUTED: gl.constexpr, BLOCK_M: gl.constexpr, B_L: gl.constexpr):
        """A block of x [BLOCK_M, 64] (lane c of a quad holds columns 16c .. 16c + 15 of its tokens, in SIGMA
        order with X_PERMUTED) -> the MMA's B operand [64, BLOCK_M] in the kernel's K order, no value leaving
        its lane."""
        if X_PERMUTED:
            x = x.reshape([BLOCK_M, 4, 4, 2, 2])  # [token, c, t, h, e]: position 16c + 4t + 2h + e
            x = x.permute([2, 3, 1, 4, 0])  # k = 16t + 8h + 2c + e
        else:
            x = x.reshape([BLOCK_M, 4, 2, 2, 2, 2])  # [token, c, j3, j2, j1, j0]: column 16c + 8j3 + 4j2 + 2j1 + j0
            x = x.permute([2, 5, 4, 1, 3, 0])  # k as above, tile t = 2 j3 + j0, pair h = j1, element e = j2
        return gl.convert_layout(x.reshape([_BK, BLOCK_M]), B_L, assert_trivial=True)


def layouts(block_n: int, block_m: int, warps: int, wgmma: bool = False, natural: bool = False) -> dict:
    """Register layouts for [block_n rows, block_m tokens]: 16 rows a warp per MMA tile, block_n / (16 warps)
    tiles a warp; each layout places a value where the MMA operand needs it (the kernel's docstring). natural
    (X_NATURAL): every lane of a quad holds all 8 words of its rows, and C_L spreads [rows, words, 4] over the
    quad's lanes (`_codes_operand_natural`)."""
    tiles = block_n // (16 * warps)
    if (block_m not in (8, 16, 32, 64, 128, 256) or block_m > 64 and not wgmma or tiles < 1 or tiles & (tiles - 1)
            or block_n % (16 * warps)):
        raise ValueError(f"block_m must be 8-64 (a power of two; on wgmma up to 256), block_n a power-of-two multiple "
                         f"of 16 * warps; got {block_n} x {block_m} with {warps} warps")
    log_w, log_t = warps.bit_length() - 1, tiles.bit_length() - 1
    quad = [[0, 2], [0, 4], [1, 0], [2, 0], [4, 0]]  # lane = 4g + c: c -> word pair, g -> row
    tile_bases = [[16 * warps << i, 0] for i in range(log_t)]
    row_warps = [[16 << i, 0] for i in range(log_w)]
    if natural:  # words wd, row + 8, tiles, the quad's 4 lanes alike; C_L: [rows, words, byte], byte c on lane c
        words = gl.DistributedLinearLayout(
            reg_bases=[[0, 1], [0, 2], [0, 4], [8, 0]] + tile_bases, lane_bases=[[0, 0], [0, 0]] + quad[2:],
            warp_bases=row_warps, block_bases=[], shape=[block_n, 8])
        extra = dict(C_L=gl.DistributedLinearLayout(
            reg_bases=[[0, 1, 0], [0, 2, 0], [0, 4, 0], [8, 0, 0]] + [b + [0] for b in tile_bases],
            lane_bases=[[0, 0, 1], [0, 0, 2], [1, 0, 0], [2, 0, 0], [4, 0, 0]],
            warp_bases=[b + [0] for b in row_warps], block_bases=[], shape=[block_n, 8, 4]))
    else:  # wd, row + 8, tiles
        words = gl.DistributedLinearLayout(reg_bases=[[0, 1], [8, 0]] + tile_bases, lane_bases=quad,
                                           warp_bases=row_warps, block_bases=[], shape=[block_n, 8])
        extra = {}
    x = gl.DistributedLinearLayout(  # [tokens, 64]: 16 positions a lane, tokens g + 8i; warps share it
        reg_bases=[[0, 1], [0, 2], [0, 4], [0, 8]] + [[8 << i, 0] for i in range(block_m.bit_length() - 4)],
        lane_bases=[[0, 16], [0, 32], [1, 0], [2, 0], [4, 0]], warp_bases=[[0, 0]] * log_w, block_bases=[],
        shape=[block_m, BLOCK_K])
    return dict(W_L=words, X_L=x, **extra,
                # the x copy: 16 bytes (8 columns) a thread, a 128-byte row per 8 threads
                XC_L=gl.BlockedLayout([1, 8], [4, 8], [warps, 1], [1, 0]),
                # 16-byte chunk j of token row r at chunk j ^ (r % 8): the two token rows each quarter-warp reads
                # (lanes 4g + c, 32 bytes a lane) fall in different banks
                XS_L=gl.SwizzledSharedLayout(vec=8, per_phase=1, max_phase=8, order=[1, 0]),
                # wgmma: the same per-warp tiles, a warpgroup's 64 rows x block_m tokens an instruction
                MMA_L=gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[warps, 1], instr_shape=[16, block_m, 16])
                if wgmma else gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[warps, 1], instr_shape=[16, 8]),
                OUT_L=gl.BlockedLayout([2, 1], [32, 1], [1, warps], [0, 1]))


def ws_shared_layouts(step: int) -> dict:
    """The warp-specialized kernel's shared layouts, one per bulk copy: x blocks with the 128-byte swizzle; a
    trip's codes, int32 rows of step * 32 bytes, swizzled across their whole row (a quad's 8-byte reads of one
    block then fall in distinct banks; 1 block: plain 32-byte rows); scales / zeros as flat 16-bit runs."""
    return dict(x=gl.NVMMASharedLayout(128, 16), codes=gl.NVMMASharedLayout(0 if step == 1 else 32 * step, 32),
                scales=gl.NVMMASharedLayout(0, 16))


def ws_descriptors(x2, qweight, scales, zeros, block_n: int, block_m: int, step: int):
    """The warp-specialized kernel's bulk-copy descriptors (`ws_shared_layouts`): x [M, K] in [block_m, 64]
    boxes, the codes as int32 [N, K / 8] in [block_n, step * 8] boxes (one a trip: 32-byte boxes, one a block,
    were up to 1.3x slower at 4 blocks a trip, results/kernels.md), scales and zeros as their group-major [G, N]
    storage (`prepare_weight`) in [1, block_n] boxes."""
    M, K = x2.shape
    N = qweight.shape[0]
    G, sg = scales.shape[1], scales.stride(1)
    lay = ws_shared_layouts(step)
    return (TensorDescriptor(x2, [M, K], [x2.stride(0), 1], [block_m, BLOCK_K], lay["x"]),
            TensorDescriptor(qweight.view(torch.int32), [N, K // 8], [K // 8, 1], [block_n, 8 * step], lay["codes"]),
            TensorDescriptor(scales.as_strided((G, N), (sg, 1)), [G, N], [sg, 1], [1, block_n], lay["scales"]),
            TensorDescriptor(zeros.as_strided((G, N), (sg, 1)), [G, N], [sg, 1], [1, block_n], lay["scales"]))


def launch(x2, qweight, scales, zeros, group: int, bias, out, ws_buf, lock, *, block_n: int, block_m: int,
           split_k: int, warps: int, step: int, scale_in_tile: bool = False, stages: int = 2, gather: bool = None,
           specialized: bool = False, halves: int = 1, wgmma: bool = False, natural: bool = False, pdl: int = 0):
    """out[M, N] = x2 @ dequant(W)^T (+ bias) for M <= 64 (any M with wgmma). ws_buf / lock: split-K workspace and
    zeroed arrival counters (`qmatmul._scratch`) for cdiv(M, block_m) * cdiv(N, block_n) tiles. specialized: the
    kernel fed by a producer warp's bulk copies through `stages` ring slots (`_w4_mma_sync_ws_kernel`); halves 2:
    each program's K range in two halves side by side (4 MMA warps each); wgmma: that kernel's block MMAs on
    wgmma, x read from shared memory (`_blocks_wgmma`; scale in the tile, 4 or 8 MMA warps); natural (with wgmma,
    fp16 x): x read as it lies, the codes converted in natural K order, no gather. pdl (specialized): launched as
    a programmatic dependent of the kernel before (1: every copy after that grid is done; 2: the first trips'
    weights before it, so the weight must not be written by the kernel launched right before)."""
    M, K = x2.shape
    N = qweight.shape[0]
    group = min(group, K)
    gpb = group // BLOCK_K
    if not fits(4, group, K, M, wgmma) or (K // BLOCK_K) % step or (gpb % step and step % gpb):
        raise ValueError(f"the mma.sync kernel takes 4-bit codes, K whole trips of {step} x 64 codes, trips inside "
                         f"one group or of whole groups, and M <= 64 (any M on wgmma); got K={K}, g={group}, M={M}")
    if wgmma and (not specialized or not scale_in_tile or warps not in (4, 8)):
        raise ValueError(f"wgmma is a form of the warp-specialized mma.sync kernel with the scale in the tile and one "
                         f"or two warpgroups of MMA warps; got specialized={specialized}, "
                         f"scale_in_tile={scale_in_tile}, warps={warps}")
    if wgmma and step == 1 and (block_m > 128 or warps != 4):
        # an H200 gave wrong sums here (rel err 0.26 to inf at 256 tokens or 8 MMA warps, results/kernels.md, the
        # 10:24 session of 2026-12-01); the tuner never offers it, and one block a trip was correct at <= 128 x 4
        raise ValueError(f"wgmma with one block a trip (step 1) takes up to 128 tokens a tile on 4 MMA warps; got "
                         f"block_m={block_m}, warps={warps}: use 2 or 4 blocks a trip")
    if natural and (not wgmma or x2.dtype != torch.float16):
        raise ValueError(f"natural (x as it lies) is a form of the wgmma kernel for fp16 x; got wgmma={wgmma}, "
                         f"x {x2.dtype}")
    if not specialized and stages not in (1, 2):
        raise ValueError(f"the mma.sync kernel keeps 1 or 2 trips of loads in flight (stages); got {stages}")
    if specialized and (stages < 2 or warps % 4):
        raise ValueError(f"the warp-specialized mma.sync kernel needs >= 2 ring slots (stages) and whole warpgroups "
                         f"of MMA warps (warps a multiple of 4); got stages={stages}, warps={warps}")
    if halves not in (1, 2) or (halves == 2 and (not specialized or warps != 4)):
        raise ValueError(f"halves 2 (two halves of K a program) is a form of the warp-specialized kernel with 4 MMA "
                         f"warps a half; got halves={halves}, specialized={specialized}, warps={warps}")
    if pdl not in (0, 1, 2) or (pdl and not specialized):
        raise ValueError(f"pdl (a programmatic dependent launch: 1 or 2) is a form of the warp-specialized kernel; got "
                         f"pdl={pdl}, specialized={specialized}")
    smem = halves * ws_smem_bytes(block_n, block_m, step, stages, group)  # the warp-specialized kernel's rings
    if specialized and smem > SMEM_BYTES:
        raise ValueError(f"the warp-specialized mma.sync kernel's rings ({halves} x {stages} slots of {step} blocks "
                         f"for {block_n} rows x {block_m} tokens) exceed an SM's {SMEM_BYTES // 1024} KB of shared "
                         f"memory: fewer stages or blocks a trip")
    if not qweight.is_contiguous():
        raise ValueError("the mma.sync kernel reads the codes as contiguous int32 words")
    f16 = x2.dtype == torch.float16
    gather = block_m >= X_GATHER_MIN_M if gather is None else gather
    if natural:
        gather = X_NATURAL
    elif wgmma:
        x2, gather = permute_x_wgmma(x2), X_WGMMA
    elif gather:
        x2 = permute_x(x2)
    grid = (triton.cdiv(M, block_m) * triton.cdiv(N, block_n), split_k)
    if specialized:
        if not WG.scale_pair_fits(scales, zeros, block_n):
            raise ValueError("the warp-specialized mma.sync kernel copies a group's scales and zeros as one run: pass "
                             "a prepare_weight() result")
        if x2.stride(1) != 1 or x2.stride(0) % 8 or x2.data_ptr() % 16:
            x2 = x2.contiguous()  # bulk copies need 16-byte aligned rows
        lay = layouts(block_n, block_m, warps, wgmma, natural)
        sms = torch.cuda.get_device_properties(x2.device).multi_processor_count
        regs = ws_launch_regs(grid[0] * grid[1], warps, smem, sms, halves)
        if wgmma and block_m > 128:
            regs = max(regs, WGMMA_WIDE_REGS)
        _w4_mma_sync_ws_kernel[grid](
            *ws_descriptors(x2, qweight, scales, zeros, block_n, block_m, step), bias if bias is not None else out, out,
            ws_buf, lock, M, N, K, out.stride(0), GROUP=group, F16=f16, HAS_BIAS=bias is not None, BLOCK_N=block_n,
            BLOCK_M=block_m, SPLIT_K=split_k, STEP=step, STAGES=stages, HALVES=halves,
            HALF_REGS=ws_half_regs(regs) if halves == 2 else 0, X_PERMUTED=gather, SCALE_IN_TILE=scale_in_tile,
            W_L=lay["W_L"], X_L=lay["X_L"], MMA_L=lay["MMA_L"], OUT_L=lay["OUT_L"], C_L=lay.get("C_L"), PDL=pdl,
            num_warps=warps, maxnreg=regs, **({"launch_pdl": True} if pdl else {}))
        return out
    _w4_mma_sync_kernel[grid](
        x2, qweight.view(torch.int32), scales, zeros, bias if bias is not None else out, out, ws_buf,
        lock, M, N, K, x2.stride(0), K // 8, scales.stride(0), scales.stride(1), out.stride(0), GROUP=group,
        F16=f16, HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_M=block_m, SPLIT_K=split_k, STEP=step,
        X_PERMUTED=gather, SCALE_IN_TILE=scale_in_tile, PREFETCH=stages >= 2,
        **layouts(block_n, block_m, warps), num_warps=warps)
    return out
