"""Bit-packing of integer codes, exactly as kernels/LAYOUT.md defines it.

Each row is a little-endian bit stream: code k occupies bits [k*b, (k+1)*b). Packing works on units
of lcm(b, 8) bits (b=3: 8 codes in 3 bytes; b=4: 2 codes in 1 byte), which is the same stream.
"""

from __future__ import annotations

import math

import torch

SUPPORTED_BITS = (2, 3, 4, 8)


def _unit(bits: int) -> tuple[int, int]:
    """(codes per unit, bytes per unit)."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    lcm = bits * 8 // math.gcd(bits, 8)
    return lcm // bits, lcm // 8


def packed_row_bytes(k: int, bits: int) -> int:
    """Bytes in a packed row of k codes."""
    return (k * bits + 7) // 8


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes [N, K] (each < 2**bits) into uint8 [N, ceil(K*bits/8)]."""
    n, k = codes.shape
    per_unit, unit_bytes = _unit(bits)
    units = -(-k // per_unit)
    padded = torch.zeros(n, units * per_unit, dtype=torch.int64, device=codes.device)
    padded[:, :k] = codes.to(torch.int64)
    padded = padded.view(n, units, per_unit)
    shifts = torch.arange(per_unit, device=codes.device, dtype=torch.int64) * bits
    words = (padded << shifts).sum(-1)  # fits in int64: at most 24 bits per unit
    byte_shifts = torch.arange(unit_bytes, device=codes.device, dtype=torch.int64) * 8
    out = ((words.unsqueeze(-1) >> byte_shifts) & 0xFF).to(torch.uint8).view(n, units * unit_bytes)
    return out[:, : packed_row_bytes(k, bits)].contiguous()


def unpack_codes(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of `pack_codes`: uint8 [N, ceil(K*bits/8)] -> uint8 codes [N, K]."""
    n, nbytes = packed.shape
    per_unit, unit_bytes = _unit(bits)
    if bits == 8:
        return packed[:, :k]
    if bits == 4:
        out = torch.stack((packed & 0xF, packed >> 4), dim=-1).view(n, nbytes * 2)
        return out[:, :k]
    units = -(-nbytes // unit_bytes)
    padded = torch.zeros(n, units * unit_bytes, dtype=torch.int64, device=packed.device)
    padded[:, :nbytes] = packed.to(torch.int64)
    padded = padded.view(n, units, unit_bytes)
    byte_shifts = torch.arange(unit_bytes, device=packed.device, dtype=torch.int64) * 8
    words = (padded << byte_shifts).sum(-1)
    shifts = torch.arange(per_unit, device=packed.device, dtype=torch.int64) * bits
    codes = (words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.view(n, units * per_unit)[:, :k].to(torch.uint8)
