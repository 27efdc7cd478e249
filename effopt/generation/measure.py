"""Timed runs for `effopt bench`: plain transformers `generate`, effopt's decode path, speculative
decoding and transformers' assisted generation, on the same prompts, each under a peak-memory probe.

Every function returns a flat dict of the same fields (seconds, tokens/s, MB, bytes) plus the
generated token ids under "tokens" (used for equality checks, dropped from reports).
"""

from __future__ import annotations

import contextlib
import time

import torch

from effopt.generation.decode import generate, sync
from effopt.generation.sampling import Sampling
from effopt.monitor import PeakMemory

RUN_FIELDS = ("prefill_s", "ttft_s", "decode_tokens_per_s", "total_s", "new_tokens", "peak_host_mb", "peak_gpu_mb",
              "kv_cache_bytes")


class _Clock:
    """A transformers streamer that only timestamps: put() #1 is the prompt, #2 the first new token."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        self.times.append(time.perf_counter())


def kv_bytes_per_token(model) -> int:
    """Bytes a float KV cache spends per position and sequence (all layers, K and V)."""
    cfg = model.config
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return 2 * cfg.num_hidden_layers * kv_heads * head_dim * next(model.parameters()).element_size()


@contextlib.contextmanager
def _no_eos(*models):
    """Generate exactly the requested number of tokens: no EOS stop, no EOS suppression."""
    saved = [(m.generation_config, m.generation_config.eos_token_id) for m in models if m is not None]
    for cfg, _ in saved:
        cfg.eos_token_id = None
    try:
        yield
    finally:
        for cfg, eos in saved:
            cfg.eos_token_id = eos


def _left_pad(prompts: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return ids.to(device), mask.to(device)


@torch.inference_mode()
def hf_prefill_s(model, prompts: list[list[int]], pad: int) -> float:
    """Seconds of one plain forward over the (left-padded) prompts, cache on."""
    ids, mask = _left_pad(prompts, pad, next(model.parameters()).device)
    sync(ids.device)
    t0 = time.perf_counter()
    model(input_ids=ids, attention_mask=mask, use_cache=True)
    sync(ids.device)
    return time.perf_counter() - t0


@torch.inference_mode()
def hf_generate_run(model, prompts: list[list[int]], gen_len: int, pad: int, assistant=None) -> dict:
    """Greedy transformers `generate` (DynamicCache), optionally with `assistant_model=` (assisted)."""
    dev = next(model.parameters()).device
    ids, mask = _left_pad(prompts, pad, dev)
    kwargs = dict(attention_mask=mask, do_sample=False, max_new_tokens=gen_len, pad_token_id=pad)
    if assistant is not None:
        kwargs["assistant_model"] = assistant
    with _no_eos(model, assistant):
        model.generate(ids, **dict(kwargs, max_new_tokens=2))  # warm-up
        prefill = hf_prefill_s(model, prompts, pad)
        clock = _Clock()
        with PeakMemory() as mem:
            sync(dev)
            t0 = time.perf_counter()
            out = model.generate(ids, streamer=clock, **kwargs)
            sync(dev)
            total = time.perf_counter() - t0
    new = out[:, ids.shape[1]:]
    first = clock.times[1] if len(clock.times) > 1 else t0 + total
    decode_tokens = new.numel() - new.shape[0]
    return {"prefill_s": prefill, "ttft_s": first - t0, "decode_tokens_per_s": decode_tokens / (t0 + total - first),
            "total_s": total, "new_tokens": new.numel(), "peak_host_mb": mem.peak_rss_mb,
            "peak_gpu_mb": mem.peak_gpu_mb,
            "kv_cache_bytes": kv_bytes_per_token(model) * ids.shape[0] * (ids.shape[1] + new.shape[1] - 1),
            "tokens": new.tolist()}


def effopt_run(model, prompts: list[list[int]], gen_len: int, cache: str, decoder=None, graph=None,
               compile_step: bool = False) -> dict:
    """effopt's decode path (static/quantized cache; CUDA graph on CUDA), after a short warm-up."""
    generate(model, prompts, 2, cache=cache, decoder=decoder, graph=graph, compile_step=compile_step)
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        g = generate(model, prompts, gen_len, cache=cache, decoder=decoder, graph=graph, compile_step=compile_step)
        total = time.perf_counter() - t0
    return {"prefill_s": g.prefill_s, "ttft_s": g.ttft_s, "decode_tokens_per_s": g.decode_tokens_per_s,
            "total_s": total, "new_tokens": sum(len(t) for t in g.tokens), "peak_host_mb": mem.peak_rss_mb,
            "peak_gpu_mb": mem.peak_gpu_mb, "kv_cache_bytes": g.kv_cache_bytes, "tokens": g.tokens}


def speculative_run(target, draft, prompt: list[int], gen_len: int, k: int, sampling: Sampling, cache: str,
                    seed: int = 0, graph=None, target_decoder=None, draft_decoder=None) -> dict:
    """effopt speculative decoding of one prompt, after a short warm-up; adds acceptance counters.
    `draft` is a draft model or an EAGLE head (effopt.methods.distill.eagle)."""
    from effopt.generation.eagle import eagle_generate
    from effopt.generation.speculative import speculative_generate
    from effopt.methods.distill.eagle import EagleHead

    spec = eagle_generate if isinstance(draft, EagleHead) else speculative_generate
    kw = dict(k=k, sampling=sampling, cache=cache, seed=seed, graph=graph, target_decoder=target_decoder,
              draft_decoder=draft_decoder)
    spec(target, draft, prompt, 2 * k + 2, **kw)
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        r = spec(target, draft, prompt, gen_len, **kw)
        total = time.perf_counter() - t0
    return {"prefill_s": r.prefill_s, "ttft_s": r.ttft_s, "decode_tokens_per_s": r.decode_tokens_per_s,
            "total_s": total, "new_tokens": len(r.tokens), "peak_host_mb": mem.peak_rss_mb,
            "peak_gpu_mb": mem.peak_gpu_mb, "kv_cache_bytes": None, "acceptance_rate": r.acceptance_rate,
            "tokens_per_target_call": r.tokens_per_target_call, "target_calls": r.target_calls,
            "draft_calls": r.draft_calls, "k": k, "tokens": [r.tokens]}


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the common prefix of two token lists."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
