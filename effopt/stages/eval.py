"""eval: measure the model as it is now (perplexity protocol in README), size, sparsity, speed."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from effopt.registry import register_stage
from effopt.stages.base import StageConfig


class BenchOptions(BaseModel):
    """Options of the `bench` metric set (what `effopt bench` measures, against transformers generate)."""

    model_config = ConfigDict(extra="forbid")
    prompt_len: int = Field(128, gt=0, description="Prompt tokens.")
    gen_len: int = Field(64, gt=1, description="New tokens per prompt.")
    batch: int = Field(1, gt=0, description="Prompts decoded together.")


class EvalConfig(StageConfig):
    """What to measure."""

    stage: Literal["eval"] = "eval"
    data: str = Field("eval", description="Name of the data source to score (see data:).")
    metrics: list[Literal["perplexity", "size", "speed", "bench"]] = Field(
        default_factory=lambda: ["perplexity", "size", "speed"], min_length=1, description="Metric groups to record.")
    speed_prompt_tokens: int = Field(32, gt=0, description="Prompt length for the decode-speed probe.")
    speed_new_tokens: int = Field(32, gt=0, description="Tokens generated for the decode-speed probe.")
    bench: BenchOptions = Field(default_factory=BenchOptions, description="Options of the bench metric set.")


def apply_eval(cfg: EvalConfig, ctx) -> dict:
    """Run the requested measurements."""
    from effopt import metrics
    from effopt.nn.runtime import use_runtime

    out: dict = {}
    if "size" in cfg.metrics:  # of the model as saved (not of a runtime form, e.g. compressed 2:4 copies)
        out.update(metrics.size_metrics(ctx.model))
    # runtime options, e.g. a quantized KV cache: its cost shows in perplexity
    with use_runtime(ctx.model, ctx.runtime):
        if "perplexity" in cfg.metrics:
            windows = ctx.data.windows(cfg.data)
            out.update(metrics.perplexity(ctx.model, windows, ctx.tokenizer, f"perplexity on {cfg.data}"))
            src = ctx.data.config(cfg.data)
            out["eval_source"] = src.source
            out["eval_seq_len"] = src.seq_len
            out["eval_bos"] = ctx.data.bos(cfg.data)
        if "speed" in cfg.metrics:
            out.update(metrics.decode_speed(ctx.model, ctx.tokenizer, cfg.speed_prompt_tokens, cfg.speed_new_tokens,
                                            ctx.recipe.seed))
    if "bench" in cfg.metrics:
        from effopt.bench import bench_metrics

        out.update(bench_metrics(ctx.model, ctx.tokenizer, cfg.bench.prompt_len, cfg.bench.gen_len, cfg.bench.batch,
                                 ctx.runtime, ctx.recipe.seed))
    return out


register_stage("eval", EvalConfig, apply_eval, changes_model=False,
               summary="Measure perplexity (fixed protocol), size, bits per weight, sparsity, decode speed.")
