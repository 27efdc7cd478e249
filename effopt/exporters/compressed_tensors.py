"""format: compressed-tensors: the checkpoint layout vLLM and transformers load (`pack-quantized`).

A QuantLinear named X becomes, in model.safetensors:
- `X.weight_packed` int32 [N, ceil(K*b/32)]: the codes as one little-endian bit stream per row,
  32-bit words. compressed-tensors stores *signed* values v in [-2^(b-1), 2^(b-1)-1] packed as
  v + 2^(b-1); effopt's unsigned codes q are exactly those packed bits (v = q - 2^(b-1)), and
  effopt's row stream (kernels/LAYOUT.md) is the same bit stream, so the bytes carry over.
- `X.weight_scale` [N, G] (G = 1 for per-channel), in the model's dtype.
- `X.weight_zero_point` (asymmetric only) int32 [ceil(N*b/32), G]: zero points z - 2^(b-1),
  packed the same way along the output dimension. Symmetric layers (effopt zero = 2^(b-1), i.e.
  a signed zero point of 0) store none.
- `X.weight_shape` int64 [2] = (N, K).
so W = (v - zp) * scale = (q - z) * scale, the same weights effopt computes with.

config.json gets `quantization_config` (quant_method compressed-tensors, format pack-quantized,
one config group per distinct scheme, `ignore` for every linear layer left in float) and, when the
linear weights are 2:4 sparse (or a prune stage made them sparse), `sparsity_config` metadata.
Only 4- and 8-bit layers whose group size divides the input width are representable (that is what
the format and vLLM's kernels define); anything else is refused with the layers named.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from effopt.exporters import commit, fresh_tmp

SUPPORTED_BITS = (4, 8)
# vLLM fuses these projections; their shards must share one scheme there.
FUSED_SHARDS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def int32_words(packed: torch.Tensor) -> torch.Tensor:
    """uint8 rows [R, B] -> int32 rows [R, ceil(B/4)]: byte 4w+i is bits 8i..8i+7 of word w."""
    rows, nbytes = packed.shape
    words = -(-nbytes // 4)
    padded = torch.zeros(rows, words * 4, dtype=torch.int64)
    padded[:, :nbytes] = packed.to(torch.int64)
    shifts = torch.tensor([0, 8, 16, 24], dtype=torch.int64)
    value = (padded.view(rows, words, 4) << shifts).sum(-1)
    return torch.where(value >= 2**31, value - 2**32, value).to(torch.int32)  # two's complement


def layer_scheme(name: str, layer) -> dict:
    """compressed-tensors QuantizationArgs (as a dict) for one QuantLinear; ValueError if unrepresentable."""
    groups = layer.scales.shape[1]
    if layer.bits not in SUPPORTED_BITS:
        raise ValueError(f"{name}: {layer.bits}-bit weights; compressed-tensors pack-quantized export "
                         f"supports {SUPPORTED_BITS} bits")
    if groups > 1 and layer.in_features % layer.group_size:
        raise ValueError(f"{name}: group_size {layer.group_size} does not divide in_features {layer.in_features} "
                         "(compressed-tensors needs whole groups; quantize with a group size that divides it)")
    strategy = "channel" if groups == 1 else "group"
    return {"num_bits": layer.bits, "type": "int", "symmetric": bool(layer.symmetric), "strategy": strategy,
            "group_size": layer.group_size if strategy == "group" else None, "dynamic": False, "observer": "minmax"}


def layer_tensors(layer) -> dict[str, torch.Tensor]:
    """The compressed-tensors tensors of one QuantLinear (local names, CPU)."""
    from effopt.methods.quant.packing import pack_codes

    out = {"weight_packed": int32_words(layer.qweight.cpu()),
           "weight_scale": layer.scales.detach().cpu().contiguous(),
           "weight_shape": torch.tensor([layer.out_features, layer.in_features], dtype=torch.int64)}
    if not layer.symmetric:
        zeros = layer.zeros.detach().cpu().round().to(torch.uint8)  # unsigned z = signed zp + 2^(b-1)
        out["weight_zero_point"] = int32_words(pack_codes(zeros.t().contiguous(), layer.bits)).t().contiguous()
    if layer.bias is not None:
        out["bias"] = layer.bias.detach().cpu().contiguous()
    return out


def _float_model(model):
    """Copy of `model` keeping QuantLinear layers and densifying every other effopt module."""
    from effopt.nn import MODULE_TYPES, set_submodule
    from effopt.nn.quant_linear import QuantLinear

    out = copy.deepcopy(model)
    for name, module in list(out.named_modules()):
        if type(module) is QuantLinear or type(module).__name__ not in MODULE_TYPES:
            continue  # (a LoRA over a packed layer is merged: packed codes cannot hold the update)
        if not hasattr(module, "to_dense"):
            raise ValueError(f"{name}: effopt module {type(module).__name__} has no dense form for compressed-tensors")
        set_submodule(out, name, module.to_dense())
    return out


def _config_groups(schemes: dict[str, dict], float_linears: list[str]) -> tuple[dict, list[str]]:
    """config_groups (one per distinct scheme) and the ignore list."""
    distinct: list[dict] = []
    members: list[list[str]] = []
    for name, scheme in schemes.items():
        if scheme not in distinct:
            distinct.append(scheme)
            members.append([])
        members[distinct.index(scheme)].append(name)
    groups = {}
    for i, (scheme, names) in enumerate(zip(distinct, members)):
        targets = ["Linear"] if len(distinct) == 1 else sorted(names)
        groups[f"group_{i}"] = {"targets": targets, "weights": scheme, "input_activations": None,
                                "output_activations": None}
    return groups, sorted(float_linears)


def sparsity_metadata(weights: dict[str, torch.Tensor], pruned: bool) -> dict | None:
    """`sparsity_config` for config.json: 2:4 when every row's groups of 4 hold two zeros or more.

    Written when the weights are 2:4 or when a prune stage ran (`pruned`); None otherwise (RTN alone
    creates exact zeros that are not sparsity anyone should exploit).
    """
    from effopt.nn.semi_structured import is_two_four

    zeros = sum(int((w == 0).sum()) for w in weights.values())
    total = sum(w.numel() for w in weights.values())
    two_four = bool(weights) and all(is_two_four(w) for w in weights.values())
    if not (two_four or pruned) or not total:
        return None
    return {"format": "dense", "global_sparsity": zeros / total,
            "sparsity_structure": "2:4" if two_four else "unstructured",
            "targets": sorted(weights), "ignore": [], "registry_requires_subclass": False}


def vllm_fusion_problems(schemes: dict[str, dict]) -> list[str]:
    """Shards vLLM fuses (q/k/v, gate/up) that carry different schemes: vLLM refuses those."""
    problems = []
    for name in schemes:
        parent, _, leaf = name.rpartition(".")
        for fused, shards in FUSED_SHARDS.items():
            if leaf == shards[0]:
                seen = [schemes.get(f"{parent}.{s}") for s in shards]
                if any(s != seen[0] for s in seen):
                    problems.append(f"{parent}.{fused}: shards {shards} differ in scheme or quantization")
    return problems


def build_export(model) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(state dict, quantization_config, details) for `model` in pack-quantized layout."""
    from effopt.models import _unique_state_dict
    from effopt.nn.quant_linear import QuantLinear

    work = _float_model(model)
    quant = {n: m for n, m in work.named_modules() if type(m) is QuantLinear}
    if not quant:
        raise ValueError("compressed-tensors export needs quantized layers (run a quantize stage first); "
                         "use format: hf for a float model")
    schemes = {name: layer_scheme(name, layer) for name, layer in quant.items()}
    float_linears = [n for n, m in work.named_modules() if isinstance(m, torch.nn.Linear)]
    state = {k: v for k, v in _unique_state_dict(work).items()
             if not any(k.startswith(q + ".") for q in quant)}
    for name, layer in quant.items():
        state.update({f"{name}.{k}": v for k, v in layer_tensors(layer).items()})
    groups, ignore = _config_groups(schemes, float_linears)
    qconfig = {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
               "config_groups": groups, "ignore": ignore, "kv_cache_scheme": None, "global_compression_ratio": None}
    weights = {n: layer.dequantize(torch.float32).detach().cpu() for n, layer in quant.items()}
    weights.update({n: work.get_submodule(n).weight.detach().float().cpu() for n in float_linears
                    if not n.endswith("lm_head")})
    details = {"schemes": schemes, "weights": weights}
    return state, qconfig, details


