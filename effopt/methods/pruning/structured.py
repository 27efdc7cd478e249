"""Structured pruning by the L1/L2 norm of whole structures: attention heads, MLP channels, layers.

A structure is scored by the norm of its weights (all its rows/columns in every matrix it spans)
or, given per-weight saliencies (e.g. first-order Taylor |w * dL/dw|, LLM-Pruner's element-wise
importance summed over a group), by the norm of those.

Weight matrices are physically shrunk (plain nn.Linear, no masks) and the model config is updated
so the saved model loads in transformers. A transformers config holds one head count and one MLP
width for all layers, so heads and channels are pruned by the same count in every layer (which
ones differs per layer). With grouped-query attention, query heads are removed either as whole KV
groups (a KV head with all its query heads) or the same number from every KV group, so each KV
head keeps an equal share of query heads as transformers' repeat_kv requires.
"""

from __future__ import annotations

import torch

from effopt.methods import calibration
from effopt.nn.masked_linear import MaskedLinear

Saliency = dict  # {linear module: per-weight score tensor of its weight's shape}


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder's list of layers (`model.model.layers` in Llama/Gemma/Qwen/Mistral models)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(f"{type(model).__name__}: no decoder layer list at model.model.layers")
    return layers


def decoder_linears(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """{full name: module} of every linear layer inside the decoder layers."""
    return {f"{name}.{rel}": m for name, layer in calibration.decoder_layers(model)
            for rel, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}


def structure_norm(parts: list[torch.Tensor], norm: str) -> torch.Tensor:
    """Norm per unit over several [units, ...] tensors taken together ('l1' or 'l2')."""
    flat = torch.cat([p.detach().float().reshape(p.shape[0], -1) for p in parts], dim=1)
    if norm == "l1":
        return flat.abs().sum(1)
    if norm == "l2":
        return flat.pow(2).sum(1).sqrt()
    raise ValueError(f"norm must be 'l1' or 'l2', got {norm!r}")


def removal_count(units: int, amount: float, what: str) -> int:
    """round(amount * units), checked to remove at least one unit and keep at least one."""
    count = round(amount * units)
    if count < 1:
        raise ValueError(f"amount {amount} of {units} {what} rounds to 0; the smallest step is 1/{units}")
    if count >= units:
        raise ValueError(f"amount {amount} would remove all {units} {what}")
    return count


def lowest(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Sorted indices of the entries to keep after dropping the `count` lowest scores."""
    keep = torch.topk(scores, scores.numel() - count).indices
    return keep.sort().values


def slice_linear(linear: torch.nn.Module, rows: torch.Tensor | None = None,
                 cols: torch.Tensor | None = None) -> torch.nn.Linear:
    """A new layer with only the given output rows / input columns (MaskedLinear stays masked)."""
    if type(linear) not in (torch.nn.Linear, MaskedLinear):
        raise TypeError(f"structured pruning needs nn.Linear or MaskedLinear layers, got {type(linear).__name__} "
                        "(prune structures before quantizing or factorizing)")
    w = linear.weight.detach()
    rows = torch.arange(w.shape[0], device=w.device) if rows is None else rows.to(w.device)
    cols = torch.arange(w.shape[1], device=w.device) if cols is None else cols.to(w.device)
    bias = linear.bias is not None
    if isinstance(linear, MaskedLinear):
        new = MaskedLinear(len(cols), len(rows), bias, w.dtype, linear.pattern).to(w.device)
        new.weight_mask.copy_(linear.weight_mask[rows][:, cols])
    else:
        new = torch.nn.Linear(len(cols), len(rows), bias=bias, dtype=w.dtype, device=w.device)
    with torch.no_grad():
        new.weight.copy_(w[rows][:, cols])
        if bias:
            new.bias.copy_(linear.bias.detach()[rows])
    return new


def _values(linear: torch.nn.Module, saliency: Saliency | None) -> torch.Tensor:
    """What a structure's score aggregates for this linear: its weight, or its saliencies."""
    return linear.weight if saliency is None else saliency[linear]


def _head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Row (or column) indices of the given heads in a [heads * head_dim, ...] projection."""
    return (heads.unsqueeze(1) * head_dim + torch.arange(head_dim)).flatten()


def _attention_shape(model) -> tuple[int, int, int]:
    cfg = model.config
    heads, kv = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return heads, kv, head_dim


def _kept_heads(attn, heads: int, kv: int, head_dim: int, count: int, mode: str, norm: str,
                saliency: Saliency | None):
    """(query heads kept, kv heads kept) of one attention block."""
    group = heads // kv
    q = _values(attn.q_proj, saliency).reshape(heads, head_dim, -1)
    o_w = _values(attn.o_proj, saliency)
    o = o_w.reshape(o_w.shape[0], heads, head_dim).transpose(0, 1)
    if mode == "query_heads":
        scores = structure_norm([q, o], norm).view(kv, group)
        keep_in_group = torch.stack([lowest(s, count) for s in scores])
        keep_q = (torch.arange(kv).unsqueeze(1) * group + keep_in_group).flatten()
        return keep_q, torch.arange(kv)
    k = _values(attn.k_proj, saliency).reshape(kv, head_dim, -1)
    v = _values(attn.v_proj, saliency).reshape(kv, head_dim, -1)
    scores = structure_norm([q.reshape(kv, group * head_dim, -1), o.reshape(kv, group * head_dim, -1), k, v], norm)
    keep_kv = lowest(scores, count)
    keep_q = (keep_kv.unsqueeze(1) * group + torch.arange(group)).flatten()
    return keep_q, keep_kv


def prune_heads(model: torch.nn.Module, amount: float, norm: str = "l2", mode: str = "query_heads",
                saliency: Saliency | None = None) -> dict:
    """Remove the lowest-norm attention heads, the same number in every layer.

    Args:
        amount: fraction of query heads to remove, rounded to whole KV groups (mode 'kv_groups')
            or to whole heads per KV group (mode 'query_heads').
        norm: 'l1' or 'l2' over the head's q rows and o columns (plus k and v rows for KV groups).
        saliency: per-weight scores to take the norm of instead of the weights.
    Returns:
        {"heads_before", "heads_after", "kv_heads_after", "heads_removed_fraction"}.
    """
    heads, kv, head_dim = _attention_shape(model)
    group = heads // kv
    if mode not in ("kv_groups", "query_heads"):
        raise ValueError(f"mode must be 'kv_groups' or 'query_heads', got {mode!r}")
    count = removal_count(kv if mode == "kv_groups" else group, amount,
                          "KV groups" if mode == "kv_groups" else "query heads per KV group")
    for layer in decoder_layers(model):
        attn = layer.self_attn
        keep_q, keep_kv = _kept_heads(attn, heads, kv, head_dim, count, mode, norm, saliency)
        q_rows, kv_rows = _head_rows(keep_q, head_dim), _head_rows(keep_kv, head_dim)
        attn.q_proj = slice_linear(attn.q_proj, rows=q_rows)
        attn.k_proj = slice_linear(attn.k_proj, rows=kv_rows)
        attn.v_proj = slice_linear(attn.v_proj, rows=kv_rows)
        attn.o_proj = slice_linear(attn.o_proj, cols=q_rows)
        attn.num_key_value_groups = len(keep_q) // len(keep_kv)
        for attr, value in (("num_heads", len(keep_q)), ("num_key_value_heads", len(keep_kv))):
            if hasattr(attn, attr):
                setattr(attn, attr, value)
    new_heads, new_kv = (heads - count * group, kv - count) if mode == "kv_groups" else (heads - count * kv, kv)
    model.config.num_attention_heads, model.config.num_key_value_heads = new_heads, new_kv
    model.config.head_dim = head_dim
    return {"heads_before": heads, "heads_after": new_heads, "kv_heads_after": new_kv,
            "heads_removed_fraction": 1 - new_heads / heads}


def prune_channels(model: torch.nn.Module, amount: float, norm: str = "l2", saliency: Saliency | None = None) -> dict:
    """Remove the lowest-norm MLP intermediate channels (gate/up rows, down columns), the same
    number in every layer; updates config.intermediate_size. `saliency` as in `prune_heads`."""
    width = model.config.intermediate_size
    count = removal_count(width, amount, "MLP channels")
    for layer in decoder_layers(model):
        mlp = layer.mlp
        parts = [_values(mlp.up_proj, saliency), _values(mlp.down_proj, saliency).T]
        if hasattr(mlp, "gate_proj"):
            parts.append(_values(mlp.gate_proj, saliency))
        keep = lowest(structure_norm(parts, norm), count)
        if hasattr(mlp, "gate_proj"):
            mlp.gate_proj = slice_linear(mlp.gate_proj, rows=keep)
        mlp.up_proj = slice_linear(mlp.up_proj, rows=keep)
        mlp.down_proj = slice_linear(mlp.down_proj, cols=keep)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = width - count
    model.config.intermediate_size = width - count
    return {"channels_before": width, "channels_after": width - count}


def layer_norm_score(layer: torch.nn.Module, norm: str, saliency: Saliency | None = None) -> float:
    """Norm of all linear weights (or their saliencies) of one decoder layer taken together."""
    weights = [_values(m, saliency).detach().float().flatten() for m in layer.modules()
               if isinstance(m, torch.nn.Linear)]
    return float(structure_norm([torch.cat(weights).unsqueeze(0)], norm)[0])


def prune_layers(model: torch.nn.Module, amount: float, norm: str = "l2", saliency: Saliency | None = None) -> dict:
    """Remove the decoder layers whose weights have the lowest norm; renumber the rest and update
    config.num_hidden_layers (and config.layer_types where the model has it). `saliency` as in
    `prune_heads`."""
    layers = decoder_layers(model)
    count = removal_count(len(layers), amount, "decoder layers")
    scores = torch.tensor([layer_norm_score(layer, norm, saliency) for layer in layers])
    keep = lowest(scores, count).tolist()
    model.model.layers = torch.nn.ModuleList([layers[i] for i in keep])
    for new_index, layer in enumerate(model.model.layers):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    cfg = model.config
    if isinstance(getattr(cfg, "layer_types", None), list):
        cfg.layer_types = [cfg.layer_types[i] for i in keep]
    cfg.num_hidden_layers = len(keep)
    return {"layers_before": len(layers), "layers_after": len(keep),
            "layers_removed": [i for i in range(len(layers)) if i not in keep]}
