"""LoRA adapters as peft adapter folders (adapter_config.json + adapter_model.safetensors).

`save_adapter` writes the LoRA factors of a model's LoraQuantLinear / LoraBnb4bitLinear layers (or of peft LoRA layers
still in it) in peft's format, so the folder sits beside a quantized base export and loads back two
ways: `peft.PeftModel.from_pretrained(dense_model, folder)` on the dequantized base, or
`load_adapter(model, folder)` onto effopt's packed base (which keeps the base packed).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."


def adapter_factors(model: torch.nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """{module name: (A [r, in], B [out, r], scaling)} of every LoRA in `model`."""
    from peft.tuners.lora import LoraLayer

    from effopt.nn.adapters import LORA_TYPES

    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LORA_TYPES):
            out[name] = (module.lora_A.detach(), module.lora_B.detach(), module.scaling)
        elif isinstance(module, LoraLayer) and module.active_adapters[0] in module.lora_A:
            key = module.active_adapters[0]
            out[name] = (module.lora_A[key].weight.detach(), module.lora_B[key].weight.detach(),
                         float(module.scaling[key]))
    return out


def save_adapter(model: torch.nn.Module, folder: Path | str) -> Path:
    """Write the model's LoRA factors as a peft LoRA adapter folder; returns the folder."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    factors = adapter_factors(model)
    if not factors:
        raise ValueError("save_adapter: the model has no LoRA layers")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ranks = {n: int(a.shape[0]) for n, (a, _, _) in factors.items()}
    alphas = {n: s * ranks[n] for n, (_, _, s) in factors.items()}
    first = next(iter(factors))
    config = LoraConfig(r=ranks[first], lora_alpha=alphas[first], target_modules=sorted(factors),
                        rank_pattern={n: r for n, r in ranks.items()}, alpha_pattern=alphas, bias="none",
                        task_type="CAUSAL_LM")
    config.save_pretrained(str(folder))
    tensors = {}
    for name, (a, b, _) in factors.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = a.float().contiguous().cpu()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = b.float().contiguous().cpu()
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    return folder


def load_adapter(model: torch.nn.Module, folder: Path | str) -> int:
    """Apply a peft LoRA folder to an effopt model: packed and bitsandbytes 4-bit bases become
    LoraQuantLinear / LoraBnb4bitLinear, dense and masked bases get the update merged (masked: the
    update is masked too). Returns layers changed."""
    from safetensors.torch import load_file

    from effopt.nn import set_submodule
    from effopt.nn.adapters import LoraBnb4bitLinear, LoraQuantLinear
    from effopt.nn.bnb_linear import Bnb4bitLinear
    from effopt.nn.masked_linear import MaskedLinear
    from effopt.nn.quant_linear import QuantLinear

    folder = Path(folder)
    config = json.loads((folder / CONFIG_FILE).read_text())
    tensors = load_file(str(folder / WEIGHTS_FILE))
    names = sorted({k[len(PREFIX):].rsplit(".lora_", 1)[0] for k in tensors})
    for name in names:
        a, b = tensors[f"{PREFIX}{name}.lora_A.weight"], tensors[f"{PREFIX}{name}.lora_B.weight"]
        r = config.get("rank_pattern", {}).get(name, config["r"])
        scaling = config.get("alpha_pattern", {}).get(name, config["lora_alpha"]) / r
        base = model.get_submodule(name)
        kind = LoraQuantLinear if isinstance(base, QuantLinear) else \
            LoraBnb4bitLinear if isinstance(base, Bnb4bitLinear) else None
        if kind is not None:
            set_submodule(model, name, kind.from_base(base, a, b * scaling, alpha=float(a.shape[0])))
            continue
        with torch.no_grad():
            delta = (b @ a) * scaling
            if isinstance(base, MaskedLinear):
                delta = delta * base.weight_mask
            base.weight.add_(delta.to(base.weight.dtype))
    return len(names)
