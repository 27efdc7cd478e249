"""Training tests use tiny tensors: one intra-op thread is faster than two on a busy 2-core box
(small LAPACK/OpenMP calls otherwise spin on barriers)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
