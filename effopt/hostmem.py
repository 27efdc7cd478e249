"""Host allocator control: hand large freed tensors straight back to the OS where peak memory matters.

glibc serves an allocation from its heap unless it is at least the mmap threshold, and that threshold
rises (up to 32 MiB) each time a mapped block is freed. After the first few forwards, every activation
of a layer-by-layer calibration (a few MiB to tens of MiB each) comes from the heap, whose freed holes
stay resident until a malloc_trim: on SmolLM2 GPTQ with float32 forwards that fragmentation put the
peak host memory at 1383-1410 MiB where the live data peaks near 1230 MiB (results/quality.md).

`bounded_heap()` fixes the threshold at 1 MiB for a block of work, so a large tensor that does not fit
the heap's free chunks is mapped on its own and unmapped when freed instead of growing the heap: peak
RSS tracks live data. The price is a fresh, zeroed mapping per large tensor (GPTQ float32: 171-207 s
instead of 143-148 s; with bf16 forwards, GPTQ's default now, 1197 MiB in 144-192 s against 1220 MiB
in 113-131 s). Stages opt in with `host_memory: low`.

torch's transparent-huge-page allocations (THP_MEM_ALLOC_ENABLE: 2 MiB-aligned, madvise'd) make those
page faults cheaper (float32 GPTQ, one run: 190 s without them); torch reads the variable at its first
allocation, so `configure()` sets it at the start of the `effopt` command, before torch is imported.
On systems without glibc both are no-ops. EFFOPT_HOST_ALLOCATOR=default turns `configure()` off.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import sys

BOUNDED_MMAP_THRESHOLD = 1 << 20
RELAXED_MMAP_THRESHOLD = 32 << 20  # where glibc's dynamic threshold ends up (its 64-bit maximum)
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)
applied: dict = {}  # what configure() set in this process (run.json records it)


@functools.lru_cache(maxsize=None)
def _libc_function(name: str):
    """A C library function through ctypes, or None (not Linux, or a libc without it, e.g. musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL("libc.so.6"), name)
    except (OSError, AttributeError):
        return None


def _mallopt_threshold(nbytes: int) -> bool:
    """Set glibc's mmap threshold; False where there is no glibc (nothing changed)."""
    mallopt = _libc_function("mallopt")
    return mallopt is not None and mallopt(_M_MMAP_THRESHOLD, int(nbytes)) == 1


def trim_heap() -> None:
    """Return the heap's free pages to the OS (glibc keeps them resident otherwise)."""
    malloc_trim = _libc_function("malloc_trim")
    if malloc_trim is not None:
        malloc_trim(0)


def configure() -> dict:
    """Turn on torch's huge-page CPU allocations for this process unless the user chose otherwise.
    Only effective before torch is first imported. Returns what was applied."""
    if os.environ.get("EFFOPT_HOST_ALLOCATOR") != "default" and "torch" not in sys.modules:
        os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    applied.update(thp=os.environ.get("THP_MEM_ALLOC_ENABLE") == "1")
    return dict(applied)


@contextlib.contextmanager
def bounded_heap(enabled: bool = True):
    """Within the block, tensors of 1 MiB and more that the heap's free chunks cannot hold are mapped
    and unmapped on their own instead of growing the heap (peak RSS follows live data); afterwards
    the threshold goes to 32 MiB (heap reuse, where glibc's dynamic threshold settles)."""
    if not enabled or not _mallopt_threshold(BOUNDED_MMAP_THRESHOLD):
        yield False
        return
    try:
        yield True
    finally:
        _mallopt_threshold(RELAXED_MMAP_THRESHOLD)
