"""effopt's forward pass for Llama-family models over effopt's KV caches.

A `Decoder` runs the Hugging Face model's own modules (embeddings, norms, projections, MLPs,
lm_head: QuantLinear, MaskedLinear and friends included) and replaces only attention, which reads
and writes an effopt cache (effopt/nn/kv_cache.py). Nothing in the step depends on host-side
values, so on CUDA the whole decode step can be captured in a CUDA graph (effopt/generation/graphs.py).

Supported: decoder-only models laid out as `model.model.{embed_tokens, layers, norm, rotary_emb}`
with `self_attn.{q,k,v,o}_proj` and `mlp`, without per-head q/k norms or sliding windows (Llama,
Mistral without window, Qwen2, SmolLM2). `unsupported_reason(model)` says why another is not.
"""

from __future__ import annotations

import torch

from effopt.nn.kv_cache import QuantizedKVCache, SinkKVCache, StaticKVCache, Step

CACHE_KINDS = ("bf16", "float", "int8", "int4", "sink")


def unsupported_reason(model) -> str | None:
    """None when `Decoder` can run `model`, else a one-line reason."""
    base = getattr(model, "model", None)
    needed = ("embed_tokens", "layers", "norm", "rotary_emb")
    if base is None or not all(hasattr(base, n) for n in needed) or not hasattr(model, "lm_head"):
        return f"{type(model).__name__}: expected model.model.{{{', '.join(needed)}}} and lm_head"
    attn = base.layers[0].self_attn
    if not all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")):
        return f"{type(attn).__name__}: expected q/k/v/o projections"
    if hasattr(attn, "q_norm") or hasattr(attn, "k_norm"):
        return f"{type(attn).__name__}: per-head q/k norms are not supported by effopt's decode path"
    cfg = model.config
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
        return f"{cfg.model_type}: sliding-window attention is not supported by effopt's decode path"
    if cfg.model_type not in ("llama", "mistral", "qwen2"):
        return f"model_type {cfg.model_type!r}: effopt's decode path covers llama, mistral and qwen2"
    return None


_RMS_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm")  # weight * normalize(x in fp32), cast back


def fused_kernels():
    """kernels.fused when Triton is importable, else None."""
    try:
        from kernels import fused
    except ImportError:  # no Triton: the torch path
        return None
    return fused


