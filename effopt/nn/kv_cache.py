"""KV caches for effopt's decode path, and the runtime switch that applies KV quantization.

* `StaticKVCache`: preallocated float buffers [B, H_kv, L, D], one slot per absolute position. A
  slot past a row's current length is never attended to (the mask excludes it), so rolling back
  after rejected speculative tokens is just "write there again".
* `QuantizedKVCache`: the same slots holding codes per head and per token (the vector of `head_dim`
  values of one head at one position). K is quantized after RoPE, as it is stored.
  int8: symmetric codes with one float32 scale (max|x| * fp32(1/127)) per vector, the layout of
  kernels/attention.py's int8 decode attention, which a CUDA decode step runs on (V kept [D, S] per
  head, so its products read adjacent bytes). Memory: D bytes + 4 per vector.
  int4: asymmetric, two codes per byte and a (scale, zero) pair in the model dtype per vector,
  read back through dequantize + attention. Memory: D/2 bytes + 2 scale/zero values per vector.
* `SinkKVCache`: StreamingLLM (Xiao et al., 2023, "Efficient Streaming Language Models with
  Attention Sinks"): keep the first `sink` tokens and the most recent `window` tokens; positions are
  assigned within the cache (keys are stored before RoPE and rotated with their cache index), so
  generation runs past the trained context with a bounded cache.

Each cache implements `attend(layer, q, k, v, step)`: store this step's K/V and return attention
of the queries over everything the cache holds (`Step`: positions and RoPE of one forward pass).

`use_kv_runtime(model, runtime)` (called by `effopt.nn.runtime.use_runtime`) applies
`runtime["kv_cache"]` ({"bits": 8|4, "granularity": "head_token"}) to a Hugging Face model's plain
forward passes: K/V are quantized and dequantized as the cache would store them, so perplexity
measured inside the context is the KV-quantization cost.
"""

from __future__ import annotations

import contextlib
import copy
import os
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

KV_BITS = (8, 4)
GRANULARITIES = ("head_token",)


# ----------------------------------------------------------------------------------------------
# Quantization of K/V vectors: a scale (int8) or a (scale, zero) pair (int4) per vector along the last dimension.


def quantize_kv(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, ...]:
    """Round-to-nearest of every vector along the last dim.

    Args:
        x: [..., D] float (D even for 4 bits).
        bits: 8 (symmetric) or 4 (asymmetric).

    Returns:
        8 bits: (codes int8 [..., D], scale float32 [..., 1] = max|x| * fp32(1/127)).
        4 bits: (codes uint8 [..., D/2] (low nibble = even index), scale, zero [..., 1] in x.dtype;
        zero is an integer code value).
    """
    if bits not in KV_BITS:
        raise ValueError(f"KV cache bits must be one of {KV_BITS}, got {bits}")
    xf = x.float()
    if bits == 8:
        # times fp32(1/127), not / 127: torch divides by a Python scalar through its reciprocal on CUDA
        # only, and the codes must not depend on the device (kernels.fused writes the same ones)
        scale = xf.abs().amax(-1, keepdim=True).clamp_min(1e-8) * (1.0 / 127.0)
        return torch.round(xf / scale).clamp(-127, 127).to(torch.int8), scale
    maxq = 2**bits - 1
    lo, hi = xf.amin(-1, keepdim=True), xf.amax(-1, keepdim=True)
    scale = ((hi - lo) / maxq).clamp_min(1e-8).to(x.dtype)
    zero = torch.round(-lo / scale.float()).clamp(0, maxq).to(x.dtype)
    codes = torch.clamp(torch.round(xf / scale.float()) + zero.float(), 0, maxq).to(torch.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4), scale, zero


