"""Pick the fastest of a few launch configurations by timing them once per shape key.

Like triton.autotune, but the candidates may be different kernels (a Triton kernel or
dequantize + cuBLAS), and a chosen config is reused for every later call with the same key.
On CPU (the interpreter) and during CUDA-graph capture nothing is timed: the first candidate,
the heuristic default, is used.
"""
import contextlib
import functools
import math
import os

import torch
import triton

_CHOSEN: dict = {}
TIMINGS: dict = {}  # key -> [(cfg, ms)], kept for the benchmark's report


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_BUFFERS: dict = {}


def device_buffer(name: str, device, numel: int, dtype, least: int, zeroed: bool = False) -> torch.Tensor:
    """A per-device buffer of at least `numel` elements (at least `least`), kept across calls and grown when
    too small; `zeroed` for counters that must start at zero (they re-arm themselves after each launch)."""
    buf = _BUFFERS.get((name, device))
    if buf is None or buf.numel() < numel:
        buf = (torch.zeros if zeroed else torch.empty)(max(numel, least), device=device, dtype=dtype)
        _BUFFERS[(name, device)] = buf
    return buf


@functools.lru_cache(maxsize=None)
def pdl_ok(device) -> bool:
    """Programmatic dependent launch (griddepcontrol) exists from sm_90 on."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (9, 0)


@contextlib.contextmanager
def mma_sync(on: bool):
    """Compile the kernels launched inside with tl.dot as mma.sync (MMA v2) instead of wgmma on sm_90.

    Triton has no per-kernel switch for this; its compiler reads DISABLE_MMA_V3 from the environment when
    it lowers a dot, so the variable is set around the launch. The kernel must also take a constexpr that
    differs between the two forms (MMA_V2), or the in-memory cache would hand back the other binary.
    Why: with the dequantized weight tile as the register operand, the mma.sync build of `_qmm_kernel` at 16
    tokens executes fewer instructions per code (sm_90 SASS: no byte gathers from shared memory) and ran 7-12%
    faster on an H200 (results/kernels.md).
    """
    if not on:
        yield
        return
    old = os.environ.get("DISABLE_MMA_V3")
    os.environ["DISABLE_MMA_V3"] = "1"
    try:
        yield
    finally:
        if old is None:
            del os.environ["DISABLE_MMA_V3"]
        else:
            os.environ["DISABLE_MMA_V3"] = old


def choose(key, candidates, run):
    """Return the fastest of `candidates` for `key`; `run(cfg)` launches one of them."""
    if key in _CHOSEN:
        return _CHOSEN[key]
    if len(candidates) == 1 or interpreting() or torch.cuda.is_current_stream_capturing():
        return candidates[0]
    timed = []
    for i, cfg in enumerate(candidates):
        try:
            ms = gpu_ms(lambda: run(cfg))
        except triton.runtime.errors.OutOfResources:  # tile does not fit this GPU's shared memory
            ms = math.inf
        except Exception:  # noqa: BLE001 - a later candidate that cannot launch here is skipped; the default must work
            if i == 0:
                raise
            ms = math.inf
        timed.append((cfg, ms))
    best = min(timed, key=lambda t: t[1])[0]
    _CHOSEN[key] = best
    TIMINGS[key] = timed
    return best


_FLUSH: dict = {}
# How the L2 is emptied between timed calls: "zero" writes a 128 MB buffer, which leaves the L2 full
# of dirty lines that drain while the candidate runs; "read" sums it, leaving clean lines, closer to
# a decode step that follows other reads. A sweep (results/kernels.md) found the "zero" tuner's
# decode picks 0-15% slower than the best config; "read" picked the same configs (2026-11-30).
FLUSH_MODE = os.environ.get("EFFOPT_TUNE_FLUSH", "zero")


def gpu_ms(fn, n: int = 8, reps: int = 3) -> float:
    """GPU milliseconds of fn() with a cold L2, without Python launch overhead.

    n calls, each after a flush of a 128 MB buffer (twice the H200's L2, see FLUSH_MODE), are
    captured in one CUDA graph and replayed; the result is the median replay time over n (it
    includes the flush, the same for every candidate, so the ranking is unaffected). Eager launches
    of Triton kernels cost tens of microseconds of CPU each, more than a small kernel runs, so
    eager timing would rank launch overhead rather than kernels.
    """
    if FLUSH_MODE not in ("zero", "read"):
        raise ValueError(f"EFFOPT_TUNE_FLUSH must be 'zero' or 'read', got {FLUSH_MODE!r}")
    dev = torch.cuda.current_device()
    if dev not in _FLUSH:
        _FLUSH[dev] = (torch.zeros(128 << 18, dtype=torch.int32, device=dev),  # 128 MB
                       torch.empty((), dtype=torch.int64, device=dev))
    flush, total = _FLUSH[dev]
    fn()  # compile and allocate outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(n):
            if FLUSH_MODE == "zero":
                flush.zero_()
            else:
                torch.sum(flush, dim=0, out=total)
            fn()
    graph.replay()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / n)
    return sorted(times)[len(times) // 2]


def chosen(key):
    """The config picked for `key`, or None."""
    return _CHOSEN.get(key)


def forget():
    """Drop every pick, so the next call of each shape is timed again (sweeps that change a setting)."""
    _CHOSEN.clear()
    TIMINGS.clear()
