"""scripts/preshuffle_probe.py: its shuffled 4-bit layout is exact (interpreter), and on sm_90 (Triton's own
compiler, no GPU) its loop feeds the MMA with no shared-memory store and no PRMT, in fewer instructions than
the plain byte tile: the property results/kernels.md reports, checked against the installed Triton."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import triton

ROOT = Path(__file__).resolve().parents[2]
PROBE = ROOT / "scripts" / "preshuffle_probe.py"
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


def run_probe(interpret: bool) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    done = subprocess.run([sys.executable, str(PROBE)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    return done.stdout


def test_shuffled_layout_is_exact():
    out = run_probe(interpret=True)
    assert "shuffled: max abs error" in out and "plain: max abs error" in out


@pytest.mark.skipif(not PTXAS.exists(), reason="this Triton ships no ptxas to compile for NVIDIA GPUs")
def test_shuffled_layout_needs_no_shuffles_on_sm90():
    lines = {ln.split(" loop ")[0].strip(): ln for ln in run_probe(interpret=False).splitlines() if " loop " in ln}
    count = {name: int(re.search(r"loop +(\d+) instructions", ln).group(1)) for name, ln in lines.items()}
    lop3 = lines["shuffled + LOP3"]
    assert "STS" not in lop3 and "PRMT" not in lop3 and "LDS.64" in lop3
    assert count["shuffled + LOP3"] < count["plain bytes"]
