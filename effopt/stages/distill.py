"""distill: train the model (student) to imitate a teacher: logits, hidden features or responses.

The teacher is by default the model as it was after stage 0 (before compression in this run;
`teacher: {stage: i}` names another completed stage) or any model the recipe names
(`teacher: {source: ...}`, like load's source). The student trains all its weights (pruned ones
stay zero, packed ones frozen) or, with a `lora:` block, LoRA factors merged at the end.
"""

from __future__ import annotations

import shutil
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from effopt.registry import register_stage
from effopt.stages.base import StageConfig, TargetedStageConfig
from effopt.training.options import TrainOptions

JOB = "effopt.stages.distill:distill_job"


class TeacherSpec(BaseModel):
    """Where the teacher comes from: a completed stage of this run, or a model source."""

    model_config = ConfigDict(extra="forbid")

    stage: int | None = Field(None, ge=0, description="Index of an earlier stage; the teacher is the model as it "
                                                      "was right after it (0 = as loaded).")
    source: str | None = Field(None, description="A model source as for load (builtin:..., folder, .gguf).")

    @model_validator(mode="after")
    def _one(self):
        if self.stage is None and self.source is None:
            self.stage = 0
        if self.stage is not None and self.source is not None:
            raise ValueError("teacher: give stage or source, not both")
        return self


class StudentLora(BaseModel):
    """Train the student through LoRA (merged at the end) instead of all its weights."""

    model_config = ConfigDict(extra="forbid")

    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: float = Field(32.0, gt=0, description="LoRA alpha.")
    dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout.")


class DistillBase(TargetedStageConfig, TrainOptions):
    """Options every distillation method shares (training options documented in TrainOptions)."""

    stage: Literal["distill"] = "distill"
    teacher: TeacherSpec = Field(default_factory=TeacherSpec, description="The teacher (default: stage 0).")
    temperature: float = Field(2.0, gt=0, description="Softmax temperature of the logit KL term.")
    kl_weight: float = Field(1.0, ge=0, description="Weight of the logit KL term.")
    ce_weight: float = Field(0.0, ge=0, description="Weight of the student's own next-token cross-entropy.")
    lora: StudentLora | None = Field(None, description="Train LoRA on the targets instead of all weights.")
    freeze: list[str] = Field(default_factory=list, description="Globs of parameter names kept frozen "
                                                                "(full training only).")
    lr: float = Field(5e-5, gt=0, description="Peak learning rate.")


class LogitsConfig(DistillBase):
    """Logit distillation: KL to the teacher's softened distribution, plus optional cross-entropy."""

    method: Literal["logits"] = "logits"


class FeaturesConfig(DistillBase):
    """Logits plus hidden-state distillation over a student->teacher layer map."""

    method: Literal["features"] = "features"
    feature_weight: float = Field(1.0, gt=0, description="Weight of the mean feature loss.")
    feature_loss: Literal["nmse", "mse", "cosine"] = Field("nmse", description="Distance between hidden states.")
    layer_stride: int | None = Field(None, ge=1, description="Student layer i imitates teacher layer (i+1)*k-1 "
                                                             "(null: k = teacher layers / student layers).")
    student_layers: list[int] | None = Field(None, description="Student layers to map (null = all).")
    project: Literal["auto", "always"] = Field("auto", description="Learnable projection when widths differ "
                                                                   "(auto) or on every pair (always).")


