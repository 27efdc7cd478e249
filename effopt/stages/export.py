"""export: write the model where people run it, with a manifest saying what the folder holds.

Formats (writers in effopt/exporters/):
- `hf`: a Hugging Face folder. Dense by default (effopt modules turned back into plain layers, so
  transformers loads it); `packed: true` keeps them packed (effopt and its kernels load it).
- `compressed-tensors`: pack-quantized int4/int8 weights + quantization_config, for vLLM and
  transformers (needs a quantize stage with 4 or 8 bits and a group size dividing the layer width).
- `gguf`: one .gguf file (F16, Q8_0, Q4_0, Q4_1, Q4_K) for llama.cpp; llama architecture.
- `peft`: `base/` + `adapter/` for a model carrying LoRA adapters.
A model with adapters is merged first for every format but `peft`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from effopt.exporters.hf import densify  # noqa: F401  (kept importable from here)
from effopt.registry import register_stage
from effopt.stages.base import StageConfig

FORMAT_OPTIONS = {"packed": ("hf", "peft"), "gguf_type": ("gguf",), "tokenizer_pre": ("gguf",)}


class ExportConfig(StageConfig):
    """Where and how to write the model."""

    stage: Literal["export"] = "export"
    format: Literal["hf", "compressed-tensors", "gguf", "peft"] = Field("hf", description="Output format.")
    path: str = Field("model", description="Output folder, relative to the run directory (or absolute).")
    packed: bool = Field(False, description="hf/peft: keep quantized/low-rank layers packed (effopt-loadable only) "
                                            "instead of writing dense weights transformers loads.")
    gguf_type: Literal["F32", "F16", "Q8_0", "Q4_0", "Q4_1", "Q4_K"] = Field(
        "Q8_0", description="gguf: type of the 2-D weights (norms stay F32). Layers effopt quantized with the "
                            "same layout (4-bit sym g32 = Q4_0, 4-bit asym g32 = Q4_1, 8-bit sym g32 = Q8_0) "
                            "keep their codes.")
    tokenizer_pre: str | None = Field(None, description="gguf: llama.cpp pre-tokenizer name; default: the source "
                                                        "GGUF's, else 'default'.")

    @model_validator(mode="after")
    def _options_fit_format(self) -> "ExportConfig":
        for option, formats in FORMAT_OPTIONS.items():  # defaults pass: resolved recipes spell every field
            if getattr(self, option) != type(self).model_fields[option].default and self.format not in formats:
                raise ValueError(f"{option} applies to format {' or '.join(formats)}, not {self.format!r}")
        return self


def _tokenizer_pre(cfg: ExportConfig, ctx) -> str:
    if cfg.tokenizer_pre is not None:
        return cfg.tokenizer_pre
    source = Path(str(ctx.load_info.get("resolved", "")))
    if source.suffix == ".gguf" and source.is_file():
        from gguf import GGUFReader

        field = GGUFReader(source).fields.get("tokenizer.ggml.pre")
        if field is not None:
            return bytes(field.parts[field.data[0]]).decode()
    return "default"


def apply_export(cfg: ExportConfig, ctx) -> dict:
    """Write the export folder atomically and describe it in its manifest."""
    from effopt.exporters.peft import is_peft_model, merged_copy
    from effopt.pipeline import checkpoint_manifest

    out = Path(cfg.path) if Path(cfg.path).is_absolute() else ctx.run_dir / cfg.path
    manifest = checkpoint_manifest(ctx)
    model = ctx.model
    if cfg.format == "peft":
        from effopt.exporters.peft import export_peft

        return export_peft(model, ctx.tokenizer, out, manifest, packed=cfg.packed)
    if is_peft_model(model):
        model = merged_copy(model)
    if cfg.format == "hf":
        from effopt.exporters.hf import export_hf

        return export_hf(model, ctx.tokenizer, out, manifest, packed=cfg.packed)
    if cfg.format == "compressed-tensors":
        from effopt.exporters.compressed_tensors import export_compressed_tensors

        return export_compressed_tensors(model, ctx.tokenizer, out, manifest)
    from effopt.exporters.gguf import export_gguf

    return export_gguf(model, ctx.tokenizer, out, manifest, cfg.gguf_type, _tokenizer_pre(cfg, ctx))


register_stage("export", ExportConfig, apply_export, changes_model=False,
               summary="Write the model for other tools: hf, compressed-tensors (vLLM), gguf (llama.cpp), peft.")
