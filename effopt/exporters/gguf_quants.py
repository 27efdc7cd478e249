"""GGUF block encodings the `gguf` package cannot produce from effopt's data.

- `q4_k_quantize`: Q4_K (super-blocks of 256 = 8 sub-blocks of 32; per sub-block a 6-bit scale and
  a 6-bit min, both multiples of the super-block's fp16 `d` / `dmin`; w = d*sc*q - dmin*m). gguf-py
  decodes Q4_K but has no encoder. This one sets each sub-block's range by min/max (zero kept
  inside it), quantizes the 8 scales and mins to 6 bits, then rounds the weights with the
  quantized scales. It does not run llama.cpp's iterative scale search, so its error is that of
  plain RTN at this layout.
- `codes_to_q4_0`, `codes_to_q4_1`, `codes_to_q8_0`: write effopt's own integer codes (group 32)
  straight into the matching legacy block, so an effopt-quantized layer reaches llama.cpp without
  being quantized a second time (only its scales are rounded to fp16).

Block layouts follow ggml (the same ones gguf-py's dequantizers read): Q4_0 = fp16 d + 16 bytes,
byte j holding value j (low nibble) and value j+16 (high nibble), w = d*(q-8); Q4_1 = fp16 d,
fp16 m, the same nibbles, w = d*q + m; Q8_0 = fp16 d + 32 int8, w = d*x.
"""

from __future__ import annotations

import numpy as np

QK = 32
QK_K = 256


def _fp16_bytes(x: np.ndarray) -> np.ndarray:
    """float array [n] -> uint8 [n, 2] (little-endian fp16)."""
    return x.astype("<f2").reshape(-1, 1).view(np.uint8)


def _nibbles(q: np.ndarray) -> np.ndarray:
    """codes [n, 32] in 0..15 -> bytes [n, 16]: value j low nibble, value j+16 high nibble."""
    q = q.astype(np.uint8)
    return q[:, :16] | (q[:, 16:] << np.uint8(4))


def _blocks(codes: np.ndarray, scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """codes [N, K] and per-group values [N, K/32] -> ([N*K/32, 32], [N*K/32])."""
    n, k = codes.shape
    if k % QK or scales.shape != (n, k // QK):
        raise ValueError(f"expected codes [N, K] with K % 32 == 0 and one value per 32 columns, got {codes.shape}, "
                         f"{scales.shape}")
    return codes.reshape(-1, QK), scales.reshape(-1)


def codes_to_q4_0(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Symmetric 4-bit codes (zero point 8, group 32) -> Q4_0 bytes [N, K/32*18]."""
    q, d = _blocks(codes, scales)
    return np.concatenate([_fp16_bytes(d), _nibbles(q)], axis=1).reshape(codes.shape[0], -1)


def codes_to_q4_1(codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray) -> np.ndarray:
    """Asymmetric 4-bit codes (group 32): w = (q - z)*s = s*q + (-z*s) -> Q4_1 bytes [N, K/32*20]."""
    q, d = _blocks(codes, scales)
    m = (-zeros * scales).reshape(-1)
    return np.concatenate([_fp16_bytes(d), _fp16_bytes(m), _nibbles(q)], axis=1).reshape(codes.shape[0], -1)


def codes_to_q8_0(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Symmetric 8-bit codes (zero point 128, group 32) -> Q8_0 bytes [N, K/32*34]."""
    q, d = _blocks(codes, scales)
    x = (q.astype(np.int16) - 128).astype(np.int8).view(np.uint8)
    return np.concatenate([_fp16_bytes(d), x], axis=1).reshape(codes.shape[0], -1)


def _pack_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """6-bit scales and mins [n, 8] -> the 12-byte Q4_K scale field [n, 12]."""
    sc, mn = sc.astype(np.uint8), mn.astype(np.uint8)
    lo = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    mid = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
    hi = (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)
    return np.concatenate([lo, mid, hi], axis=1)


def q4_k_quantize(w: np.ndarray) -> np.ndarray:
    """Float rows [N, K] (K % 256 == 0) -> Q4_K bytes [N, K/256*144]."""
    n, k = w.shape
    if k % QK_K:
        raise ValueError(f"Q4_K needs rows that are a multiple of {QK_K}, got {k}")
    x = w.astype(np.float32).reshape(-1, 8, QK)
    lo = np.minimum(x.min(-1), 0.0)
    hi = np.maximum(x.max(-1), 0.0)
    scale, minimum = (hi - lo) / 15.0, -lo  # per sub-block, before 6-bit quantization
    d = (scale.max(-1) / 63.0).astype(np.float16).astype(np.float32)
    dmin = (minimum.max(-1) / 63.0).astype(np.float16).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d[:, None] > 0, np.rint(scale / d[:, None]), 0).clip(0, 63)
        mn = np.where(dmin[:, None] > 0, np.rint(minimum / dmin[:, None]), 0).clip(0, 63)
        step = (d[:, None] * sc)[..., None]
        offset = (dmin[:, None] * mn)[..., None]
        q = np.where(step > 0, np.rint((x + offset) / step), 0).clip(0, 15).astype(np.uint8)
    # qs: for each pair of sub-blocks (2j, 2j+1), 32 bytes: low nibble from 2j, high nibble from 2j+1
    qs = (q[:, 0::2, :] | (q[:, 1::2, :] << np.uint8(4))).reshape(-1, 128)
    blocks = np.concatenate([_fp16_bytes(d), _fp16_bytes(dmin), _pack_scales(sc, mn), qs], axis=1)
    return blocks.reshape(n, -1)
