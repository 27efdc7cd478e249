"""Training options shared by the finetune and distill stages (and usable without a recipe).

`batch_size` is the global number of sequences per optimizer step: split over processes and
accumulation micro-steps, so the same recipe computes the same update on 1 or N processes.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class DistributedOptions(BaseModel):
    """How a training stage spreads over processes (torch.distributed, launched by torchrun's agent)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    nproc: int = Field(1, ge=1, description="Processes on this host (one per GPU on CUDA); 1 = no launch.")
    backend: Literal["auto", "gloo", "nccl"] = Field("auto", description="auto = nccl on CUDA, gloo on CPU.")
    strategy: Literal["ddp", "fsdp"] = Field("ddp", description="ddp replicates the model; fsdp shards parameters, "
                                                                "gradients and optimizer state per decoder layer.")


class TrainOptions(BaseModel):
    """The training loop's knobs: data, optimizer, schedule, precision, memory, checkpoints."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    data: str = Field("train", description="Name of the data source to train on (see data:).")
    steps: int = Field(100, ge=1, description="Optimizer steps.")
    batch_size: int = Field(4, ge=1, description="Sequences per optimizer step, over all processes and micro-steps.")
    grad_accum: int = Field(1, ge=1, description="Micro-steps per optimizer step (gradient accumulation).")
    seq_len: int = Field(512, ge=8, description="Tokens per training sequence.")
    optimizer: Literal["adamw", "adafactor", "lion", "adamw8bit", "sgd", "mezo"] = Field(
        "adamw", description="adamw/adafactor/sgd: torch; lion, adamw8bit: bitsandbytes; mezo: zeroth-order "
                             "(Malladi et al. 2023: two forward passes, no backward, no activations stored).")
    lr: float = Field(1e-4, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="Decoupled weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="Adam/Lion betas (Lion's paper uses 0.9, 0.99).")
    schedule: Literal["constant", "linear", "cosine"] = Field("cosine", description="LR schedule after warmup.")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps from 0 to lr.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the global gradient norm (null = off).")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="Autocast dtype; fp16 adds dynamic loss scaling (steps with inf/nan gradients are "
                            "skipped and the scale halves). Master weights stay in the model's dtype.")
    gradient_checkpointing: bool = Field(False, description="Recompute decoder-layer activations in backward.")
    mezo_eps: float = Field(1e-3, gt=0, description="MeZO perturbation scale epsilon.")
    checkpoint_every: int = Field(0, ge=0, description="Save the training state every N steps into "
                                                       "run_dir/train_state/NN (0 = never); --resume continues there.")
    log_every: int = Field(10, ge=1, description="Log the loss every N steps.")
    distributed: DistributedOptions = Field(default_factory=DistributedOptions,
                                            description="Processes and strategy (see README: multi-GPU).")

    @model_validator(mode="after")
    def _check_batch(self):
        per_step = self.grad_accum * self.distributed.nproc
        if self.batch_size % per_step:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of grad_accum x distributed.nproc "
                             f"({self.grad_accum} x {self.distributed.nproc})")
        if self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) exceeds steps ({self.steps})")
        return self
