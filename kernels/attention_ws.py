"""Flash-attention forward on Hopper, warp-specialized and on wgmma, written in Gluon (EFFOPT_ATTN_WS=0: left out).

Why: the Triton forward (`kernels.attention._attn_fwd`) runs 0.80x the cuDNN SDPA backend at 16k causal tokens
on an H200 (results/kernels.md), and Triton 3.6's automatic warp specialization stops on it with an assertion;
the overlapped form below runs 1.08x cuDNN there (1.18x with 8 KV heads).
This kernel says in Gluon what FlashAttention-3 does by hand:

  * one producer warp brings the program's Q tile once, then each K and V tile by bulk (TMA) copies into a ring
    of STAGES slots, K and V with their own `ready` barriers so QK^T can start before V lands;
  * two warpgroups of MMA warps (8 warps, 64 query rows each) compute S = Q K^T with both operands in shared
    memory, the online softmax in registers (the exponent in base 2, the scale folded in), and O += P V with P
    as wgmma's register A operand (no trip through shared memory), then free the slot;
  * the mask is applied only on the tiles that need it (the causal diagonal, a window's edge, the last partial
    tile), the rest run mask-free; causal programs start with the longest rows, so the last wave is short.

`_attn_fwd_ws_overlap_kernel` adds FlashAttention-3's two overlaps: each warpgroup is its own partition and frees
a slot on its own (so one can run its softmax while the other runs its MMAs; the 8-warp form above syncs both
every tile), and within a warpgroup tile j's QK^T is issued, then tile j - 1's P V, and tile j's softmax runs
while P V is on the tensor cores. A slot's K is freed once its scores are in, a tile before its V, so the next
K copy has a whole tile's time to land (freeing both together left it none: 0.96x cuDNN at 16k causal against
1.08x). With `pingpong` the two warpgroups also take turns to issue their MMAs (FlashAttention-3's schedule):
kept as a candidate, it was slower causal and within 3% either way without the mask on an H200.

Q, K, V and O are [B, H, S, D] with D 64 or 128; Q, K and V are read through 2-D descriptors over their
contiguous [B * H * S, D] views (inputs are made contiguous first): a tile that runs past a head's last key
reads the next head's rows (or zeros past the tensor), which the mask drops (-inf scores, zero weights).
GPU only (the Triton interpreter does not run Gluon); tests/kernels/test_attention_ws.py checks it on a GPU
against the torch reference and compiles it for sm_90 offline.
"""
import os

import torch
import triton

from kernels import qmatmul_wgmma as WG

LOG2E = 1.4426950408889634
ENABLED = os.environ.get("EFFOPT_ATTN_WS", "1") != "0"  # the tuner's candidates on Hopper (timed on an H200)
BLOCK_M = 128  # query rows a program: 64 a warpgroup
BLOCK_N = 128  # keys a tile
WARPS = 8  # two warpgroups of MMA warps
# one program an SM: 12 warps (the MMA warps and the producer's warpgroup) at 168 registers at launch; setmaxnreg
# then leaves the producers 24 and gives the MMA warps 240 (sm_90 SASS: no spills, 164 KB of shared memory at D=128)
LAUNCH_REGS = 168
OVERLAP_MMA_REGS = triton.language.constexpr(240)  # the overlapped kernel's second warpgroup (a worker): the same

