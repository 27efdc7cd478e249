"""Measurements of a model: perplexity under the one protocol, size as stored, parameters, bits per
weight, sparsity, and decode speed.

Perplexity protocol (README): the source's first `max_tokens` tokens (no special tokens) are cut
into consecutive non-overlapping windows of `seq_len`; each window is scored on its own (no context
carried over); with BOS, a BOS token is prepended to every window and every real token is
predicted; without, the first token of each window is context only. Perplexity = exp(total NLL /
predicted tokens), in float32.
"""

from __future__ import annotations

import math
import time

import torch

from effopt import log


@torch.inference_mode()
def perplexity(model, windows: list[torch.Tensor], tokenizer=None, description: str = "perplexity") -> dict:
    """Perplexity, mean NLL and (with a tokenizer) bits per byte over `windows`."""
    device = next(model.parameters()).device
    total_nll, total_tokens, total_bytes = 0.0, 0, 0
    bos_id = getattr(tokenizer, "bos_token_id", None)
    for window in log.progress(windows, description):
        ids = window.unsqueeze(0).to(device)
        logits = model(input_ids=ids).logits[0, :-1].float()
        targets = ids[0, 1:]
        total_nll += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
        total_tokens += targets.numel()
        if tokenizer is not None:
            scored = window if bos_id is None or window[0] != bos_id else window[1:]
            total_bytes += len(tokenizer.decode(scored.tolist()).encode("utf-8"))
    mean = total_nll / total_tokens
    out = {"perplexity": math.exp(mean), "nll": mean, "eval_tokens": total_tokens}
    if total_bytes:
        out["bits_per_byte"] = total_nll / math.log(2) / total_bytes
    return out


def _unique_tensors(model):
    seen = set()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
        if key in seen:
            continue
        seen.add(key)
        yield name, t


def _persistent_buffer_names(model) -> set[str]:
    names = set()
    for mod_name, module in model.named_modules():
        for buf_name in module._buffers:
            if buf_name not in module._non_persistent_buffers_set:
                names.add(f"{mod_name}.{buf_name}" if mod_name else buf_name)
    return names


def logical_parameters(model) -> int:
    """Parameters the model computes with: a QuantLinear counts its N*K weights (+ bias), not bytes."""
    from effopt.nn.quant_linear import QuantLinear

    total = 0
    quant_prefixes = set()
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear) or getattr(module, "packed_weight", False):
            total += module.in_features * module.out_features + (module.out_features if module.bias is not None else 0)
            quant_prefixes.add(name + ".")
    for name, p in _unique_tensors(model):
        if isinstance(p, torch.nn.Parameter) and not any(name.startswith(q) for q in quant_prefixes):
            total += p.numel()
    return total


def stored_bytes(model) -> int:
    """Bytes of the weights as stored (parameters + persistent buffers, tied tensors counted once)."""
    persistent = _persistent_buffer_names(model)
    params = dict(model.named_parameters())
    return sum(t.numel() * t.element_size() for name, t in _unique_tensors(model)
               if name in params or name in persistent)


def linear_weights(model):
    """(name, float weight) of every linear-like layer (QuantLinear dequantized), lm_head excluded."""
    from effopt.nn.quant_linear import QuantLinear

    for name, module in model.named_modules():
        if name.endswith("lm_head"):
            continue
        if isinstance(module, QuantLinear):
            yield name, module.dequantize(torch.float32)
        elif isinstance(module, torch.nn.Linear):
            yield name, module.effective_weight() if hasattr(module, "effective_weight") else module.weight


@torch.no_grad()
def sparsity(model) -> float:
    """Fraction of exactly-zero weights over the linear layers (lm_head excluded)."""
    zeros = total = 0
    for _, w in linear_weights(model):
        zeros += int((w == 0).sum())
        total += w.numel()
    return zeros / total if total else 0.0


def size_metrics(model) -> dict:
    """Parameters, bytes as stored, bits per weight, sparsity."""
    params = logical_parameters(model)
    size = stored_bytes(model)
    return {"parameters": params, "size_bytes": size, "bits_per_weight": 8 * size / max(params, 1),
            "sparsity": sparsity(model)}


@torch.inference_mode()
def decode_speed(model, tokenizer, prompt_tokens: int = 32, new_tokens: int = 32, seed: int = 0) -> dict:
    """Greedy decode speed with the KV cache: tokens/s of the decode phase and prefill seconds."""
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    vocab = min(getattr(tokenizer, "vocab_size", 1000) or 1000, model.config.vocab_size)
    ids = torch.randint(10, vocab, (1, prompt_tokens), generator=gen).to(device)
    attn = torch.ones_like(ids)
    kwargs = dict(do_sample=False, pad_token_id=tokenizer.eos_token_id or 0, attention_mask=attn)

    def timed(n: int) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    timed(2)  # warm-up
    prefill = timed(1)
    full = timed(new_tokens + 1)
    decode = max(full - prefill, 1e-9)
    return {"tokens_per_s": new_tokens / decode, "prefill_s": prefill}
