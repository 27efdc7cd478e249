"""x's columns put in the order a Gluon W4 kernel reads them (`kernels.qmatmul_mma`), by one Triton gather.

Each 64 columns of x [M, K] are one block of 64 codes; the kernels' code conversion yields a block's weights in a
fixed order of its 64 K positions, so x must arrive in that order too. The order is a permutation of the column
index bits; a 7-D torch permute does it in one copy, but as a generic strided copy of 2-byte elements: on an H200
it took 31 µs for x [1024, 8192] (16 MB in, 16 MB out: ~8 µs at copy bandwidth) and 52 µs at K = 14336, a
sixth of the matmul's time (results/kernels.md). This kernel reads whole rows of 64-column blocks, permutes them
in registers and writes whole rows.
"""
import torch
import triton
import triton.language as tl

from kernels._tune import interpreting

# A block's column bits are (c1, c0, j3, j2, j1, j0), the column 16c + 8 j3 + 4 j2 + 2 j1 + j0; viewed as
# [4 (c), 2 (j3), 2 (j2), 2 (j1), 2 (j0)] each order below lists the source axes of the output's axes.
SIGMA_AXES = (0, 1, 4, 3, 2)  # every 16 columns in SIGMA order: (j3, j2, j1, j0) -> (j3, j0, j1, j2)
WGMMA_AXES = (1, 4, 3, 0, 2)  # wgmma's B operand: (t1, t0, h, c1 c0, e) = (j3, j0, j1, c, j2)
ROWS, BLOCKS = 16, 4  # a program: 16 rows x 4 blocks (8 KB of fp16 in, 8 KB out)


@triton.jit
def _permute_blocks_kernel(x_ptr, out_ptr, M, K, stride_xm, ROWS: tl.constexpr, BLOCKS: tl.constexpr,
                           A0: tl.constexpr, A1: tl.constexpr, A2: tl.constexpr, A3: tl.constexpr,
                           A4: tl.constexpr):
    """out[r, 64 b + p] = x[r, 64 b + col(p)] for ROWS rows and BLOCKS 64-column blocks, col given by the axes
    A0..A4 of the [4, 2, 2, 2, 2] view of a block (K a multiple of 64, out contiguous)."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.program_id(1) * (BLOCKS * 64) + tl.arange(0, BLOCKS * 64)
    keep = (rows < M)[:, None] & (cols < K)[None, :]  # whole blocks in or out: the mask survives the permute
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xm + cols[None, :], mask=keep)
    x = tl.reshape(x, [ROWS, BLOCKS, 4, 2, 2, 2, 2])
    x = tl.permute(x, (0, 1, 2 + A0, 2 + A1, 2 + A2, 2 + A3, 2 + A4))
    x = tl.reshape(x, [ROWS, BLOCKS * 64])
    tl.store(out_ptr + rows[:, None].to(tl.int64) * K + cols[None, :], x, mask=keep)


def permute_blocks(x2: torch.Tensor, axes: tuple) -> torch.Tensor:
    """x [M, K] (K a multiple of 64) with every 64 columns reordered by `axes` (SIGMA_AXES or WGMMA_AXES), into a
    new contiguous tensor: the Triton kernel on the GPU and under the interpreter, one torch permute otherwise
    (the same function: tests compare the two)."""
    m, k = x2.shape
    if k % 64:
        raise ValueError(f"permute_blocks takes x [M, K] with K a multiple of 64; got shape {tuple(x2.shape)}")
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    if not (x2.is_cuda or interpreting()):
        return permute_blocks_torch(x2, axes)
    out = torch.empty(m, k, device=x2.device, dtype=x2.dtype)
    grid = (triton.cdiv(m, ROWS), triton.cdiv(k, BLOCKS * 64))
    _permute_blocks_kernel[grid](x2, out, m, k, x2.stride(0), ROWS=ROWS, BLOCKS=BLOCKS, A0=axes[0], A1=axes[1],
                                 A2=axes[2], A3=axes[3], A4=axes[4], num_warps=4)
    return out


def permute_blocks_torch(x2: torch.Tensor, axes: tuple) -> torch.Tensor:
    """`permute_blocks` as one torch permute (a strided copy)."""
    m, k = x2.shape
    return x2.reshape(m, k // 64, 4, 2, 2, 2, 2).permute(0, 1, *(2 + a for a in axes)).reshape(m, k)