if WG.HAVE_GLUON:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, warpgroup_mma,
                                                                  warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    @gluon.jit
    def _attn_fwd_ws_kernel(q_desc, k_desc, v_desc, o_ptr, lse_ptr, qk_scale, Sq, Skv, H, GROUP, WINDOW,
                            stride_ob, stride_oh, stride_om,
                            HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                            STAGES: gl.constexpr, CAUSAL: gl.constexpr, HAS_WINDOW: gl.constexpr,
                            S_L: gl.constexpr, O_L: gl.constexpr, ST_L: gl.constexpr):
        """O = softmax(Q K^T * scale + mask) V for BLOCK_M queries of one (batch, head); LSE in log2 units
        (`kernels.attention._attn_fwd`'s contract)."""
        pid_m, bh, first, last, lo, n_tiles = _tile_keys(Sq, Skv, WINDOW, BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW)
        b = bh // H
        h = bh % H
        # a slot's empty barriers: one arrival from the one consumer partition, after every MMA warp is past it
        q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, k_empty, v_empty = _ring(
            q_desc, k_desc, v_desc, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, 1)

        q_row = bh * Sq + pid_m * BLOCK_M  # rows of the [B * H * Sq, D] view
        kv_row = (b * (H // GROUP) + h // GROUP) * Skv + lo
        acc, l_i, m_i = gl.warp_specialize([
            (_fwd_consume, (q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, k_empty, v_empty, n_tiles, lo, first,
                            last, Skv, qk_scale, WINDOW, CAUSAL, HAS_WINDOW, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, S_L,
                            O_L)),
            (_fwd_produce, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, k_empty, v_empty,
                            q_row, kv_row, n_tiles, BLOCK_N, STAGES, 0)),
        ], [1], [24])

        _store_rows(acc, l_i, m_i, o_ptr + b * stride_ob + h * stride_oh, lse_ptr + bh * Sq, pid_m * BLOCK_M, Sq,
                    stride_om, BLOCK_M, HEAD_DIM, S_L, O_L, ST_L)

    @gluon.jit
    def _fwd_produce(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, k_empty, v_empty,
                     q_row, kv_row, n_tiles, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, ONE: gl.constexpr):
        """The producer warp: the Q tile once, then key tile i's K and V into slot i % STAGES, each once its part of
        the slot is free (with ONE, at least one tile: the consumers mask it out when the range is empty)."""
        mbarrier.expect(q_bar.index(0), q_desc.block_type.nbytes)
        WG._tma_load(q_desc, [q_row, 0], q_bar.index(0), q_smem)
        for i in range(gl.maximum(n_tiles, ONE)):
            slot = i % STAGES
            free = ((i // STAGES) & 1) ^ 1  # a fresh barrier: the first pass is free
            row = kv_row + i * BLOCK_N
            mbarrier.wait(k_empty.index(slot), free)
            mbarrier.expect(k_ready.index(slot), k_desc.block_type.nbytes)
            WG._tma_load(k_desc, [row, 0], k_ready.index(slot), k_smem.index(slot))
            mbarrier.wait(v_empty.index(slot), free)
            mbarrier.expect(v_ready.index(slot), v_desc.block_type.nbytes)
            WG._tma_load(v_desc, [row, 0], v_ready.index(slot), v_smem.index(slot))

    @gluon.jit
    def _fwd_consume(q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, k_empty, v_empty, n_tiles, lo, first, last,
                     Skv, qk_scale, WINDOW, CAUSAL: gl.constexpr, HAS_WINDOW: gl.constexpr, BLOCK_M: gl.constexpr,
                     BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr, S_L: gl.constexpr,
                     O_L: gl.constexpr):
        """The MMA warps: per key tile, S = Q K^T, the online softmax, O += P V (P from registers), free the slot."""
        P_L: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=O_L, k_width=2)
        ROW_S: gl.constexpr = gl.SliceLayout(1, S_L)
        pos = first + gl.arange(0, BLOCK_M, layout=ROW_S)  # key position of each query row
        offs_n = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, S_L))
        m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, ROW_S)
        l_i = gl.zeros([BLOCK_M], gl.float32, ROW_S)
        acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, O_L)
        mbarrier.wait(q_bar.index(0), 0)
        for i in range(n_tiles):
            slot = i % STAGES
            phase = (i // STAGES) & 1
            start = lo + i * BLOCK_N
            mbarrier.wait(k_ready.index(slot), phase)
            s = warpgroup_mma(q_smem, k_smem.index(slot).permute((1, 0)),
                              gl.zeros([BLOCK_M, BLOCK_N], gl.float32, S_L), use_acc=False, is_async=True)
            s = warpgroup_mma_wait(0, deps=[s])  # raw scores: the scale goes into the max and the exponent
            s = _mask_scores(s, start, pos, offs_n, Skv, first, last, WINDOW, 1, CAUSAL, HAS_WINDOW, BLOCK_N)
            p, m_new, l_i, alpha = _softmax_step(s, m_i, l_i, qk_scale)
            acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, O_L))[:, None]
            pa = gl.convert_layout(p.to(v_smem.dtype), P_L)
            mbarrier.wait(v_ready.index(slot), phase)
            acc = warpgroup_mma(pa, v_smem.index(slot), acc, is_async=True)
            acc = warpgroup_mma_wait(0, deps=[acc])
            m_i = m_new
            WG._barrier()  # every MMA warp is past this slot's K and V
            mbarrier.arrive(k_empty.index(slot))
            mbarrier.arrive(v_empty.index(slot))
        return acc, l_i, m_i

    @gluon.jit
    def _attn_fwd_ws_overlap_kernel(q_desc, k_desc, v_desc, o_ptr, lse_ptr, qk_scale, Sq, Skv, H, GROUP, WINDOW,
                                    stride_ob, stride_oh, stride_om,
                                    HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                                    STAGES: gl.constexpr, CAUSAL: gl.constexpr, HAS_WINDOW: gl.constexpr,
                                    PINGPONG: gl.constexpr, S_L: gl.constexpr, O_L: gl.constexpr,
                                    ST_L: gl.constexpr):
        """`_attn_fwd_ws_kernel` with FlashAttention-3's two overlaps: each warpgroup is its own partition (rows
        0-63 and 64-127 of the tile, each freeing a slot on its own, so one can run its softmax while the other
        runs its MMAs), and within a warpgroup tile i's P V runs on the tensor cores while tile i + 1's softmax
        runs (its QK^T issued first). PINGPONG adds FlashAttention-3's warpgroup schedule: the two warpgroups take
        turns to issue a tile's MMAs, so one's softmax runs while the other's MMAs do. Layouts are one
        warpgroup's (64 rows)."""
        pid_m, bh, first, last, lo, n_tiles = _tile_keys(Sq, Skv, WINDOW, BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW)
        b = bh // H
        h = bh % H
        turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())  # PINGPONG: whose turn
        mbarrier.init(turn.index(0), count=1)
        mbarrier.init(turn.index(1), count=1)
        # a slot's empty barriers: one arrival from each warpgroup's partition, once it is past that K or V
        q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, k_empty, v_empty = _ring(
            q_desc, k_desc, v_desc, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, 2)

        q_row = bh * Sq + pid_m * BLOCK_M
        kv_row = (b * (H // GROUP) + h // GROUP) * Skv + lo
        o_base = o_ptr + b * stride_ob + h * stride_oh
        lse_base = lse_ptr + bh * Sq
        gl.warp_specialize([
            (_fwd_consume_overlap, (q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, k_empty, v_empty, turn, n_tiles,
                                    lo, first, last, Skv, Sq, qk_scale, WINDOW, o_base, lse_base, pid_m * BLOCK_M,
                                    stride_om, 0, CAUSAL, HAS_WINDOW, PINGPONG, BLOCK_M // 2, BLOCK_N, HEAD_DIM,
                                    STAGES, S_L, O_L, ST_L)),
            (_fwd_consume_overlap, (q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, k_empty, v_empty, turn, n_tiles,
                                    lo, first, last, Skv, Sq, qk_scale, WINDOW, o_base, lse_base, pid_m * BLOCK_M,
                                    stride_om, 1, CAUSAL, HAS_WINDOW, PINGPONG, BLOCK_M // 2, BLOCK_N, HEAD_DIM,
                                    STAGES, S_L, O_L, ST_L)),
            (_fwd_produce, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, k_empty, v_empty,
                            q_row, kv_row, n_tiles, BLOCK_N, STAGES, 1)),
        ], [4, 1], [OVERLAP_MMA_REGS, 24])

    @gluon.jit
    def _fwd_consume_overlap(q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, k_empty, v_empty, turn, n_tiles, lo,
                             first, last, Skv, Sq, qk_scale, WINDOW, o_base, lse_base, m0, stride_om,
                             WGI: gl.constexpr, CAUSAL: gl.constexpr, HAS_WINDOW: gl.constexpr,
                             PINGPONG: gl.constexpr, ROWS: gl.constexpr, BLOCK_N: gl.constexpr,
                             HEAD_DIM: gl.constexpr, STAGES: gl.constexpr, S_L: gl.constexpr, O_L: gl.constexpr,
                             ST_L: gl.constexpr):
        """Warpgroup WGI's ROWS query rows: tile 0's scores and softmax, then per tile j: issue QK^T of j, issue P V
        of j - 1, wait for the scores, mask and softmax of j while P V runs, wait for it, free K of j and V of
        j - 1, rescale O; last, P V of the last tile and the rows' O and LSE. K is freed a tile before V so the
        producer's next K copy has a whole tile's time to land. An empty key range runs one tile, fully masked (a
        loop known to run keeps ptxas from waiting for every wgmma)."""
        P_L: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=O_L, k_width=2)
        ROW_S: gl.constexpr = gl.SliceLayout(1, S_L)
        q = q_smem.slice(WGI * ROWS, ROWS, dim=0)
        pos = first + WGI * ROWS + gl.arange(0, ROWS, layout=ROW_S)  # key position of each query row
        offs_n = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, S_L))
        valid = (n_tiles > 0).to(gl.int32)
        n_run = gl.maximum(n_tiles, 1)
        l_i = gl.zeros([ROWS], gl.float32, ROW_S)
        acc = gl.zeros([ROWS, HEAD_DIM], gl.float32, O_L)
        mbarrier.wait(q_bar.index(0), 0)
        mbarrier.wait(k_ready.index(0), 0)
        s = warpgroup_mma(q, k_smem.index(0).permute((1, 0)), gl.zeros([ROWS, BLOCK_N], gl.float32, S_L),
                          use_acc=False, is_async=True)
        s = warpgroup_mma_wait(0, deps=[s])
        WG._barrier()  # this warpgroup is past K of tile 0
        mbarrier.arrive(k_empty.index(0))
        s = _mask_scores(s, lo, pos, offs_n, Skv, first + WGI * ROWS, last, WINDOW, valid, CAUSAL, HAS_WINDOW,
                         BLOCK_N)
        p, m_i, l_i, alpha = _softmax_step(s, gl.full([ROWS], float("-inf"), gl.float32, ROW_S), l_i, qk_scale)
        pa = gl.convert_layout(p.to(v_smem.dtype), P_L)
        for j in range(1, n_run):
            slot = j % STAGES
            prev = (j - 1) % STAGES
            mbarrier.wait(k_ready.index(slot), (j // STAGES) & 1)
            if PINGPONG:  # warpgroup 0's first turn is free (a fresh barrier), warpgroup 1 waits for its arrival
                mbarrier.wait(turn.index(WGI), ((j - 1) & 1) ^ (1 - WGI))
            s = warpgroup_mma(q, k_smem.index(slot).permute((1, 0)), gl.zeros([ROWS, BLOCK_N], gl.float32, S_L),
                              use_acc=False, is_async=True)
            mbarrier.wait(v_ready.index(prev), ((j - 1) // STAGES) & 1)
            acc = warpgroup_mma(pa, v_smem.index(prev), acc, is_async=True)
            if PINGPONG:
                mbarrier.arrive(turn.index(1 - WGI))
            s = warpgroup_mma_wait(1, deps=[s])  # the scores are in; P V may still run
            s = _mask_scores(s, lo + j * BLOCK_N, pos, offs_n, Skv, first + WGI * ROWS, last, WINDOW, valid, CAUSAL,
                             HAS_WINDOW, BLOCK_N)
            p, m_i, l_i, alpha = _softmax_step(s, m_i, l_i, qk_scale)
            acc = warpgroup_mma_wait(0, deps=[acc])
            WG._barrier()  # this warpgroup is past K of tile j and V of tile j - 1
            mbarrier.arrive(k_empty.index(slot))
            mbarrier.arrive(v_empty.index(prev))
            acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, O_L))[:, None]
            pa = gl.convert_layout(p.to(v_smem.dtype), P_L)
        tail = (n_run - 1) % STAGES
        mbarrier.wait(v_ready.index(tail), ((n_run - 1) // STAGES) & 1)
        acc = warpgroup_mma(pa, v_smem.index(tail), acc, is_async=True)
        acc = warpgroup_mma_wait(0, deps=[acc])
        _store_rows(acc, l_i, m_i, o_base, lse_base, m0 + WGI * ROWS, Sq, stride_om, ROWS, HEAD_DIM, S_L, O_L, ST_L)

    @gluon.jit
    def _tile_keys(Sq, Skv, WINDOW, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr,
                   HAS_WINDOW: gl.constexpr):
        """This program's query tile pid_m (causal: the longest rows first, so the last wave is short), its
        (batch, head) bh, the key positions of its first and last rows, and its key tiles [lo, lo + n_tiles *
        BLOCK_N)."""
        pid_m = gl.program_id(0)
        if CAUSAL:
            pid_m = gl.num_programs(0) - 1 - pid_m
        first = pid_m * BLOCK_M + (Skv - Sq)
        last = first + BLOCK_M - 1
        hi = Skv
        if CAUSAL:
            hi = gl.minimum(Skv, gl.maximum(last + 1, 0))
        lo = 0
        if HAS_WINDOW:
            lo = (gl.maximum(first - WINDOW + 1, 0) // BLOCK_N) * BLOCK_N
        return pid_m, gl.program_id(1), first, last, lo, gl.cdiv(gl.maximum(hi - lo, 0), BLOCK_N)

    @gluon.jit
    def _ring(q_desc, k_desc, v_desc, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
              STAGES: gl.constexpr, RELEASES: gl.constexpr):
        """The Q tile and a ring of STAGES K / V slots in shared memory, with their initialised barriers: Q's, and
        each slot's K and V `ready` (the producer's arrival with the copies' bytes) and K and V `empty` (RELEASES
        arrivals each: a slot's K is freed as soon as its scores are in, while its V may still be read)."""
        q_smem = gl.allocate_shared_memory(q_desc.dtype, [BLOCK_M, HEAD_DIM], q_desc.layout)
        k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES, BLOCK_N, HEAD_DIM], k_desc.layout)
        v_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES, BLOCK_N, HEAD_DIM], v_desc.layout)
        q_bar = gl.allocate_shared_memory(gl.int64, [1, 1], mbarrier.MBarrierLayout())
        k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        mbarrier.init(q_bar.index(0), count=1)
        for j in gl.static_range(STAGES):
            mbarrier.init(k_ready.index(j), count=1)
            mbarrier.init(v_ready.index(j), count=1)
            mbarrier.init(k_empty.index(j), count=RELEASES)
            mbarrier.init(v_empty.index(j), count=RELEASES)
        fence_async_shared()  # the initialised barriers, visible to the copy engine
        return q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, k_empty, v_empty

    @gluon.jit
    def _store_rows(acc, l_i, m_i, o_base, lse_base, row0, Sq, stride_om, ROWS: gl.constexpr,
                    HEAD_DIM: gl.constexpr, S_L: gl.constexpr, O_L: gl.constexpr, ST_L: gl.constexpr):
        """Rows row0 .. row0 + ROWS of one head: O = acc / l in 16-byte stores, and the LSE (log2 units); a row
        with no visible key gets O = 0. Rows past Sq are dropped."""
        l_safe = gl.where(l_i == 0.0, 1.0, l_i)
        rows_s = row0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, S_L))
        gl.store(lse_base + rows_s, m_i + gl.log2(l_safe), mask=rows_s < Sq)
        o = acc / gl.convert_layout(l_safe, gl.SliceLayout(1, O_L))[:, None]
        o = gl.convert_layout(o.to(o_base.dtype.element_ty), ST_L)
        rows = row0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, ST_L))
        cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, ST_L))
        gl.store(o_base + rows[:, None] * stride_om + cols[None, :], o, mask=(rows < Sq)[:, None])

    @gluon.jit
    def _mask_scores(s, start, pos, offs_n, Skv, first, last, WINDOW, valid, CAUSAL: gl.constexpr,
                     HAS_WINDOW: gl.constexpr, BLOCK_N: gl.constexpr):
        """Scores of key tile `start` with the keys each row may not see at -inf, on the tiles that have any: the
        causal diagonal, a window's edge, the last partial tile (and every key when not `valid`)."""
        need = (start + BLOCK_N > Skv) | (valid == 0)
        if CAUSAL:
            need = need | (start + BLOCK_N - 1 > first)
        if HAS_WINDOW:
            need = need | (start <= last - WINDOW)
        if need:
            cols = start + offs_n
            keep = gl.broadcast(((cols < Skv) & (valid != 0))[None, :], pos[:, None] >= 0)[0]  # [rows, keys]
            if CAUSAL:
                keep = keep & (cols[None, :] <= pos[:, None])
            if HAS_WINDOW:
                keep = keep & (cols[None, :] > pos[:, None] - WINDOW)
            s = gl.where(keep, s, float("-inf"))
        return s

    @gluon.jit
    def _softmax_step(s, m_i, l_i, qk_scale):
        """The online softmax over raw scores s: (p, the new row max, the new row sum, the factor on the old O),
        in base 2 with the scale folded into the max and the exponent (one FMA a score)."""
        m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)  # scale > 0: the max of the scaled scores
        m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen no key yet
        p = gl.exp2(s * qk_scale - m_safe[:, None])
        alpha = gl.exp2(m_i - m_safe)
        return p, m_new, l_i * alpha + gl.sum(p, 1), alpha


