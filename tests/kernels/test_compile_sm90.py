"""Every kernel variant the GPU path launches compiles for sm_90 (Triton's own compiler and ptxas, no GPU).

The interpreter tests run kernels without Triton's type checks, so they cannot see a kernel that fails
to compile; this runs `scripts/sass_count.py smoke` in a process without TRITON_INTERPRET. It is also
the only CPU check of the Gluon wgmma kernels, which the interpreter cannot run."""
import pytest
from kernel_testing import PTXAS, run_script

from kernels import qmatmul_wgmma


@pytest.mark.skipif(not PTXAS.exists(), reason="this Triton ships no ptxas to compile for NVIDIA GPUs")
def test_every_kernel_variant_compiles_for_sm90():
    out = run_script("sass_count.py", "smoke")
    assert "ok      W4 matmul, Gluon wgmma, warp-specialized" in out or not qmatmul_wgmma.HAVE_GLUON
    assert "ok      W4 matmul, M=16 pick, mma.sync" in out  # compiled with mma.sync, checked in its SASS
    assert "ok      W4 matmul, Gluon mma.sync, M=16" in out or not qmatmul_wgmma.HAVE_GLUON
    assert "ok      W4 matmul, Gluon mma.sync, warp-specialized" in out or not qmatmul_wgmma.HAVE_GLUON
    assert "ok      W4 matmul, Gluon mma.sync, warp-specialized, two halves" in out or not qmatmul_wgmma.HAVE_GLUON
    assert "ok      W4 matmul, Gluon warp-specialized, wgmma" in out or not qmatmul_wgmma.HAVE_GLUON
    assert "ok      attention forward, Gluon warp-specialized" in out or not qmatmul_wgmma.HAVE_GLUON
    assert "ok      attention forward, Gluon warp-specialized, overlapped" in out or not qmatmul_wgmma.HAVE_GLUON
    assert "ok      attention forward, Gluon warp-specialized, overlapped, ping-pong" in out or \
        not qmatmul_wgmma.HAVE_GLUON
    assert "ok      W4 matmul, Gluon warp-specialized, wgmma, x as it lies" in out or not qmatmul_wgmma.HAVE_GLUON
    assert "ok      W4 matmul, Gluon mma.sync, two halves, dependent launch (weights first)" in out or \
        not qmatmul_wgmma.HAVE_GLUON
    total = 28 if qmatmul_wgmma.HAVE_GLUON else 16
    assert f"{total} of {total} kernels compile" in out
