"""format: hf: a Hugging Face folder (config, tokenizer, model.safetensors) plus effopt's manifest.

Dense by default: every effopt module is replaced by its dense equivalent (`to_dense`), so plain
`transformers` loads the folder. With `packed=True` the compressed modules stay as they are and
`effopt_modules.json` says how to rebuild them (only effopt loads that).
"""

from __future__ import annotations

import copy
from pathlib import Path


def densify(model):
    """A copy of `model` with every effopt module replaced by its dense equivalent (`to_dense`)."""
    from effopt.nn import MODULE_TYPES, set_submodule

    dense = copy.deepcopy(model)
    for name, module in list(dense.named_modules()):
        if type(module).__name__ in MODULE_TYPES and hasattr(module, "to_dense"):
            set_submodule(dense, name, module.to_dense())
    return dense


def export_hf(model, tokenizer, out: Path, manifest: dict, packed: bool = False) -> dict:
    """Write `model` as a Hugging Face folder at `out` (atomically); return metrics.

    Args:
        packed: keep effopt modules (QuantLinear, ...) packed instead of writing dense weights.
    """
    from effopt.models import WEIGHTS_FILE, save_checkpoint
    from effopt.nn import module_specs

    model = model if packed else densify(model)
    specs = module_specs(model)
    if not packed and specs:
        raise ValueError(f"export: effopt modules without a dense form ({sorted({v['type'] for v in specs.values()})}); "
                         "use packed: true")
    manifest = dict(manifest)
    manifest["format"] = {"name": "hf", "packed": packed, "files": {"weights": WEIGHTS_FILE},
                          "modules": {k: v["type"] for k, v in specs.items()},
                          "loads_with": "effopt" if specs else "transformers (AutoModelForCausalLM) or effopt"}
    size = save_checkpoint(model, tokenizer, Path(out), manifest)
    weights = (Path(out) / WEIGHTS_FILE).stat().st_size
    return {"export_path": str(out), "export_bytes": size, "export_weights_bytes": weights}