def export_compressed_tensors(model, tokenizer, out: Path, manifest: dict) -> dict:
    """Write a compressed-tensors (pack-quantized) folder at `out`; return metrics."""
    from safetensors.torch import save_file

    state, qconfig, details = build_export(model)
    pruned = any(h.get("stage") == "prune" for h in manifest.get("history", []))
    sparsity = sparsity_metadata(details["weights"], pruned)
    if sparsity is not None:
        qconfig["sparsity_config"] = sparsity
    tmp = fresh_tmp(Path(out))
    model.config.save_pretrained(tmp)
    config = json.loads((tmp / "config.json").read_text())
    config.pop("quantization_config", None)
    config["quantization_config"] = qconfig
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    fusion = vllm_fusion_problems(details["schemes"])
    manifest = dict(manifest)
    manifest["format"] = {
        "name": "compressed-tensors", "layout": "pack-quantized", "files": {"weights": "model.safetensors",
                                                                            "config": "config.json"},
        "quantized_layers": {n: {k: s[k] for k in ("num_bits", "symmetric", "strategy", "group_size")}
                             for n, s in details["schemes"].items()},
        "float_layers": qconfig["ignore"], "sparsity": sparsity, "vllm_fusion_problems": fusion,
        "loads_with": ["vllm", "transformers (compressed-tensors installed)", "compressed-tensors"]}
    size = commit(tmp, Path(out), manifest)
    return {"export_path": str(out), "export_bytes": size, "export_weights_bytes": (Path(out) / "model.safetensors")
            .stat().st_size, "export_quantized_layers": len(details["schemes"])}
