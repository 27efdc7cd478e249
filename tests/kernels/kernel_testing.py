"""Shared set-up of the kernel tests; each test module imports it before `kernels`.

Kernel tests run on CUDA at real sizes when a GPU is present, else on CPU through Triton's
interpreter at small sizes. TRITON_INTERPRET must be set before the kernels are decorated, so it
is set here, at collection, and kernel modules imported earlier (e.g. by effopt) are reloaded.
(Not a conftest.py: tests/conftest.py is imported as `conftest` by other test modules, and a
second conftest module would shadow it.)"""
import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"
    for name in ("kernels._tune", "kernels.qmatmul", "kernels.attention", "kernels.fused", "kernels.int8_matmul",
                 "kernels.x_order"):
        if name in sys.modules:
            importlib.reload(sys.modules[name])

DEVICE = "cuda" if ON_GPU else "cpu"
ROOT = Path(__file__).resolve().parents[2]
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"  # compiles for sm_90 offline


def run_script(name: str, *args: str, interpret: bool = False) -> str:
    """stdout of scripts/<name> in a fresh process, under the interpreter only when `interpret` (an
    offline sm_90 compile needs it off); a non-zero exit fails the test with the script's output."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # Triton 3.9 warns when unset; 1 is what the kernels were built with
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / name), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    return done.stdout


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN anywhere in out gives NaN (and fails the test)."""
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


@pytest.fixture(autouse=True)
def poison_scratch(monkeypatch):
    """Poison the kernels' internal scratch buffers too, so an unwritten partial result shows."""
    from kernels import attention, qmatmul

    monkeypatch.setattr(qmatmul, "DEBUG_POISON", True)
    monkeypatch.setattr(attention, "DEBUG_POISON", True)
    torch.manual_seed(0)


def prmt(a: int, b: int, selector: int) -> int:
    """PTX prmt.b32 (default mode): byte i of the result is byte (selector >> 4i) & 7 of {b, a}."""
    pool = (b << 32 | a).to_bytes(8, "little")
    return int.from_bytes(bytes(pool[(selector >> 4 * i) & 7] for i in range(4)), "little")


def _half_pair(word: int, dtype: torch.dtype) -> torch.Tensor:
    """The two 16-bit floats (low half first) of a 32-bit word, as a tensor."""
    return torch.tensor([word & 0xFFFF, word >> 16], dtype=torch.int32).to(torch.int16).view(dtype)


def halves(word: int, dtype: torch.dtype) -> list:
    """The two 16-bit floats (low half first) of a 32-bit word."""
    return _half_pair(word, dtype).float().tolist()


def _sub_f16x2(a: int, b: int) -> int:
    raw = (_half_pair(a, torch.float16) - _half_pair(b, torch.float16)).view(torch.int16).to(torch.int32) & 0xFFFF
    return int(raw[0]) | int(raw[1]) << 16


def run_ptx(ptx: str, word: int) -> tuple:
    """Run one of the kernels' inline-PTX conversions on the 32-bit input $2 -> ($0, $1): the few
    instructions they use (mov / and / shr / xor / prmt on b32, sub.f16x2), in program order."""
    ops = {"mov.b32": lambda a: a[0], "and.b32": lambda a: a[0] & a[1], "shr.b32": lambda a: a[0] >> a[1],
           "xor.b32": lambda a: a[0] ^ a[1], "prmt.b32": lambda a: prmt(*a), "sub.f16x2": lambda a: _sub_f16x2(*a),
           "lop3.b32": lambda a: lop3(*a)}
    regs = {"$2": word}
    for op, dst, args in re.findall(r"^\s*([a-z0-9.]+) (\{[^}]*\}|\$?\w+), ([^;]+);", ptx, re.M):
        if op not in ops:
            raise ValueError(f"run_ptx does not know {op}")
        value = ops[op]([regs[x] if x in regs else int(x, 0) for x in (t.strip() for t in args.split(","))])
        if dst.startswith("{"):  # mov.b32 {lo, hi}, r: the two 16-bit halves
            lo, hi = (t.strip() for t in dst.strip("{}").split(","))
            regs[lo], regs[hi] = value & 0xFFFF, value >> 16
        else:
            regs[dst] = value
    return regs["$0"], regs["$1"]


def lop3(a: int, b: int, c: int, lut: int) -> int:
    """PTX lop3.b32: bit i of the result is bit (a_i << 2 | b_i << 1 | c_i) of the 8-bit table."""
    return sum(((lut >> (((a >> i) & 1) << 2 | ((b >> i) & 1) << 1 | ((c >> i) & 1))) & 1) << i for i in range(32))