class ResponseConfig(DistillBase):
    """Response distillation: the teacher continues prompts from the train text; the student learns
    the continuations (cross-entropy on generated tokens; optional KL on them too)."""

    method: Literal["response"] = "response"
    prompt_len: int = Field(64, ge=1, description="Prompt tokens taken from the train text.")
    new_tokens: int = Field(128, ge=1, description="Tokens the teacher generates per prompt.")
    sample: bool = Field(False, description="Sample (else greedy) teacher continuations.")
    gen_temperature: float = Field(1.0, gt=0, description="Sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    kl_weight: float = Field(0.0, ge=0, description="Weight of the logit KL term on the responses.")
    ce_weight: float = Field(1.0, ge=0, description="Weight of cross-entropy on the teacher's tokens.")


class EagleConfig(StageConfig, TrainOptions):
    """Train an EAGLE draft head for the model as it is at this stage (the target of speculative
    decoding): one fused-input linear layer and one decoder layer over the model's top features,
    sharing its embeddings and LM head (effopt/methods/distill/eagle.py). The model itself is not
    changed; the head is written to `output` in the run directory, for `effopt bench --draft`.
    Trains in one process (the head is small; `distributed` is not used)."""

    stage: Literal["distill"] = "distill"
    method: Literal["eagle"] = "eagle"
    lr: float = Field(3e-4, gt=0, description="Peak learning rate.")
    token_weight: float = Field(0.1, ge=0, description="Weight of the token cross-entropy next to the feature "
                                                       "regression (the paper's 0.1).")
    noise: float = Field(0.1, ge=0, description="Half-width of the uniform noise added to input features.")
    output: str = Field("draft", description="Folder of the head, relative to the run directory.")

    @model_validator(mode="after")
    def _inside_run(self):
        from pathlib import PurePosixPath

        path = PurePosixPath(self.output)
        if path.is_absolute() or ".." in path.parts or not path.parts:
            raise ValueError(f"output: a folder inside the run directory is expected, got {self.output!r}")
        return self


def _prepare_student(cfg, model) -> torch.nn.Module:
    from effopt.methods.peft.adapters import mark_trainable
    from effopt.methods.peft.lora import add_lora, select_targets

    if cfg.lora is None:
        mark_trainable(model, cfg.freeze)
        return model
    names = select_targets(model, cfg.targets, cfg.ignore)
    return add_lora(model, names, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout)


def distill_job(cfg, model, teacher, batches: dict, env) -> tuple[torch.nn.Module, dict]:
    """Prepare the student, train it against the teacher, finalize it (runs in each process)."""
    from effopt.methods.distill.layer_map import layer_map
    from effopt.methods.distill.task import DistillTask
    from effopt.methods.peft.lora import finalize_lora
    from effopt.training.job import config_digest
    from effopt.training.loop import enable_gradient_checkpointing, train

    torch.manual_seed(env.seed)
    student = _prepare_student(cfg, model)
    pairs, weight = [], getattr(cfg, "feature_weight", 0.0)
    if weight:
        pairs = layer_map(student.config.num_hidden_layers, teacher.config.num_hidden_layers, cfg.layer_stride,
                          cfg.student_layers)
    task = DistillTask(student, teacher, cfg.temperature, cfg.kl_weight, cfg.ce_weight, weight, pairs,
                       getattr(cfg, "feature_loss", "nmse"), getattr(cfg, "project", "auto") == "always")
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(student)
    metrics = train(task, batches, cfg, env, config_digest(cfg))
    if cfg.gradient_checkpointing:
        student.gradient_checkpointing_disable()
        student.config.use_cache = True
    if cfg.lora is not None:
        metrics.update(finalize_lora(student))
    for p in student.parameters():
        p.requires_grad_(False)
    metrics["feature_pairs"] = len(pairs)
    return student, metrics


def load_teacher(cfg, ctx) -> torch.nn.Module:
    """The teacher named by cfg.teacher, frozen, on the run's device and dtype."""
    from effopt.models import load_model

    spec = cfg.teacher
    if spec.stage is not None:
        if spec.stage >= ctx.stage_index:
            raise ValueError(f"teacher stage {spec.stage} is not an earlier stage than this one ({ctx.stage_index})")
        teacher = ctx.snapshot(spec.stage)
    else:
        teacher = load_model(spec.source, "auto", str(ctx.device))[0]
    teacher.to(device=ctx.device, dtype=next(ctx.model.parameters()).dtype).eval().requires_grad_(False)
    if teacher.config.vocab_size != ctx.model.config.vocab_size:
        raise ValueError(f"teacher vocabulary ({teacher.config.vocab_size}) differs from the student's "
                         f"({ctx.model.config.vocab_size}): they must share a tokenizer")
    return teacher


def apply_eagle(cfg, ctx) -> dict:
    """Train an EAGLE head on ctx.data[cfg.data] against ctx.model (frozen) and save it."""
    from pathlib import Path

    from effopt.methods.distill.eagle import EagleHead, EagleTask, save_eagle
    from effopt.training.job import config_digest, lm_batches, stage_env
    from effopt.training.loop import train

    env = stage_env(ctx)
    torch.manual_seed(env.seed)
    target = ctx.model
    target.requires_grad_(False)
    head = EagleHead(target)
    task = EagleTask(head, target, cfg.token_weight, cfg.noise)
    metrics = train(task, lm_batches(ctx, cfg), cfg, env, config_digest(cfg))
    folder = save_eagle(head, Path(ctx.run_dir) / cfg.output, {"steps": cfg.steps, "seq_len": cfg.seq_len})
    shutil.rmtree(env.state_dir, ignore_errors=True)
    metrics.update({f"eagle_{k}_last": v for k, v in task.last.items()})
    metrics["draft_path"] = str(folder.relative_to(ctx.run_dir))
    metrics["draft_parameters"] = sum(p.numel() for p in head.parameters())
    return metrics


def apply_distill(cfg, ctx) -> dict:
    """Distill the teacher into ctx.model on ctx.data[cfg.data]."""
    import time

    if cfg.method == "eagle":
        return apply_eagle(cfg, ctx)

    from effopt.methods.distill.response import teacher_responses
    from effopt.training.job import lm_batches, run_stage_job

    teacher = load_teacher(cfg, ctx)
    extra = {}
    if cfg.method == "response":
        t0 = time.perf_counter()
        prompts = ctx.data.samples(cfg.data, cfg.steps * cfg.batch_size, cfg.prompt_len)
        pad = ctx.tokenizer.pad_token_id if ctx.tokenizer.pad_token_id is not None else ctx.tokenizer.eos_token_id
        batches = teacher_responses(teacher, prompts, cfg.new_tokens, cfg.sample, cfg.gen_temperature, cfg.top_p,
                                    seed=ctx.recipe.seed, pad_token_id=pad or 0)
        extra["generation_seconds"] = time.perf_counter() - t0
    else:
        batches = lm_batches(ctx, cfg)
    metrics = run_stage_job(JOB, cfg, ctx, teacher, batches)
    del teacher
    return {**metrics, **extra}


CONFIGS = [LogitsConfig, FeaturesConfig, ResponseConfig, EagleConfig]
register_stage("distill", CONFIGS, apply_distill, changes_model=True,
               summary="Distill a teacher (default: the model before compression) into the model: logits, "
                       "features, responses; or train an EAGLE draft head for it.")
