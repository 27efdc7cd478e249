"""The tuner's choice, with GPU timing replaced by a table (CPU): fastest wins, a later candidate that
cannot launch is skipped, a default that cannot launch is an error."""
import math

import pytest
import torch

from kernels import _tune

MS = {"default": 3.0, "broken": 0.5, "fast": 1.0, "slow": 5.0}


@pytest.fixture
def timed_on_table(monkeypatch):
    monkeypatch.setattr(_tune, "interpreting", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)

    def gpu_ms(fn):
        return fn()
    monkeypatch.setattr(_tune, "gpu_ms", gpu_ms)
    yield
    for table in (_tune._CHOSEN, _tune.TIMINGS):  # only this file's keys: a GPU run keeps its real picks
        for key in [k for k in table if k[0] == "test-tune"]:
            del table[key]


def run(cfg):
    if cfg.startswith("broken") or cfg == "default-broken":
        raise ValueError(f"{cfg} cannot launch here")
    return MS[cfg]


def test_fastest_launchable_candidate_wins(timed_on_table):
    key = ("test-tune", 1)
    assert _tune.choose(key, ["default", "broken", "fast", "slow"], run) == "fast"
    assert dict(_tune.TIMINGS[key])["broken"] == math.inf
    assert _tune.chosen(key) == "fast"


def test_a_default_that_cannot_launch_is_an_error(timed_on_table):
    with pytest.raises(ValueError, match="default-broken"):
        _tune.choose(("test-tune", 2), ["default-broken", "fast"], run)
