"""Weight grids the activation-aware search quantizes onto: each knows its fake quantization (the
weight the stored layer will compute with) and its clipping search (clip.py).

IntGrid: integer codes with a scale and zero point per group of columns (QuantLinear);
Nf4Grid: bitsandbytes NF4, 16 normal-quantile levels times one absmax per block (Linear4bit).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from effopt.methods.quant import bnb
from effopt.methods.quant.clip import apply_clip, padded_groups, search_clip
from effopt.methods.quant.rtn import scale_zero_from_range


@dataclass(frozen=True)
class IntGrid:
    """Integer codes with a scale and zero point per group of columns (what QuantLinear stores)."""

    bits: int
    group_size: int
    symmetric: bool

    @property
    def block(self) -> int:
        """Columns per group (<= 0: the whole row)."""
        return self.group_size

    def fake_quantize(self, w: torch.Tensor) -> torch.Tensor:
        """Quantize-dequantize in float32 (the same values as rtn.fake_quantize, in fewer passes)."""
        n, k = w.shape
        groups = padded_groups(w, self.group_size)
        wmin, wmax = groups.aminmax(dim=-1, keepdim=True)
        scale, zero = scale_zero_from_range(wmin, wmax, self.bits, self.symmetric)
        q = torch.round(groups / scale).add_(zero).clamp_(0, 2**self.bits - 1)
        return q.sub_(zero).mul_(scale).view(n, -1)[:, :k]

    def search_clip(self, w: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
        """Range shrink per (row, group) on the output error (clip.search_clip)."""
        return search_clip(w, gram, self.bits, self.group_size, self.symmetric)

    def apply_clip(self, w: torch.Tensor, shrink: torch.Tensor) -> None:
        """Clamp each group in place to its shrunk range."""
        apply_clip(w, shrink, self.group_size)


@dataclass(frozen=True)
class Nf4Grid:
    """bitsandbytes NF4: 16 normal-quantile levels times the absmax of each block of weights."""

    blocksize: int = 64

    @property
    def block(self) -> int:
        """Weights per absmax block."""
        return self.blocksize

    def fake_quantize(self, w: torch.Tensor) -> torch.Tensor:
        """The weight bitsandbytes NF4 will compute with, in float32."""
        return bnb.nf4_fake_quantize(w.float(), self.blocksize)

    def search_clip(self, w: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
        """Absmax shrink per (row, block) on the output error (bnb.nf4_search_clip)."""
        return bnb.nf4_search_clip(w, gram, self.blocksize)

    def apply_clip(self, w: torch.Tensor, shrink: torch.Tensor) -> None:
        """Clamp each block in place to +-shrink * absmax."""
        bnb.nf4_apply_clip(w, shrink, self.blocksize)