def dequantize_kv(parts: tuple[torch.Tensor, ...], bits: int, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of `quantize_kv` (parts: what it returned): code * scale (8 bits), (code - zero) * scale (4)."""
    if bits == 8:
        codes, scale = parts
        return (codes.float() * scale).to(dtype)
    codes, scale, zero = parts
    codes = torch.stack((codes & 0xF, codes >> 4), dim=-1).flatten(-2)
    return ((codes.float() - zero.float()) * scale.float()).to(dtype)


def fake_quantize_kv(x: torch.Tensor, bits: int) -> torch.Tensor:
    """x as a quantized cache returns it (quantize then dequantize, same rounding as the cache)."""
    return dequantize_kv(quantize_kv(x, bits), bits, x.dtype)


def kv_config(runtime: dict | None) -> dict | None:
    """The validated `kv_cache` entry of a runtime dict, or None when K/V stay in float."""
    cfg = (runtime or {}).get("kv_cache")
    if not cfg:
        return None
    bits, gran = cfg.get("bits"), cfg.get("granularity", "head_token")
    if bits not in KV_BITS or gran not in GRANULARITIES:
        raise ValueError(f"runtime kv_cache: expected bits in {KV_BITS} and granularity in {GRANULARITIES}, got {cfg}")
    return {"bits": bits, "granularity": gran}


# ----------------------------------------------------------------------------------------------
# Attention over cached keys/values.

def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Scaled dot-product attention with grouped K/V heads (GQA) and a boolean keep-mask."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class Step:
    """What one forward pass tells the caches: where its T tokens go and how RoPE rotates them.

    Built once per forward (not per layer), so position-derived tensors (cos/sin rows, scatter
    indices, masks, lengths) are computed once and shared by every layer through `memo`.

    Args:
        start: [B] int64 device tensor, position of each row's first new token.
        t: new tokens per row.
        rotary: positions [B, T] -> (cos, signed sin) [B, T, D] (the decoder's RoPE table).
        kv_len: slots to attend over (None: the cache's whole capacity, as a CUDA graph needs).
    """

    def __init__(self, start: torch.Tensor, t: int, rotary: Callable, kv_len: int | None = None):
        self.start, self.t, self.kv_len, self._rotary = start, t, kv_len, rotary
        self.pos = start.view(-1, 1) + torch.arange(t, device=start.device).view(1, -1)
        self.memo: dict = {}

    def rotate(self, x: torch.Tensor, pos: torch.Tensor | None = None, head_axis: int = 2) -> torch.Tensor:
        """RoPE of x ([B, T, H, D] with head_axis 2, or [B, H, T, D] with 1) at `pos` (default: this step's).

        x * cos + rotate_half(x) * sin, with rotate_half(x) * sin written as roll(x, D/2) * signed sin.
        """
        cos, sin = self.rope_tables() if pos is None else self._rotary(pos)
        cos, sin = cos.unsqueeze(head_axis), sin.unsqueeze(head_axis)
        return x * cos + torch.roll(x, x.shape[-1] // 2, dims=-1) * sin

    def rope_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, signed sin) [B, T, D] at this step's positions, computed once per step."""
        return self.cached("rope", lambda: self._rotary(self.pos))

    def cached(self, key, make):
        """memo[key], computed by make() on first use in this step."""
        if key not in self.memo:
            self.memo[key] = make()
        return self.memo[key]

    def slot_mask(self, kv_len: int) -> torch.Tensor:
        """Boolean [B, 1, T, kv_len]: the query at position p sees slots <= p."""
        return self.cached(("mask", kv_len), lambda: (
            torch.arange(kv_len, device=self.pos.device).view(1, 1, -1) <= self.pos.unsqueeze(-1)).unsqueeze(1))


USE_KERNELS = True  # scripts flip this to time the torch path against kernels/ on CUDA
# int8 caches written by kernels.fused.rope_store_kv (RoPE + quantize + store in one launch) rather than
# ~10 torch launches a layer: H200, Llama-3-8B shapes, 164 -> 208 tok/s (results/inference.md, section 000)
FUSED_INT8_STORE = os.environ.get("EFFOPT_FUSED_INT8_STORE", "1") == "1"
MAX_KERNEL_T = 16  # steps of up to this many tokens (decode, speculative verify) use the decode kernel
_ATTENTION_KERNELS = None


def attention_kernels():
    """The kernels.attention module when it can be imported (Triton present), else None."""
    global _ATTENTION_KERNELS
    if _ATTENTION_KERNELS is None:
        try:
            from kernels import attention
        except ImportError:
            attention = False
        _ATTENTION_KERNELS = attention
    return _ATTENTION_KERNELS or None


class StaticKVCache:
    """Float K/V buffers [B, H_kv, L, D] per layer; slot index = absolute position."""

    def __init__(self, layers: int, batch: int, kv_heads: int, max_len: int, head_dim: int, dtype, device):
        shape = (batch, kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.max_len = max_len

    def _store(self, layer: int, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor) -> None:
        self.k[layer].scatter_(2, idx, k)
        self.v[layer].scatter_(2, idx, v)

    def _load(self, layer: int, kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[layer][:, :, :kv_len], self.v[layer][:, :, :kv_len]

    rotates_inside = False  # keys arrive rotated at their absolute positions

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: Step) -> torch.Tensor:
        """Store K/V at positions step.pos, attend over slots [0, step.kv_len).

        Args:
            q, k, v: [B, H, T, D] (q and k already rotated).
        """
        b, h, t, d = k.shape
        idx = step.cached(("idx", h, d), lambda: step.pos.view(b, 1, t, 1).expand(b, h, t, d))
        self._store(layer, k, v, idx)
        return self.attend_stored(layer, q, step)

    def attend_stored(self, layer: int, q: torch.Tensor, step: Step) -> torch.Tensor:
        """Attend over slots [0, step.kv_len) when this step's K/V are already in the cache (written
        by a fused kernel, kernels.fused.rope_store_kv). q: [B, H, T, D], rotated."""
        t = q.shape[2]
        if t <= MAX_KERNEL_T and self._kernel_ok(q):  # split-KV decode kernel: no mask, no GQA copies
            # causal within the step: the kernel's token i sees slots < lens - (t - 1 - i) = start + i + 1
            lens = step.cached("seqlens", lambda: (step.start + t).to(torch.int32))
            return self._decode_kernel(layer, q, lens)
        kv_len = self.max_len if step.kv_len is None else step.kv_len
        keys, values = self._load(layer, kv_len)
        return _sdpa(q, keys, values, step.slot_mask(kv_len))

    def _kernel_ok(self, q: torch.Tensor) -> bool:
        return (USE_KERNELS and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
                and self.kernel_layout and attention_kernels() is not None)

    kernel_layout = True  # the buffers are what kernels.attention's decode attention reads

    def stores_inside(self) -> bool:
        """kernels.fused.rope_store_kv can write this cache (rotation and store in one launch)."""
        return True

    def kernel_args(self, layer: int) -> dict:
        """`layer`'s buffers under the names kernels/ gives them (rope_store_kv, the decode attentions)."""
        return {"k_cache": self.k[layer], "v_cache": self.v[layer]}

    def _decode_kernel(self, layer: int, q: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
        return attention_kernels().decode_attention(q, **self.kernel_args(layer), cache_seqlens=lens)

    @staticmethod
    def _map(store: list, fn) -> list:
        """Apply fn to every tensor of a per-layer list (entries are tensors or tuples of tensors)."""
        return [tuple(fn(t) for t in e) if isinstance(e, tuple) else fn(e) for e in store]

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep only batch rows `rows` (finished sequences leave the batch), in the same memory layout."""
        self.k = self._map(self.k, lambda t: _select_rows(t, rows))
        self.v = self._map(self.v, lambda t: _select_rows(t, rows))

    def row(self, b: int) -> "StaticKVCache":
        """A view of batch row b alone (writes go to this cache): prefill rows one prompt at a time."""
        view = copy.copy(self)
        view.k = self._map(self.k, lambda t: t[b:b + 1])
        view.v = self._map(self.v, lambda t: t[b:b + 1])
        return view

    def nbytes(self) -> int:
        """Bytes allocated (every row, the whole capacity)."""
        return sum(t.numel() * t.element_size() for e in self.k + self.v for t in (e if isinstance(e, tuple) else (e,)))

    def bytes_per_token(self) -> float:
        """Bytes one position of one row takes, over all layers (K and V with their scales)."""
        return self.nbytes() / (self.max_len * self.batch_size())

    def batch_size(self) -> int:
        """Rows in the cache now."""
        first = self.k[0]
        return (first[0] if isinstance(first, tuple) else first).shape[0]


class QuantizedKVCache(StaticKVCache):
    """K/V stored as codes per head and token: int8 (+ scale) or int4 (+ scale, zero); see the module doc.

    int8 on CUDA: the slot count is rounded up to a multiple of 16 (the int8 kernel reads V in 16-slot
    groups) and each layer's V codes live in a [B, H_kv, D, L] buffer held as its transposed view.
    """

    def __init__(self, layers: int, batch: int, kv_heads: int, max_len: int, head_dim: int, dtype, device,
                 bits: int = 8):
        if bits not in KV_BITS:
            raise ValueError(f"KV cache bits must be one of {KV_BITS}, got {bits}")
        self.bits, self.dtype, self.max_len = bits, dtype, max_len
        self.kernel_layout = bits == 8
        slots = -(-max_len // 16) * 16 if bits == 8 and torch.device(device).type == "cuda" else max_len
        shape = (batch, kv_heads, slots)

        def int8_layer(v: bool):
            codes = (torch.zeros(batch, kv_heads, head_dim, slots, dtype=torch.int8, device=device).transpose(2, 3)
                     if v else torch.zeros(*shape, head_dim, dtype=torch.int8, device=device))
            return codes, torch.ones(*shape, 1, dtype=torch.float32, device=device)

        def int4_layer():
            return (torch.zeros(*shape, head_dim // 2, dtype=torch.uint8, device=device),
                    torch.ones(*shape, 1, dtype=dtype, device=device),
                    torch.zeros(*shape, 1, dtype=dtype, device=device))

        if bits == 8:
            self.k, self.v = [int8_layer(False) for _ in range(layers)], [int8_layer(True) for _ in range(layers)]
        else:
            self.k, self.v = [int4_layer() for _ in range(layers)], [int4_layer() for _ in range(layers)]

    def _store(self, layer: int, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor) -> None:
        for store, x in ((self.k[layer], k), (self.v[layer], v)):
            for buf, part in zip(store, quantize_kv(x, self.bits)):
                buf.scatter_(2, idx[..., : part.shape[-1]], part)

    def _load(self, layer: int, kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(dequantize_kv(tuple(t[:, :, :kv_len] for t in store), self.bits, self.dtype)
                     for store in (self.k[layer], self.v[layer]))

    def stores_inside(self) -> bool:
        return self.bits == 8 and FUSED_INT8_STORE

    def kernel_args(self, layer: int) -> dict:
        (k, k_scale), (v, v_scale) = self.k[layer], self.v[layer]  # int8 layers (see kernel_layout)
        return {"k_cache": k, "v_cache": v, "k_scale": k_scale[..., 0], "v_scale": v_scale[..., 0]}

    def _decode_kernel(self, layer: int, q: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
        return attention_kernels().decode_attention_int8(q, **self.kernel_args(layer), cache_seqlens=lens)


def _select_rows(t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """t.index_select(0, rows) in t's own memory layout (index_select returns a contiguous tensor)."""
    picked = t.index_select(0, rows)
    if t.is_contiguous():
        return picked
    return torch.empty_like(t[: rows.numel()]).copy_(picked)  # empty_like keeps a dense view's strides


class SinkKVCache:
    """StreamingLLM cache: the first `sink` tokens + the last `window` tokens, positions within the cache.

    Keys are stored before RoPE. At each step every cached key is rotated with its index in the
    cache and each query with the index its own token takes, so relative distances never exceed
    sink + window whatever the length of the text. Batch rows advance together (one length).
    """

    def __init__(self, layers: int, batch: int, kv_heads: int, head_dim: int, dtype, device, sink: int = 4,
                 window: int = 252):
        if sink < 0 or window < 1:
            raise ValueError(f"sink cache needs sink >= 0 and window >= 1, got {sink}, {window}")
        self.sink, self.window, self.capacity = sink, window, sink + window
        shape = (batch, kv_heads, 0, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.seen = [0] * layers  # tokens ever written, per layer

    def room(self, layer: int = 0) -> int:
        """New tokens one step may take: what still fits, or 1 once full (a longer input goes in chunks)."""
        return max(self.capacity - self.k[layer].shape[2], 1)

    def _evict(self, layer: int, incoming: int) -> None:
        """Drop the oldest window tokens so that `incoming` more fit (the sinks always stay)."""
        held = self.k[layer].shape[2]
        drop = held + incoming - self.capacity
        if drop <= 0:
            return
        if incoming > 1:
            raise ValueError(f"sink cache: {incoming} tokens do not fit; feed at most room() = {self.room(layer)}")
        for store in (self.k, self.v):
            t = store[layer]
            store[layer] = torch.cat((t[:, :, : self.sink], t[:, :, self.sink + drop:]), dim=2)

    rotates_inside = True  # keys arrive unrotated; positions are indices inside the cache

    def stores_inside(self) -> bool:
        return False

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: Step) -> torch.Tensor:
        """Evict beyond sink + window, append K/V, attend with positions inside the cache.

        q, k, v: [B, H, T, D] before RoPE. step.pos is ignored: positions come from the cache.
        """
        t = k.shape[2]
        self._evict(layer, t)
        keys = torch.cat((self.k[layer], k), dim=2)
        values = torch.cat((self.v[layer], v), dim=2)
        n = keys.shape[2]
        cache_pos = torch.arange(n, device=k.device).view(1, -1).expand(k.shape[0], n)
        qpos = cache_pos[:, n - t:]
        mask = torch.arange(n, device=k.device).view(1, 1, -1) <= qpos.unsqueeze(-1)
        out = _sdpa(step.rotate(q, qpos, head_axis=1), step.rotate(keys, cache_pos, head_axis=1), values,
                    mask.unsqueeze(1))
        self.k[layer], self.v[layer] = keys, values
        self.seen[layer] += t
        return out

    def kept_positions(self, layer: int = 0) -> list[int]:
        """Original text positions of the tokens the cache holds (sinks first, then the window)."""
        n, seen = self.k[layer].shape[2], self.seen[layer]
        return list(range(min(self.sink, n))) + list(range(seen - (n - min(self.sink, n)), seen))

    def nbytes(self) -> int:
        """Bytes held now."""
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


# ----------------------------------------------------------------------------------------------
# Runtime switch for plain Hugging Face forward passes.


def _kvq_attention(base_name: str, bits: int):
    """An attention function that fake-quantizes K/V (as the cache stores them) then calls `base_name`."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    def attention(module, query, key, value, attention_mask, **kwargs):
        base = ALL_ATTENTION_FUNCTIONS.get_interface(base_name, None)
        if base is None:  # "eager" lives in the model file, not in the interface
            base = _eager_of(module)
        return base(module, query, fake_quantize_kv(key, bits), fake_quantize_kv(value, bits), attention_mask,
                    **kwargs)

    return attention


def _eager_of(module):
    import importlib

    return importlib.import_module(type(module).__module__).eager_attention_forward


def _register(base_name: str, bits: int) -> str:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = f"effopt_kv{bits}_{base_name}"
    if name not in ALL_ATTENTION_FUNCTIONS:
        ALL_ATTENTION_FUNCTIONS.register(name, _kvq_attention(base_name, bits))
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base_name])
    return name


@contextlib.contextmanager
def use_kv_runtime(model, runtime: dict | None) -> Iterator[None]:
    """Apply the KV-cache runtime option of `runtime` to `model` inside the block.

    With `runtime["kv_cache"] = {"bits": 8|4, "granularity": "head_token"}` every attention call
    sees K (after RoPE) and V quantized-dequantized per head and token, exactly as
    `QuantizedKVCache` stores them; effopt's generation (`effopt.generation`) reads the same
    setting from `model._effopt_runtime` and uses a real quantized cache. Without it, no-op.
    """
    cfg = kv_config(runtime)
    if cfg is None or model is None:
        yield
        return
    configs = {id(c): c for c in _configs(model)}.values()
    saved = [(c, c._attn_implementation) for c in configs]
    previous = getattr(model, "_effopt_runtime", None)
    try:
        for c, impl in saved:
            c._attn_implementation = _register(impl or "sdpa", cfg["bits"])
        model._effopt_runtime = dict(runtime)
        yield
    finally:
        for c, impl in saved:
            c._attn_implementation = impl
        model._effopt_runtime = previous


def _configs(model) -> list:
    """Every config object attention modules read their implementation from."""
    found = [m.config for m in model.modules() if hasattr(m, "config") and hasattr(m.config, "_attn_implementation")]
    return found or [model.config]


def runtime_of(model) -> dict:
    """The runtime options active on `model` (set by `use_kv_runtime`), {} when none."""
    return dict(getattr(model, "_effopt_runtime", None) or {})
