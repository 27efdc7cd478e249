"""scripts/preshuffle_probe.py: its shuffled 4-bit layout is exact (interpreter), and on sm_90 (Triton's own
compiler, no GPU) its loop feeds the MMA with no shared-memory store and no PRMT, in fewer instructions than
the plain byte tile: the property results/kernels.md reports, checked against the installed Triton."""
import re

import pytest
import triton
from kernel_testing import PTXAS, run_script


@pytest.mark.skipif(tuple(int(v) for v in triton.__version__.split(".")[:2]) < (3, 9),
                    reason="Triton 3.6's interpreter (the GPU image's) fails on a loop bound computed from a kernel "
                           "argument (`range(0, K // 64)`: int() of a 1-d array, with numpy 2); CI runs Triton 3.9")
def test_shuffled_layout_is_exact():
    out = run_script("preshuffle_probe.py", interpret=True)
    assert "shuffled: max abs error" in out and "plain: max abs error" in out


@pytest.mark.skipif(not PTXAS.exists(), reason="this Triton ships no ptxas to compile for NVIDIA GPUs")
def test_shuffled_layout_needs_no_shuffles_on_sm90():
    out = run_script("preshuffle_probe.py")
    lines = {ln.split(" loop ")[0].strip(): ln for ln in out.splitlines() if " loop " in ln}
    count = {name: int(re.search(r"loop +(\d+) instructions", ln).group(1)) for name, ln in lines.items()}
    lop3 = lines["shuffled + LOP3"]
    assert "STS" not in lop3 and "PRMT" not in lop3 and "LDS.64" in lop3
    assert count["shuffled + LOP3"] < count["plain bytes"]
