"""Every kernel variant the GPU path launches compiles for sm_90 (Triton's own compiler and ptxas, no GPU).

The interpreter tests run kernels without Triton's type checks, so they cannot see a kernel that fails
to compile; this runs `scripts/sass_count.py smoke` in a process without TRITON_INTERPRET."""
import pytest
from kernel_testing import PTXAS, run_script


@pytest.mark.skipif(not PTXAS.exists(), reason="this Triton ships no ptxas to compile for NVIDIA GPUs")
def test_every_kernel_variant_compiles_for_sm90():
    assert "13 of 13 kernels compile" in run_script("sass_count.py", "smoke")
