"""format: peft: a model with adapters as two folders side by side, `base/` and `adapter/`.

Two kinds of models carry adapters: a peft `PeftModel` (any peft method), and an effopt model whose
LoRA sits over quantized layers (`LoraQuantLinear` over packed codes, `LoraBnb4bitLinear` over
bitsandbytes NF4/FP4: what the finetune stage's lora/qlora methods leave over a quantized base; over
dense bases they merge the update, leaving nothing to export here).
`base/` is the model without its adapters (an `hf` export: dense unless `packed`); `adapter/` is a
peft adapter folder (adapter_config.json + adapter_model.safetensors), written by peft's
`save_pretrained` or by effopt.methods.peft.adapter_io.save_adapter. Either way
`PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("base"), "adapter")` rebuilds the
model, and effopt's `load_adapter` puts it back onto a packed base. The adapter's
`base_model_name_or_path` is the absolute path of `base/` at export time (what
AutoPeftModelForCausalLM follows); the manifest records the relative layout.
"""

from __future__ import annotations

import copy
from pathlib import Path

from effopt.exporters import commit, folder_bytes, fresh_tmp, package_version
from effopt.exporters.hf import export_hf

BASE_DIR, ADAPTER_DIR = "base", "adapter"


def is_peft_model(model) -> bool:
    """True for a peft PeftModel (a model carrying adapters)."""
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def lora_layers(model) -> list[str]:
    """Names of effopt LoRA-over-quantized layers (LoraQuantLinear, LoraBnb4bitLinear) in `model`."""
    from effopt.nn.adapters import LORA_TYPES

    return [n for n, m in model.named_modules() if isinstance(m, LORA_TYPES)]


def _base_type(layer) -> type:
    """The effopt module type a LoRA layer is built on (QuantLinear, Bnb4bitLinear)."""
    from effopt.nn import MODULE_TYPES

    return next(c for c in type(layer).__mro__[1:] if MODULE_TYPES.get(c.__name__) is c)


def without_lora(model):
    """A copy of `model` where every effopt LoRA layer is its quantized base layer again."""
    from effopt.nn import set_submodule

    base = copy.deepcopy(model)
    for name in lora_layers(base):
        layer = base.get_submodule(name)
        spec = {k: v for k, v in layer.spec().items() if k not in ("r", "alpha")}
        plain = _base_type(layer).from_spec(spec)
        plain.load_state_dict({k: v for k, v in layer.state_dict().items() if not k.startswith("lora_")})
        set_submodule(base, name, plain.to(next(layer.buffers(), next(layer.parameters())).device))
    return base


def merged_copy(model):
    """A plain transformers model with the adapters merged into the weights (model untouched)."""
    return copy.deepcopy(model).merge_and_unload()


def _peft_summary(model) -> dict:
    out = {}
    for name, cfg in model.peft_config.items():
        targets = cfg.target_modules
        out[name] = {"peft_type": str(getattr(cfg.peft_type, "value", cfg.peft_type)), "r": getattr(cfg, "r", None),
                     "lora_alpha": getattr(cfg, "lora_alpha", None),
                     "target_modules": sorted(targets) if isinstance(targets, (set, list)) else targets}
    return out


def _split(model, adapter: Path):
    """Write the adapter folder; return (model without adapters, summary of what was written)."""
    if is_peft_model(model):
        model.save_pretrained(str(adapter))
        return copy.deepcopy(model).unload(), _peft_summary(model)
    names = lora_layers(model)
    if not names:
        raise ValueError("format: peft needs a model carrying adapters: a PeftModel, or LoRA kept over quantized "
                         "layers (finetune lora/qlora over a quantized base; over dense bases the update is merged "
                         "into the weights, so use format: hf)")
    from effopt.methods.peft.adapter_io import save_adapter

    save_adapter(model, adapter)
    ranks = sorted({model.get_submodule(n).r for n in names})
    over = sorted({_base_type(model.get_submodule(n)).__name__ for n in names})
    return without_lora(model), {"default": {"peft_type": "LORA", "r": ranks, "target_modules": names, "over": over}}


def export_peft(model, tokenizer, out: Path, manifest: dict, packed: bool = False) -> dict:
    """Write `out/base` (the model without adapters) and `out/adapter` (the adapters); return metrics."""
    out = Path(out)
    tmp = fresh_tmp(out)
    adapter = tmp / ADAPTER_DIR
    base, summary = _split(model, adapter)
    base_metrics = export_hf(base, tokenizer, tmp / BASE_DIR, manifest, packed=packed)
    _point_adapter_at(adapter, (out / BASE_DIR).resolve())
    if tokenizer is not None:
        tokenizer.save_pretrained(adapter)
    manifest = dict(manifest)
    manifest["format"] = {"name": "peft", "base": BASE_DIR, "adapter": ADAPTER_DIR, "base_packed": packed,
                          "adapters": summary, "peft_package": package_version("peft"),
                          "loads_with": "PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), "
                                        "adapter); effopt: load_adapter(load_model(base), adapter)"}
    size = commit(tmp, out, manifest)
    return {"export_path": str(out), "export_bytes": size, "export_adapter_bytes": folder_bytes(out / ADAPTER_DIR),
            "export_weights_bytes": base_metrics["export_weights_bytes"]}


def _point_adapter_at(adapter: Path, base: Path) -> None:
    """Set every adapter_config.json's base_model_name_or_path to `base`."""
    import json

    for config in adapter.rglob("adapter_config.json"):
        data = json.loads(config.read_text())
        data["base_model_name_or_path"] = str(base)
        config.write_text(json.dumps(data, indent=2, sort_keys=True))
