"""effopt.hostmem: the bounded heap really hands freed tensors back; configure() only acts before torch."""

import os
import subprocess
import sys

import pytest
import torch

from effopt import hostmem

glibc_linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt is Linux-only here")


RSS_DROP = """
import sys
import torch
from effopt import hostmem
from effopt.monitor import current_rss_bytes

torch.ones(2 << 20).sum()  # an 8 MiB mapped block, freed: glibc's dynamic threshold rises past 3 MiB
with hostmem.bounded_heap(enabled=sys.argv[1] == "bounded"):
    keep, dropped = [], []  # touched 3 MiB tensors; every other one is freed
    for i in range(40):
        (keep if i % 2 else dropped).append(torch.ones(3 << 18))
    before, freed = current_rss_bytes(), sum(t.numel() * 4 for t in dropped)
    dropped.clear()
    print(round((before - current_rss_bytes()) / freed, 3))  # share of the freed bytes that left RSS
"""


def _rss_drop(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", RSS_DROP, mode], capture_output=True, text=True, check=True)
    return float(out.stdout)


@glibc_linux
def test_bounded_heap_returns_freed_tensors_to_the_os():
    """Fresh processes, so the heap starts empty: bounded, each 3 MiB tensor is its own mapping and
    leaves RSS when freed; with glibc's risen threshold they come from the heap and stay resident
    as holes between the live ones. (Inside the block an existing heap's free chunks are still
    reused: the bound is on growth.)"""
    assert _rss_drop("bounded") > 0.8
    assert _rss_drop("default") < 0.3


@glibc_linux
def test_bounded_heap_off_is_a_no_op():
    with hostmem.bounded_heap(enabled=False) as active:
        assert active is False


def _configure_in_fresh_process(env: dict) -> str:
    code = "from effopt import hostmem; import os; print(hostmem.configure(), os.environ.get('THP_MEM_ALLOC_ENABLE'))"
    full = {k: v for k, v in os.environ.items() if k not in ("THP_MEM_ALLOC_ENABLE", "EFFOPT_HOST_ALLOCATOR")}
    return subprocess.run([sys.executable, "-c", code], env={**full, **env}, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_configure_turns_on_huge_pages_before_torch_only():
    assert _configure_in_fresh_process({}) == "{'thp': True} 1"
    assert _configure_in_fresh_process({"EFFOPT_HOST_ALLOCATOR": "default"}) == "{'thp': False} None"
    assert _configure_in_fresh_process({"THP_MEM_ALLOC_ENABLE": "0"}) == "{'thp': False} 0"
    before = os.environ.get("THP_MEM_ALLOC_ENABLE")
    hostmem.configure()  # torch is imported in this process: too late, nothing is set
    assert os.environ.get("THP_MEM_ALLOC_ENABLE") == before


def test_host_memory_option():
    from effopt.stages.quantize import AwqConfig, GptqConfig

    assert GptqConfig().host_memory == "fast" and GptqConfig(host_memory="low").host_memory == "low"
    assert AwqConfig().host_memory == "fast"
    with pytest.raises(ValueError, match="host_memory"):
        GptqConfig(host_memory="tiny")