def rms_norm(norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's RMSNorm, through torch's fused rms_norm when the module has the Llama formula."""
    if type(norm).__name__ not in _RMS_NORMS:
        return norm(x)
    y = torch.nn.functional.rms_norm(x.float(), (x.shape[-1],), eps=norm.variance_epsilon)
    return norm.weight * y.to(x.dtype)


class Decoder:
    """Forward passes of a Llama-family model over an effopt KV cache."""

    def __init__(self, model):
        reason = unsupported_reason(model)
        if reason:
            raise ValueError(reason)
        self.model = model
        base = model.model
        self.embed, self.layers, self.norm, self.lm_head = base.embed_tokens, base.layers, base.norm, model.lm_head
        self.rotary_module = base.rotary_emb
        cfg = model.config
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.vocab = cfg.vocab_size
        param = next(model.parameters())
        self.dtype, self.device = self.embed.weight.dtype, param.device
        self._cos = self._sin = None
        self.fused: list | None = None
        self.norm_is_identity = isinstance(self.norm, torch.nn.Identity)  # EAGLE draft heads
        self.kernels = self._fused_kernels_fit()

    def _fused_kernels_fit(self):
        """kernels.fused when this model's step can use it (CUDA, fp16/bf16, Llama RMSNorm, SiLU MLP)."""
        layer = self.layers[0]
        ok = (self.device.type == "cuda" and self.dtype in (torch.float16, torch.bfloat16)
              and all(type(n).__name__ in _RMS_NORMS for n in (layer.input_layernorm, layer.post_attention_layernorm))
              and (self.norm_is_identity or type(self.norm).__name__ in _RMS_NORMS)
              and type(getattr(layer.mlp, "act_fn", None)).__name__ in ("SiLU", "SiLUActivation"))
        return fused_kernels() if ok else None

    def _use_kernels(self) -> bool:
        from effopt.nn import kv_cache

        return self.kernels is not None and kv_cache.USE_KERNELS

    # ------------------------------------------------------------------------------------------
    def ensure_positions(self, n: int) -> None:
        """Precompute RoPE cos/sin for positions [0, n) (from the model's own rotary module)."""
        if self._cos is not None and self._cos.shape[0] >= n:
            return
        pos = torch.arange(n, device=self.device).view(1, -1)
        probe = torch.zeros(1, dtype=self.dtype, device=self.device)
        cos, sin = self.rotary_module(probe, pos)
        half = sin.shape[-1] // 2
        self._cos, self._sin = cos[0], torch.cat((-sin[0, :, :half], sin[0, :, half:]), dim=-1)

    def rotary(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, signed sin) [B, T, D] at positions pos [B, T] (table lookup: capturable in a graph)."""
        return self._cos[pos], self._sin[pos]

    def new_cache(self, kind: str, batch: int, max_len: int, sink: int = 4, window: int = 252):
        """An empty cache: bf16/float (static), int8/int4 (quantized), or sink (StreamingLLM)."""
        if kind not in CACHE_KINDS:
            raise ValueError(f"cache kind must be one of {CACHE_KINDS}, got {kind!r}")
        n = len(self.layers)
        if kind == "sink":
            self.ensure_positions(sink + window)
            return SinkKVCache(n, batch, self.kv_heads, self.head_dim, self.dtype, self.device, sink, window)
        self.ensure_positions(max_len)
        if kind in ("int8", "int4"):
            return QuantizedKVCache(n, batch, self.kv_heads, max_len, self.head_dim, self.dtype, self.device,
                                    bits=int(kind[3:]))
        return StaticKVCache(n, batch, self.kv_heads, max_len, self.head_dim, self.dtype, self.device)

    def fuse(self) -> "Decoder":
        """Concatenate q/k/v and gate/up projections into one layer each (fewer, larger matmuls).

        Uses extra memory for the fused copies (the model's own layers stay as they are).
        """
        from effopt.generation.fusion import fuse_linears

        fused = []
        for layer in self.layers:
            attn, mlp = layer.self_attn, layer.mlp
            qkv = fuse_linears([attn.q_proj, attn.k_proj, attn.v_proj])
            gate_up = fuse_linears([mlp.gate_proj, mlp.up_proj]) if hasattr(mlp, "gate_proj") else None
            fused.append((qkv, gate_up))
        self.fused = fused
        return self

    # ------------------------------------------------------------------------------------------
    def _qkv(self, i: int, attn, h: torch.Tensor, step: Step, rotate: bool):
        """q, k, v as [B, H, T, D] views; q and k rotated at the step's positions when `rotate`."""
        b, t, _ = h.shape
        nh, nkv, d = self.heads, self.kv_heads, self.head_dim
        if self.fused is not None and self.fused[i][0] is not None:
            out = self.fused[i][0](h)
            qk = out[..., : (nh + nkv) * d].reshape(b, t, nh + nkv, d)
            v = out[..., (nh + nkv) * d:].reshape(b, t, nkv, d)
            if rotate and self._use_kernels():  # one launch for q and k
                qk = self.kernels.rope(qk, *step.rope_tables())
            elif rotate:  # one rotation for q and k together
                qk = step.rotate(qk)
            q, k = qk[:, :, :nh], qk[:, :, nh:]
        else:
            q = attn.q_proj(h).view(b, t, nh, d)
            k = attn.k_proj(h).view(b, t, nkv, d)
            v = attn.v_proj(h).view(b, t, nkv, d)
            if rotate:
                q, k = step.rotate(q), step.rotate(k)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def _mlp(self, i: int, mlp, h: torch.Tensor) -> torch.Tensor:
        if self.fused is not None and self.fused[i][1] is not None:
            gate_up = self.fused[i][1](h)
            if self._use_kernels():
                return mlp.down_proj(self.kernels.silu_mul(gate_up))
            gate, up = gate_up.chunk(2, dim=-1)
            return mlp.down_proj(mlp.act_fn(gate) * up)
        return mlp(h)

    def forward(self, tokens: torch.Tensor, start: torch.Tensor, cache, kv_len: int | None = None,
                last_only: bool = False, embeds: torch.Tensor | None = None, return_hidden: bool = False):
        """Logits for `tokens` [B, T] placed at positions start[b] + t, updating `cache`.

        Args:
            start: [B] int64 device tensor.
            kv_len: slots to attend over (None: the cache's whole capacity, as a graph needs).
            last_only: project only the last position to the vocabulary (prefill).
            embeds: [B, T, h] inputs used instead of embed(tokens) (an EAGLE head's fused inputs).
            return_hidden: also return the LM head's input [B, T or 1, h] (EAGLE reads the target's).

        Returns:
            logits [B, T or 1, vocab], or (logits, hidden) with return_hidden.
        """
        x = self.embed(tokens) if embeds is None else embeds
        b, t, _ = x.shape
        step = Step(start, t, self.rotary, kv_len)
        rotate = not cache.rotates_inside
        if self._use_kernels():
            h = self._forward_fused(x, step, cache, rotate, last_only)
        else:
            for i, layer in enumerate(self.layers):
                attn = layer.self_attn
                q, k, v = self._qkv(i, attn, rms_norm(layer.input_layernorm, x), step, rotate)
                out = cache.attend(i, q, k, v, step)
                x = x + attn.o_proj(out.transpose(1, 2).reshape(b, t, -1))
                x = x + self._mlp(i, layer.mlp, rms_norm(layer.post_attention_layernorm, x))
            if last_only:
                x = x[:, -1:]
            h = rms_norm(self.norm, x)
        logits = self.lm_head(h)
        return (logits, h) if return_hidden else logits

    def _forward_fused(self, x, step: Step, cache, rotate: bool, last_only: bool) -> torch.Tensor:
        """The LM head's input, with each residual add folded into the next RMSNorm (kernels.fused.add_rms_norm)."""
        b, t, _ = x.shape
        norm = self.kernels.add_rms_norm
        store_inside = (rotate and cache.stores_inside() and self.fused is not None
                        and all(qkv is not None for qkv, _ in self.fused))
        pending = None  # the last sublayer's output, added to x by the next norm
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            x, h = norm(x, layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon, pending)
            if store_inside:  # RoPE and the K/V cache write in one launch
                qkv = self.fused[i][0](h).view(b, t, self.heads + 2 * self.kv_heads, self.head_dim)
                q = self.kernels.rope_store_kv(qkv, *step.rope_tables(), step.pos, q_heads=self.heads,
                                               **cache.kernel_args(i))
                out = cache.attend_stored(i, q.transpose(1, 2), step)
            else:
                q, k, v = self._qkv(i, attn, h, step, rotate)
                out = cache.attend(i, q, k, v, step)
            x, h = norm(x, layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon,
                        attn.o_proj(out.transpose(1, 2).reshape(b, t, -1)))
            pending = self._mlp(i, layer.mlp, h)
        if last_only:
            x, pending = x[:, -1:], pending[:, -1:]
        if self.norm_is_identity:
            return x + pending
        return norm(x, self.norm.weight, self.norm.variance_epsilon, pending)[1]
