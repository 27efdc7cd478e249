"""2:4 sparse linear layers on torch's semi-structured sparse tensors (sparse tensor cores, CUDA).

A 2:4 prune leaves MaskedLinear layers whose weights hold two zeros in every four consecutive
inputs. NVIDIA GPUs from sm_80 on multiply such a matrix on sparse tensor cores from a compressed
copy (the kept halves plus 2-bit position metadata), which torch exposes as
`torch.sparse.to_sparse_semi_structured` (cuSPARSELt by default; its CUTLASS kernels run on sm_8x
only). `use_semi_structured` swaps those layers for `SemiStructuredLinear` while inference runs on
CUDA and puts the originals back afterwards, so checkpoints, exports and training never see the
compressed form. It runs when the runtime option `semi_structured` is set (the prune stage's
`semi_structured: true`).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F

DTYPES = (torch.float16, torch.bfloat16)


def is_two_four(weight: torch.Tensor) -> bool:
    """Every group of 4 consecutive inputs of every row holds at least two zeros."""
    rows, cols = weight.shape
    if cols % 4:
        return False
    return bool(((weight.reshape(rows, cols // 4, 4) == 0).sum(-1) >= 2).all())


def unsupported_reason(weight: torch.Tensor) -> str | None:
    """Why `weight` cannot become a semi-structured tensor here (None: it can be tried)."""
    if not weight.is_cuda:
        return f"on {weight.device.type}: semi-structured sparse kernels run on CUDA only"
    if torch.cuda.get_device_capability(weight.device) < (8, 0):
        return "needs a GPU of compute capability 8.0 or newer (sparse tensor cores)"
    if weight.dtype not in DTYPES:
        return f"dtype {weight.dtype}: expected float16 or bfloat16"
    if not is_two_four(weight):
        return "the weight is not 2:4 sparse along its inputs"
    return None


class SemiStructuredLinear(torch.nn.Module):
    """Inference-only linear layer: `weight` is a compressed 2:4 SparseSemiStructuredTensor.

    On the H200 cuSPARSELt wins only with many tokens (1.1-1.6x cuBLAS at 1024-4096 rows of the large
    shapes, 0.3-0.7x at 1-128 rows; results/kernels.md), so when the dense weight is given too, each
    (shape, power-of-two token bucket) times both once (`kernels._tune.choose`, dense first: the pick
    inside a CUDA-graph capture) and keeps the one it timed faster (the H200 table has one cell where
    that pick was 10% slower than dense in the bench's own timing).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dense: torch.Tensor | None = None):
        super().__init__()
        reason = unsupported_reason(weight)
        if reason:
            raise ValueError(f"SemiStructuredLinear: {reason}")
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        compressed = torch.sparse.to_sparse_semi_structured(weight.detach().contiguous())
        self.weight = torch.nn.Parameter(compressed, requires_grad=False)
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach(), requires_grad=False)
        self.register_buffer("dense", None if dense is None else dense.detach(), persistent=False)

    def sparse_forward(self, x: torch.Tensor) -> torch.Tensor:
        # torch's sparse linear views x as 2-D, so it needs a contiguous input
        return F.linear(x.contiguous(), self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dense is None:
            return self.sparse_forward(x)
        from kernels._tune import choose

        rows = x.numel() // self.in_features
        key = ("2:4", x.device, x.dtype, self.out_features, self.in_features, 1 << max(rows - 1, 0).bit_length())
        path = choose(key, ("dense", "sparse"), lambda p: self._run(p, x))
        return self._run(path, x)

    def _run(self, path: str, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dense, self.bias) if path == "dense" else self.sparse_forward(x)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, 2:4 semi-structured"


def two_four_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The layers a 2:4 prune produced: MaskedLinear with pattern '2:4'."""
    from effopt.nn.masked_linear import MaskedLinear

    return {name: m for name, m in model.named_modules() if isinstance(m, MaskedLinear) and m.pattern == "2:4"}


def sparsify(model: torch.nn.Module) -> tuple[dict[str, torch.nn.Module], dict[str, str]]:
    """Swap every 2:4 layer of `model` that can run semi-structured for a SemiStructuredLinear.

    Returns ({name: the original module}, {name: why it was left dense}). A shape torch's kernels
    refuse (each dimension a multiple of its minimum tile), or a backend that cannot run on this GPU
    (torch's CUTLASS kernels are sm_8x only), is left dense with torch's message.
    """
    from effopt.nn import set_submodule

    swapped, skipped = {}, {}
    for name, layer in two_four_layers(model).items():
        weight = layer.effective_weight()
        reason = unsupported_reason(weight)
        if reason is None:
            try:
                # the dense fallback shares the layer's weight when that is already masked (no copy)
                dense = layer.weight if torch.equal(layer.weight, weight) else weight
                sparse = SemiStructuredLinear(weight, layer.bias, dense)
                sparse.sparse_forward(weight.new_zeros(1, weight.shape[1]))  # a backend may build but not run here
            except RuntimeError as e:  # shapes or GPUs the backend does not take
                reason = str(e).splitlines()[0]
        if reason:
            skipped[name] = reason
            continue
        set_submodule(model, name, sparse)
        swapped[name] = layer
    return swapped, skipped


def restore(model: torch.nn.Module, swapped: dict[str, torch.nn.Module]) -> None:
    """Put the original modules of `sparsify` back."""
    from effopt.nn import set_submodule

    for name, layer in swapped.items():
        set_submodule(model, name, layer)


@contextlib.contextmanager
def use_semi_structured(model, runtime: dict | None) -> Iterator[dict[str, str]]:
    """Inside the block, 2:4 layers run on sparse tensor cores when `runtime["semi_structured"]` is set.

    Yields {layer name: why it stayed dense} (empty when every 2:4 layer was swapped or the option is off).
    """
    if model is None or not (runtime or {}).get("semi_structured"):
        yield {}
        return
    from effopt import log

    swapped, skipped = sparsify(model)
    if skipped:
        first = next(iter(skipped.items()))
        log.warn(f"semi_structured: {len(skipped)} 2:4 layer(s) stay dense, e.g. {first[0]}: {first[1]}")
    if swapped:
        log.detail(f"semi_structured: {len(swapped)} 2:4 layer(s) on sparse tensor cores")
    try:
        yield skipped
    finally:
        restore(model, swapped)
