"""W4A16 matmul on Hopper tensor cores with asynchronous wgmma, written in Gluon (Triton's explicit-layout
dialect): out = x @ dequant(W)^T over effopt's plain packed codes (kernels/LAYOUT.md), no extra copy.

Why Gluon: on sm_90 Triton 3.6 gives `_qmm_kernel` / `_qmm_swz_kernel` a wgmma with the weight tile as
its register operand, and waits for every wgmma before the next tile is dequantized (SASS: each HGMMA is
followed by `WARPGROUP.DEPBAR.LE gsb0, 0x0`), so the tensor cores and the dequantization take turns; the
xw kernel waits at a barrier instead (results/kernels.md, ncu: tensor cores ~27% busy at M = 128). Here
the program says what Triton's pipeliner does not:

  * each 64-code K-step's x tile, codes, scales and zeros arrive through a ring of STAGES cp.async
    slots, STAGES - 2 steps ahead, and are read one barrier after they land;
  * the warps turn the codes into (q - z) * s in x's dtype and store the tile to one of three
    shared-memory buffers;
  * one barrier, then the wgmma of this step is issued asynchronously and the wait leaves it in flight
    (`warpgroup_mma_wait(1)`), so the tensor cores multiply step k while the warps dequantize step k + 1.

Three weight buffers and ring slots refilled only after the next barrier make the buffer reuse safe
for any number of warpgroups: a buffer is rewritten two steps after the barrier that follows its
wgmma's wait in every warpgroup. The split-K finish is `_qmm_kernel`'s (the last split to arrive
sums the fp32 partials). GPU only: the Triton interpreter does not run Gluon, so the tests run it on a
GPU against the torch reference and compile it for sm_90 offline (tests/kernels/test_qmatmul_wgmma.py).

Measured on an H200 (results/kernels.md, 2026-11-30): correct, but slower than the Triton kernels at
M = 16-128 (one 4-warp program per SM cannot hide each step's chain), so the tuner offers it only with
EFFOPT_QMM_WG=1.

`_w4_wgmma_ws_kernel` is the warp-specialized form (`gl.warp_specialize`): a producer warp feeds the
ring with bulk (TMA) copies against per-slot `ready` / `empty` mbarriers, and the kernel's warps only
dequantize and multiply (150 SASS instructions a step in its consumer loop against 211, no cp.async
waits, the wgmma still asynchronous). Correct on an H200 and slower too (results/kernels.md, 2026-11-30
20:38 session: 110.4 against 77.1 µs for the best Triton kernel at M = 128, 8192x8192; slower still at 16 and 64).
"""
import torch
import triton

try:  # Gluon ships with Triton >= 3.5; without it the tuner never offers these configs
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                  warpgroup_mma_wait)
    # the cp.async copy is `async_load` from Triton 3.7 on (the old name raises there)
    _async_load = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared
    _barrier = getattr(gl, "thread_barrier", None) or gl.barrier  # renamed in Triton 3.7
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared  # likewise
    HAVE_GLUON = True
except ImportError:  # pragma: no cover - depends on the installed Triton
    HAVE_GLUON = False

BLOCK_K = 64  # codes per K-step: one 128-byte row of x per token, 32 bytes of codes per weight row


def fits(bits: int, group: int, in_features: int) -> bool:
    """4-bit codes, K a multiple of 64 and groups of whole K-steps (or one group per row)."""
    return bits == 4 and in_features % BLOCK_K == 0 and group % BLOCK_K == 0


def scales_fit(t: torch.Tensor, block_n: int) -> bool:
    """[N, G] scales / zeros the kernel can read: each group's rows contiguous and stored on past N to a
    multiple of block_n (`prepare_weight` pads them to 256 rows), so a tile copies them unmasked."""
    end = t.storage_offset() + (t.shape[1] - 1) * t.stride(1) + triton.cdiv(t.shape[0], block_n) * block_n
    return t.stride(0) == 1 and end * t.element_size() <= t.untyped_storage().nbytes()


def scale_pair_fits(scales: torch.Tensor, zeros: torch.Tensor, block_n: int) -> bool:
    """Both scales and zeros `scales_fit` a block_n-row tile, with the same strides (one offset serves both)."""
    return scales_fit(scales, block_n) and scales_fit(zeros, block_n) and zeros.stride() == scales.stride()


def available(device) -> bool:
    """Gluon present and a Hopper GPU (wgmma is sm_90 only)."""
    return HAVE_GLUON and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9


