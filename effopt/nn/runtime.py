"""Runtime options: what a compressed model needs at inference beyond its weights.

A stage records them in `ctx.runtime` (saved with checkpoints and exports); `use_runtime` applies
them around evaluation, benchmarks and generation: `kv_cache` (effopt/nn/kv_cache.py) and
`semi_structured` (effopt/nn/semi_structured.py).
"""

from __future__ import annotations

import contextlib
from typing import Iterator


@contextlib.contextmanager
def use_runtime(model, runtime: dict | None) -> Iterator[None]:
    """Apply every runtime option of `runtime` to `model` inside the block (no-op without any)."""
    from effopt.nn.kv_cache import use_kv_runtime
    from effopt.nn.semi_structured import use_semi_structured

    with use_kv_runtime(model, runtime), use_semi_structured(model, runtime):
        yield
