"""format: peft: a LoRA model as two folders side by side, `base/` and `adapter/`.

`base/` is the model without its adapters (an `hf` export: dense unless `packed`), `adapter/` is
what `PeftModel.save_pretrained` writes (adapter_config.json + adapter_model.safetensors), so
`PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("base"), "adapter")` rebuilds the
model. The adapter's `base_model_name_or_path` is the absolute path of `base/` at export time
(what AutoPeftModelForCausalLM follows); the manifest records the relative layout.
"""

from __future__ import annotations

import copy
from pathlib import Path

from effopt.exporters import commit, fresh_tmp, package_version
from effopt.exporters.hf import export_hf

BASE_DIR, ADAPTER_DIR = "base", "adapter"


def is_peft_model(model) -> bool:
    """True for a peft PeftModel (a model carrying adapters)."""
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def merged_copy(model):
    """A plain transformers model with the adapters merged into the weights (model untouched)."""
    return copy.deepcopy(model).merge_and_unload()


def _adapter_summary(model) -> dict:
    out = {}
    for name, cfg in model.peft_config.items():
        targets = cfg.target_modules
        out[name] = {"peft_type": str(getattr(cfg.peft_type, "value", cfg.peft_type)), "r": getattr(cfg, "r", None),
                     "lora_alpha": getattr(cfg, "lora_alpha", None),
                     "target_modules": sorted(targets) if isinstance(targets, (set, list)) else targets}
    return out


def export_peft(model, tokenizer, out: Path, manifest: dict, packed: bool = False) -> dict:
    """Write `out/base` (the model without adapters) and `out/adapter` (the adapters); return metrics."""
    if not is_peft_model(model):
        raise ValueError("format: peft needs a model carrying adapters (a PeftModel, e.g. after a LoRA finetune "
                         "stage); use format: hf for a plain model")
    out = Path(out)
    tmp = fresh_tmp(out)
    base = copy.deepcopy(model).unload()
    base_metrics = export_hf(base, tokenizer, tmp / BASE_DIR, manifest, packed=packed)
    adapter = tmp / ADAPTER_DIR
    model.save_pretrained(str(adapter))
    _point_adapter_at(adapter, (out / BASE_DIR).resolve())
    if tokenizer is not None:
        tokenizer.save_pretrained(adapter)
    manifest = dict(manifest)
    manifest["format"] = {"name": "peft", "base": BASE_DIR, "adapter": ADAPTER_DIR, "base_packed": packed,
                          "adapters": _adapter_summary(model), "peft_package": package_version("peft"),
                          "loads_with": "PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), "
                                        "adapter)"}
    size = commit(tmp, out, manifest)
    adapter_bytes = sum(f.stat().st_size for f in (out / ADAPTER_DIR).rglob("*") if f.is_file())
    return {"export_path": str(out), "export_bytes": size, "export_adapter_bytes": adapter_bytes,
            "export_weights_bytes": base_metrics["export_weights_bytes"]}


def _point_adapter_at(adapter: Path, base: Path) -> None:
    """Set every adapter_config.json's base_model_name_or_path to `base`."""
    import json

    for config in adapter.rglob("adapter_config.json"):
        data = json.loads(config.read_text())
        data["base_model_name_or_path"] = str(base)
        config.write_text(json.dumps(data, indent=2, sort_keys=True))