if HAVE_GLUON:

    @gluon.jit
    def _w4_wgmma_kernel(
        x_ptr, qw_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, ws_ptr, lock_ptr,
        M, N, K,
        stride_xm, stride_qn, stride_sg, stride_om,  # scales / zeros: rows contiguous (`scales_fit`)
        GROUP: gl.constexpr,  # codes per group (K for per-channel)
        OFFSET: gl.constexpr,  # 1024 (fp16 x) or 128 (bf16 x): what the PTX conversion adds to a code
        LO_ASM: gl.constexpr, HI_ASM: gl.constexpr,  # PTX: 4 bytes -> 4 x (OFFSET + low / high nibble)
        HAS_BIAS: gl.constexpr,
        BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr, SPLIT_K: gl.constexpr, STAGES: gl.constexpr,
        CODE_L: gl.constexpr, X_L: gl.constexpr, ACC_L: gl.constexpr, OUT_L: gl.constexpr,
        W_SL: gl.constexpr, X_SL: gl.constexpr, V_L: gl.constexpr, Q_SL: gl.constexpr, V_SL: gl.constexpr,
    ):
        BK: gl.constexpr = 64
        pid, pid_k, n0, m0, n_steps, it0, n_it = _tile_and_steps(M, N, K, BLOCK_N, BLOCK_M, SPLIT_K, BK)

        rows = gl.minimum(n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, CODE_L)), N - 1)
        q_ptrs = qw_ptr + rows[:, None] * stride_qn + gl.arange(0, BK // 2, layout=gl.SliceLayout(0, CODE_L))[None, :]
        v_rows = n0 + gl.arange(0, BLOCK_N, layout=V_L)  # past N: the zero padding of `qmatmul._group_major`
        s_ptrs = s_ptr + v_rows
        z_ptrs = z_ptr + v_rows
        xm = m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, X_L))
        x_ptrs = x_ptr + xm[:, None] * stride_xm + gl.arange(0, BK, layout=gl.SliceLayout(0, X_L))[None, :]
        x_ok = (xm < M)[:, None]

        dt = x_ptr.dtype.element_ty
        x_smem = gl.allocate_shared_memory(dt, [STAGES, BLOCK_M, BK], X_SL)
        q_smem = gl.allocate_shared_memory(gl.uint8, [STAGES, BLOCK_N, BK // 2], Q_SL)
        s_smem = gl.allocate_shared_memory(dt, [STAGES, BLOCK_N], V_SL)
        z_smem = gl.allocate_shared_memory(dt, [STAGES, BLOCK_N], V_SL)
        w_smem = gl.allocate_shared_memory(dt, [3, BLOCK_N, BK], W_SL)
        for i in gl.static_range(STAGES - 2):  # the first steps in flight
            _load_step(x_smem, q_smem, s_smem, z_smem, i, it0 + i, i < n_it, x_ptrs, x_ok, q_ptrs, s_ptrs, z_ptrs,
                       n_steps, stride_sg, GROUP, BK)
        async_copy.wait_group(STAGES - 3)
        _barrier()  # step 0 visible to every thread

        acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, ACC_L)
        for i in range(n_it):
            stage = i % STAGES
            w = _dequant(q_smem.index(stage).load(CODE_L), s_smem.index(stage).load(gl.SliceLayout(1, CODE_L)),
                         z_smem.index(stage).load(gl.SliceLayout(1, CODE_L)), OFFSET, LO_ASM, HI_ASM, BLOCK_N, BK)
            w_buf = w_smem.index(i % 3)
            w_buf.store(w)
            async_copy.wait_group(STAGES - 4)  # this thread's copies of steps <= i + 1 have landed
            fence_async_shared()  # the generic-proxy writes, visible to the wgmma's async proxy
            _barrier()  # all of that visible to every thread; every warpgroup past wgmma i - 2
            acc = warpgroup_mma(w_buf, x_smem.index(stage).permute((1, 0)), acc, is_async=True)
            j = i + STAGES - 2  # into the stage that step i - 2 used
            _load_step(x_smem, q_smem, s_smem, z_smem, j % STAGES, it0 + j, j < n_it, x_ptrs, x_ok, q_ptrs, s_ptrs,
                       z_ptrs, n_steps, stride_sg, GROUP, BK)
            acc = warpgroup_mma_wait(1, deps=[acc])  # wgmma i stays in flight while step i + 1 dequantizes
        acc = warpgroup_mma_wait(0, deps=[acc])
        async_copy.wait_group(0)

        _epilogue(acc, out_ptr, bias_ptr, ws_ptr, lock_ptr, pid, pid_k, n0, m0, N, M, stride_om, HAS_BIAS, BLOCK_N,
                  BLOCK_M, SPLIT_K, OUT_L)

    @gluon.jit
    def _w4_wgmma_ws_kernel(
        x_ptr, qw_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, ws_ptr, lock_ptr,
        M, N, K, GROUPS,
        stride_xm, stride_qn, stride_sg, stride_om,
        GROUP: gl.constexpr, OFFSET: gl.constexpr, LO_ASM: gl.constexpr, HI_ASM: gl.constexpr,
        HAS_BIAS: gl.constexpr,
        BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr, SPLIT_K: gl.constexpr, STAGES: gl.constexpr,
        CODE_L: gl.constexpr, ACC_L: gl.constexpr, OUT_L: gl.constexpr,
        W_SL: gl.constexpr, X_SL: gl.constexpr, QT_SL: gl.constexpr, VT_SL: gl.constexpr,
    ):
        """`_w4_wgmma_kernel` with warp specialization: one producer warp brings each K-step's x tile,
        codes, scales and zeros in with four bulk (TMA) copies counted on the slot's `ready` barrier,
        as soon as the consumers free the slot (`empty`); the kernel's warps only dequantize and issue
        the wgmma. Rows past M or N read as zeros."""
        BK: gl.constexpr = 64
        STEP_BYTES: gl.constexpr = BLOCK_M * BK * 2 + BLOCK_N * (BK // 2) + 2 * BLOCK_N * 2
        pid, pid_k, n0, m0, n_steps, it0, n_it = _tile_and_steps(M, N, K, BLOCK_N, BLOCK_M, SPLIT_K, BK)

        x_desc = tma.make_tensor_descriptor(x_ptr, [M, K], [stride_xm, 1], [BLOCK_M, BK], X_SL)
        q_desc = tma.make_tensor_descriptor(qw_ptr, [N, K // 2], [stride_qn, 1], [BLOCK_N, BK // 2], QT_SL)
        s_desc = tma.make_tensor_descriptor(s_ptr, [GROUPS, N], [stride_sg, 1], [1, BLOCK_N], VT_SL)
        z_desc = tma.make_tensor_descriptor(z_ptr, [GROUPS, N], [stride_sg, 1], [1, BLOCK_N], VT_SL)
        dt = x_ptr.dtype.element_ty
        x_smem = gl.allocate_shared_memory(dt, [STAGES, BLOCK_M, BK], X_SL)
        q_smem = gl.allocate_shared_memory(gl.uint8, [STAGES, BLOCK_N, BK // 2], QT_SL)
        s_smem = gl.allocate_shared_memory(dt, [STAGES, 1, BLOCK_N], VT_SL)
        z_smem = gl.allocate_shared_memory(dt, [STAGES, 1, BLOCK_N], VT_SL)
        w_smem = gl.allocate_shared_memory(dt, [3, BLOCK_N, BK], W_SL)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)  # the producer's arrive, with the copies' bytes
            mbarrier.init(empty.index(i), count=1)  # one consumer thread, once the slot is read
        fence_async_shared()  # the initialised barriers, visible to the copy engine

        acc, = gl.warp_specialize([
            (_ws_consume, (x_smem, q_smem, s_smem, z_smem, w_smem, ready, empty, n_it, OFFSET, LO_ASM, HI_ASM,
                           BLOCK_N, BLOCK_M, STAGES, CODE_L, ACC_L)),
            (_ws_produce, (x_desc, q_desc, s_desc, z_desc, x_smem, q_smem, s_smem, z_smem, ready, empty, it0, n_it,
                           m0, n0, GROUP, STAGES, STEP_BYTES)),
        ], [1], [24])
        _epilogue(acc, out_ptr, bias_ptr, ws_ptr, lock_ptr, pid, pid_k, n0, m0, N, M, stride_om, HAS_BIAS, BLOCK_N,
                  BLOCK_M, SPLIT_K, OUT_L)

    @gluon.jit
    def _ws_produce(x_desc, q_desc, s_desc, z_desc, x_smem, q_smem, s_smem, z_smem, ready, empty, it0, n_it, m0, n0,
                    GROUP: gl.constexpr, STAGES: gl.constexpr, STEP_BYTES: gl.constexpr):
        """The producer warp: step i's four copies into slot i % STAGES once its previous use is read."""
        BK: gl.constexpr = 64
        for i in range(n_it):
            slot = i % STAGES
            # a fresh barrier counts as having completed the phase before its first: the first pass is free
            mbarrier.wait(empty.index(slot), ((i // STAGES) & 1) ^ 1)
            bar = ready.index(slot)
            step = it0 + i
            g = (step * BK) // GROUP
            mbarrier.expect(bar, STEP_BYTES)
            _tma_load(x_desc, [m0, step * BK], bar, x_smem.index(slot))
            _tma_load(q_desc, [n0, step * (BK // 2)], bar, q_smem.index(slot))
            _tma_load(s_desc, [g, n0], bar, s_smem.index(slot))
            _tma_load(z_desc, [g, n0], bar, z_smem.index(slot))

    @gluon.jit
    def _ws_consume(x_smem, q_smem, s_smem, z_smem, w_smem, ready, empty, n_it, OFFSET: gl.constexpr,
                    LO_ASM: gl.constexpr, HI_ASM: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr,
                    STAGES: gl.constexpr, CODE_L: gl.constexpr, ACC_L: gl.constexpr):
        """The kernel's own warps: per step, dequantize into one of three weight buffers and issue the
        wgmma, leaving it in flight. A slot is freed two steps late, after the barrier that every warp
        reaches past its wait for the slot's wgmma: one elected thread arrives, and with two warpgroups
        the other's wgmma must be done too. The weight buffers are three for the same reason."""
        BK: gl.constexpr = 64
        acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, ACC_L)
        for i in range(n_it):
            slot = i % STAGES
            mbarrier.wait(ready.index(slot), (i // STAGES) & 1)
            s = s_smem.index(slot).reshape([BLOCK_N]).load(gl.SliceLayout(1, CODE_L))
            z = z_smem.index(slot).reshape([BLOCK_N]).load(gl.SliceLayout(1, CODE_L))
            w = _dequant(q_smem.index(slot).load(CODE_L), s, z, OFFSET, LO_ASM, HI_ASM, BLOCK_N, BK)
            w_buf = w_smem.index(i % 3)
            w_buf.store(w)
            fence_async_shared()
            _barrier()  # the tile stored; every warp past its wait for wgmma i - 2 (and so i - 3)
            mbarrier.arrive(empty.index((i + STAGES - 2) % STAGES), pred=i >= 2)  # step i - 2's slot
            acc = warpgroup_mma(w_buf, x_smem.index(slot).permute((1, 0)), acc, is_async=True)
            acc = warpgroup_mma_wait(1, deps=[acc])
        return (warpgroup_mma_wait(0, deps=[acc]),)  # warp_specialize returns the default partition's tuple

    @gluon.jit
    def _tile_and_steps(M, N, K, BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr, SPLIT_K: gl.constexpr,
                        BK: gl.constexpr):
        """This program's tile (features fastest, as `qmatmul._swapped_tile`) and its split's K-steps
        [it0, it0 + n_it) of n_steps (`qmatmul._split_range`; n_it may be 0 for a trailing split)."""
        pid = gl.program_id(0)
        pid_k = gl.program_id(1)
        num_n = gl.cdiv(N, BLOCK_N)
        n_steps = K // BK
        per_split = gl.cdiv(n_steps, SPLIT_K)
        it0 = pid_k * per_split
        n_it = gl.maximum(gl.minimum(it0 + per_split, n_steps) - it0, 0)
        return pid, pid_k, (pid % num_n) * BLOCK_N, (pid // num_n) * BLOCK_M, n_steps, it0, n_it

    @gluon.jit
    def _dequant(codes, s, z, OFFSET: gl.constexpr, LO_ASM: gl.constexpr, HI_ASM: gl.constexpr,
                 BLOCK_N: gl.constexpr, BK: gl.constexpr):
        """(q - z) * s of a [BLOCK_N, BK] tile from its uint8 codes [BLOCK_N, BK / 2] and per-row s, z."""
        zo = z + OFFSET  # exact: small integers in 16 bits
        lo = gl.inline_asm_elementwise(LO_ASM, "=r,=r,r", [codes], dtype=s.dtype, is_pure=True, pack=4)
        hi = gl.inline_asm_elementwise(HI_ASM, "=r,=r,r", [codes], dtype=s.dtype, is_pure=True, pack=4)
        lo = (lo - zo[:, None]) * s[:, None]  # (q - z) exact, one rounding for * s
        hi = (hi - zo[:, None]) * s[:, None]
        return gl.join(lo, hi).reshape([BLOCK_N, BK])  # byte j holds codes 2j (low nibble), 2j + 1

    @gluon.jit
    def _epilogue(acc, out_ptr, bias_ptr, ws_ptr, lock_ptr, pid, pid_k, n0, m0, N, M, stride_om,
                  HAS_BIAS: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr, SPLIT_K: gl.constexpr,
                  OUT_L: gl.constexpr):
        """Write the [BLOCK_N, BLOCK_M] tile to out[M, N]; with split-K, park the partial and let the last
        split to arrive sum them (`qmatmul._finish`)."""
        acc = gl.convert_layout(acc, OUT_L)
        offs_n = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, OUT_L))
        offs_m = m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, OUT_L))
        if SPLIT_K == 1:
            _store_out(acc, out_ptr, bias_ptr, offs_n, offs_m, N, M, stride_om, HAS_BIAS)
        else:
            offs = (gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, OUT_L))[:, None]  # features fastest, as OUT_L:
                    + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, OUT_L))[None, :] * BLOCK_N)  # whole sectors
            ws_tile = ws_ptr + pid * (SPLIT_K * BLOCK_N * BLOCK_M)
            gl.store(ws_tile + pid_k * (BLOCK_N * BLOCK_M) + offs, acc)
            _barrier()  # every thread's partial is written before the arrival is counted
            arrived = gl.atomic_add(lock_ptr + pid, 1, sem="acq_rel", scope="gpu")
            if arrived == SPLIT_K - 1:
                total = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, OUT_L)
                for sk in gl.static_range(SPLIT_K):  # .cg: read from L2, never a stale L1 line
                    total += gl.load(ws_tile + sk * (BLOCK_N * BLOCK_M) + offs, cache_modifier=".cg")
                _store_out(total, out_ptr, bias_ptr, offs_n, offs_m, N, M, stride_om, HAS_BIAS)
                gl.atomic_xchg(lock_ptr + pid, 0)  # re-arm the counter for the next launch

    @gluon.jit
    def _load_step(x_smem, q_smem, s_smem, z_smem, stage, step, valid, x_ptrs, x_ok, q_ptrs, s_ptrs, z_ptrs, n_steps,
                   stride_sg, GROUP: gl.constexpr, BK: gl.constexpr):
        """cp.async of K-step `step`'s x tile, codes, scales and zeros into ring slot `stage` (nothing
        when not `valid`: past this split's steps), as one commit group."""
        st = gl.minimum(step, n_steps - 1)
        g = (st * BK) // GROUP
        _async_load(x_smem.index(stage), x_ptrs + st * BK, mask=x_ok & valid)
        _async_load(q_smem.index(stage), q_ptrs + st * (BK // 2), mask=valid)
        _async_load(s_smem.index(stage), s_ptrs + g * stride_sg, mask=valid)
        _async_load(z_smem.index(stage), z_ptrs + g * stride_sg, mask=valid)
        async_copy.commit_group()

    @gluon.jit
    def _store_out(acc, out_ptr, bias_ptr, offs_n, offs_m, N, M, stride_om, HAS_BIAS: gl.constexpr):
        """acc is [BLOCK_N, BLOCK_M] (features x tokens); out is [M, N]."""
        if HAS_BIAS:
            acc += gl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(gl.float32)[:, None]
        ptrs = out_ptr + offs_m[None, :] * stride_om + offs_n[:, None]
        gl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=(offs_n < N)[:, None] & (offs_m < M)[None, :])


def layouts(block_n: int, block_m: int, warps: int) -> dict:
    """The kernel's register and shared-memory layouts for a [block_n rows, block_m tokens] tile."""
    return dict(
        # codes [block_n, 32 bytes]: 16 bytes a thread (one 128-bit load), 16 rows a warp
        CODE_L=gl.BlockedLayout([1, 16], [16, 2], [warps, 1], [1, 0]),
        # x [block_m, 64]: 8 elements (16 bytes, one cp.async) a thread
        X_L=gl.BlockedLayout([1, 8], [4, 8], [warps, 1], [1, 0]),
        ACC_L=gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[warps, 1], instr_shape=[16, block_m, 16]),
        # the output is [M, N] row-major: features fastest, two per thread
        OUT_L=gl.BlockedLayout([2, 1], [32, 1], [1, warps], [0, 1]),
        W_SL=gl.NVMMASharedLayout.get_default_for([block_n, BLOCK_K], gl.float16),
        X_SL=gl.NVMMASharedLayout.get_default_for([block_m, BLOCK_K], gl.float16),
        # scales / zeros of a step: block_n contiguous 16-bit values, 2 a thread (cp.async moves >= 4 bytes;
        # wider runs would have more threads copy the same values)
        V_L=gl.BlockedLayout([2], [32], [warps], [0]),
        Q_SL=gl.SwizzledSharedLayout(1, 1, 1, [1, 0]),
        V_SL=gl.SwizzledSharedLayout(1, 1, 1, [0]),
    )


def ws_layouts(block_n: int, block_m: int, warps: int) -> dict:
    """The warp-specialized kernel's layouts: `layouts`' register and MMA ones, and its copies' shared layouts."""
    lay = layouts(block_n, block_m, warps)
    return dict(CODE_L=lay["CODE_L"], ACC_L=lay["ACC_L"], OUT_L=lay["OUT_L"], W_SL=lay["W_SL"], X_SL=lay["X_SL"],
                QT_SL=gl.NVMMASharedLayout(0, 8), VT_SL=gl.NVMMASharedLayout(0, 16))


def launch(x2, qweight, scales, zeros, group: int, bias, out, ws_buf, lock, *, block_n: int, block_m: int,
           split_k: int, warps: int, stages: int, specialized: bool = False):
    """out[M, N] = x2 @ dequant(W)^T (+ bias). ws_buf / lock: split-K workspace and zeroed arrival counters
    (`qmatmul._scratch`) for cdiv(M, block_m) * cdiv(N, block_n) tiles. specialized: the warp-specialized
    kernel fed by bulk copies (`_w4_wgmma_ws_kernel`), else the cp.async one."""
    from kernels.qmatmul import _PTX_BF16_HI4, _PTX_BF16_LO4, _PTX_F16_HI4, _PTX_F16_LO4

    M, K = x2.shape
    N = qweight.shape[0]
    if stages < (3 if specialized else 4):
        raise ValueError("the wgmma kernel needs stages >= 4 (steps are loaded stages - 2 ahead and read one "
                         "barrier after they land), the warp-specialized one >= 3 (a slot is freed two steps late)")
    if not scale_pair_fits(scales, zeros, block_n):
        raise ValueError("the wgmma kernel reads a group's scales and zeros as one contiguous run padded past "
                         "the last row: pass a prepare_weight() result")
    f16 = x2.dtype == torch.float16
    tiles = triton.cdiv(M, block_m) * triton.cdiv(N, block_n)
    asm = dict(OFFSET=1024.0 if f16 else 128.0, LO_ASM=(_PTX_F16_LO4 if f16 else _PTX_BF16_LO4).value,
               HI_ASM=(_PTX_F16_HI4 if f16 else _PTX_BF16_HI4).value)
    if specialized:
        if x2.data_ptr() % 16 or x2.stride(0) % 8 or qweight.data_ptr() % 16 or scales.data_ptr() % 16 \
                or zeros.data_ptr() % 16:
            raise ValueError("the bulk copies need 16-byte aligned x rows, codes, scales and zeros")
        from kernels.attention import _set_tma_allocator

        _set_tma_allocator()  # device-side tensor descriptors take global scratch from the launcher
        _w4_wgmma_ws_kernel[(tiles, split_k)](
            x2, qweight, scales, zeros, bias if bias is not None else out, out, ws_buf, lock, M, N, K, scales.shape[1],
            x2.stride(0), qweight.stride(0), scales.stride(1), out.stride(0), GROUP=min(group, K), **asm,
            HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_M=block_m, SPLIT_K=split_k, STAGES=stages,
            **ws_layouts(block_n, block_m, warps), num_warps=warps)
        return out
    _w4_wgmma_kernel[(tiles, split_k)](
        x2, qweight, scales, zeros, bias if bias is not None else out, out, ws_buf, lock, M, N, K,
        x2.stride(0), qweight.stride(0), scales.stride(1), out.stride(0), GROUP=min(group, K), **asm,
        HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_M=block_m, SPLIT_K=split_k, STAGES=stages,
        **layouts(block_n, block_m, warps), num_warps=warps)
    return out
