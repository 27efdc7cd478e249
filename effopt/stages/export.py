"""export: write the model where people run it, with a manifest that `load` reads back.

`format: hf` writes a Hugging Face folder (safetensors + config + tokenizer). By default effopt's
compressed modules are turned back into dense layers, so plain transformers loads it; with
`packed: true` they stay packed and only effopt (or its kernels) loads them.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Literal

from pydantic import Field

from effopt.registry import register_stage
from effopt.stages.base import StageConfig


class ExportConfig(StageConfig):
    """Where and how to write the model."""

    stage: Literal["export"] = "export"
    format: Literal["hf"] = Field("hf", description="Output format.")
    path: str = Field("model", description="Output folder, relative to the run directory (or absolute).")
    packed: bool = Field(False, description="Keep quantized/low-rank layers packed (effopt-loadable only) "
                                            "instead of writing dense weights transformers loads.")


def densify(model):
    """A copy of `model` with every effopt module replaced by its dense equivalent (`to_dense`)."""
    from effopt.nn import MODULE_TYPES, set_submodule

    dense = copy.deepcopy(model)
    for name, module in list(dense.named_modules()):
        if type(module).__name__ in MODULE_TYPES and hasattr(module, "to_dense"):
            set_submodule(dense, name, module.to_dense())
    return dense


def apply_export(cfg: ExportConfig, ctx) -> dict:
    """Write the export folder atomically and describe it in its manifest."""
    from effopt.models import save_checkpoint
    from effopt.nn import module_specs
    from effopt.pipeline import checkpoint_manifest

    out = Path(cfg.path) if Path(cfg.path).is_absolute() else ctx.run_dir / cfg.path
    model = ctx.model if cfg.packed else densify(ctx.model)
    if not cfg.packed and module_specs(model):
        raise ValueError("export: some effopt modules have no dense form; use packed: true")
    manifest = checkpoint_manifest(ctx)
    manifest["format"] = {"name": cfg.format, "packed": cfg.packed,
                          "modules": {k: v["type"] for k, v in module_specs(model).items()}}
    if out.exists():
        shutil.rmtree(out)
    size = save_checkpoint(model, ctx.tokenizer, out, manifest)
    weights = (out / "model.safetensors").stat().st_size
    return {"export_path": str(out), "export_bytes": size, "export_weights_bytes": weights}


register_stage("export", ExportConfig, apply_export, changes_model=False,
               summary="Write the model as a Hugging Face folder with an effopt manifest.")
