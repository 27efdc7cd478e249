"""Pick the fastest of a few launch configurations by timing them once per shape key.

Like triton.autotune, but the candidates may be different kernels (a Triton kernel or
dequantize + cuBLAS), and a chosen config is reused for every later call with the same key.
On CPU (the interpreter) and during CUDA-graph capture nothing is timed: the first candidate,
the heuristic default, is used.
"""
import math
import os

import torch
import triton

_CHOSEN: dict = {}
TIMINGS: dict = {}  # key -> [(cfg, ms)], kept for the benchmark's report


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def choose(key, candidates, run):
    """Return the fastest of `candidates` for `key`; `run(cfg)` launches one of them."""
    if key in _CHOSEN:
        return _CHOSEN[key]
    if len(candidates) == 1 or interpreting() or torch.cuda.is_current_stream_capturing():
        return candidates[0]
    timed = []
    for cfg in candidates:
        try:
            ms = triton.testing.do_bench(lambda: run(cfg), warmup=2, rep=8, return_mode="median")
        except triton.runtime.errors.OutOfResources:  # tile does not fit this GPU's shared memory
            ms = math.inf
        timed.append((cfg, ms))
    best = min(timed, key=lambda t: t[1])[0]
    _CHOSEN[key] = best
    TIMINGS[key] = timed
    return best


def chosen(key):
    """The config picked for `key`, or None."""
    return _CHOSEN.get(key)