def layouts(head_dim: int, warps: int = WARPS) -> dict:
    """Register layouts: S [rows, BLOCK_N] and O [rows, head_dim] as wgmma accumulators of `warps` // 4
    warpgroups (64 rows each), and a blocked layout for O's 16-byte stores."""
    return dict(S_L=gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[warps, 1], instr_shape=[16, BLOCK_N, 16]),
                O_L=gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[warps, 1],
                                              instr_shape=[16, head_dim, 16]),
                ST_L=gl.BlockedLayout([1, 8], [32 * 8 // head_dim, head_dim // 8], [warps, 1], [1, 0]))


def smem_layout() -> "gl.NVMMASharedLayout":
    """Q, K and V tiles: 16-bit rows with the 128-byte swizzle (wgmma's operand layout)."""
    return gl.NVMMASharedLayout(128, 16)


def available(q) -> bool:
    """Gluon present, a Hopper GPU, fp16 / bf16, head dim 64 or 128."""
    return (WG.HAVE_GLUON and q.is_cuda and torch.cuda.get_device_capability(q.device)[0] == 9
            and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] in (64, 128))


def forward(q, k, v, causal: bool, sm_scale: float, window, o=None, lse=None, stages: int = 2,
            overlap: bool = False, pingpong: bool = False):
    """`kernels.attention._attn_forward`'s contract: o [B, H, Sq, D] and lse [B*H, Sq] (log2 units). overlap:
    `_attn_fwd_ws_overlap_kernel` (each warpgroup its own partition, P V overlapping the next softmax); pingpong
    (with overlap): its warpgroups take turns to issue their MMAs."""
    if pingpong and not overlap:
        raise ValueError("pingpong is a schedule of the overlapped kernel: pass overlap=True with it")
    B, H, Sq, D = q.shape
    Hkv, Skv = k.shape[1], k.shape[2]
    if D not in (64, 128):
        raise ValueError(f"the warp-specialized attention forward takes head dim 64 or 128; got {D}")
    q2, k2, v2 = (t.contiguous().view(-1, D) for t in (q, k, v))  # [B * heads * S, D] views
    if o is None:
        o = torch.empty(B, H, Sq, D, device=q.device, dtype=q.dtype)
        lse = torch.empty(B * H, Sq, device=q.device, dtype=torch.float32)
    lay = smem_layout()
    q_desc = TensorDescriptor(q2, list(q2.shape), [D, 1], [BLOCK_M, D], lay)
    k_desc = TensorDescriptor(k2, list(k2.shape), [D, 1], [BLOCK_N, D], lay)
    v_desc = TensorDescriptor(v2, list(v2.shape), [D, 1], [BLOCK_N, D], lay)
    kernel, warps = (_attn_fwd_ws_overlap_kernel, 4) if overlap else (_attn_fwd_ws_kernel, WARPS)
    extra = dict(PINGPONG=pingpong) if overlap else {}
    kernel[(triton.cdiv(Sq, BLOCK_M), B * H)](
        q_desc, k_desc, v_desc, o, lse, sm_scale * LOG2E, Sq, Skv, H, H // Hkv, window or 0,
        o.stride(0), o.stride(1), o.stride(2), HEAD_DIM=D, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, STAGES=stages,
        CAUSAL=causal, HAS_WINDOW=bool(window), **extra, **layouts(D, warps), num_warps=warps, maxnreg=LAUNCH_REGS)
    return o, lse
