"""Shared set-up of the kernel tests; each test module imports it before `kernels`.

Kernel tests run on CUDA at real sizes when a GPU is present, else on CPU through Triton's
interpreter at small sizes. TRITON_INTERPRET must be set before the kernels are decorated, so it
is set here, at collection, and kernel modules imported earlier (e.g. by effopt) are reloaded.
(Not a conftest.py: tests/conftest.py is imported as `conftest` by other test modules, and a
second conftest module would shadow it.)"""
import importlib
import os
import sys

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"
    for name in ("kernels._tune", "kernels.qmatmul", "kernels.attention", "kernels.fused", "kernels.int8_matmul"):
        if name in sys.modules:
            importlib.reload(sys.modules[name])

DEVICE = "cuda" if ON_GPU else "cpu"


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


def halves(word: int, dtype: torch.dtype) -> list:
    """The two 16-bit floats (low half first) of a 32-bit word."""
    raw = torch.tensor([word & 0xFFFF, word >> 16], dtype=torch.int32).to(torch.int16)
    return raw.view(dtype).float().tolist()

