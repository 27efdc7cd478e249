"""The training loop every training stage shares.

A *task* is an nn.Module whose forward takes a batch (dict of tensors with a leading sequence axis)
and returns a scalar loss; its trainable parameters are those with requires_grad. The loop adds
mixed precision (torch.autocast; fp16 with torch.amp.GradScaler), gradient accumulation, gradient
clipping, LR schedules, MeZO, DDP / FSDP when torch.distributed is initialized, and checkpoints of
the training state for mid-stage resume.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from effopt import log
from effopt.training import state as train_state
from effopt.training.optim import build_optimizer, build_scheduler

AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainEnv:
    """Where a training job runs: device, process rank and world size, and its folders."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    rank: int = 0
    world: int = 1
    seed: int = 0
    state_dir: Path | None = None
    artifact_dir: Path | None = None

    @property
    def is_main(self) -> bool:
        """True on the process that writes files and logs."""
        return self.rank == 0


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each decoder layer's activations in backward (transformers' own mechanism)."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False


def batch_rows(batches: dict, step: int, opts, env: TrainEnv) -> list[dict]:
    """This process's micro-batches of optimizer step `step`: the global batch's rows are split into
    `world` contiguous blocks (one per rank), each cut into `grad_accum` micro-batches."""
    per_rank = opts.batch_size // env.world
    start = step * opts.batch_size + env.rank * per_rank
    micro = per_rank // opts.grad_accum
    if micro == 0:
        raise ValueError(f"batch_size {opts.batch_size} is too small for {env.world} processes x "
                         f"{opts.grad_accum} micro-steps")
    return [{k: v[start + i * micro: start + (i + 1) * micro].to(env.device) for k, v in batches.items()}
            for i in range(opts.grad_accum)]


def _wrap(task: torch.nn.Module, opts, env: TrainEnv) -> torch.nn.Module:
    if env.world == 1 or opts.optimizer == "mezo":
        return task
    if opts.distributed.strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for module in task.modules():
            if isinstance(module, torch.nn.ModuleList) and any(p.requires_grad for p in module.parameters()):
                for layer in module:
                    fully_shard(layer)
        return fully_shard(task)
    from torch.nn.parallel import DistributedDataParallel

    ids = [env.device.index] if env.device.type == "cuda" else None
    return DistributedDataParallel(task, device_ids=ids)


def unshard_fsdp(module: torch.nn.Module) -> None:
    """Undo FSDP2's `fully_shard` in place after training: every sharded parameter becomes a plain
    full tensor again (all-gathered with DTensor.full_tensor, a collective every rank calls in the
    same module order), FSDP's forward hooks are removed and each module gets its original class
    back, so finalizing and saving see an ordinary model."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if isinstance(param, DTensor):
                full = param.full_tensor().detach().clone()
                sub._parameters[name] = torch.nn.Parameter(full, requires_grad=param.requires_grad)
    for sub in list(module.modules()):
        if isinstance(sub, FSDPModule):
            state = sub._get_fsdp_state()
            for handle in ("_pre_forward_hook_handle", "_post_forward_hook_handle"):
                if getattr(state, handle, None) is not None:
                    getattr(state, handle).remove()
            sub.__class__ = type(sub).__mro__[FSDPModule._orig_cls_mro_index]


def _mean_over_ranks(value: torch.Tensor, env: TrainEnv) -> float:
    if env.world > 1:
        value = value.clone()
        torch.distributed.all_reduce(value)
        value /= env.world
    return float(value)


def _autocast(opts, env: TrainEnv):
    dtype = AUTOCAST.get(opts.precision)
    return torch.autocast(env.device.type, dtype=dtype) if dtype else contextlib.nullcontext()


def _grad_step(wrapped, chunks, opts, env, optimizer, scaler, params) -> tuple[torch.Tensor, bool]:
    """Accumulate gradients over the micro-batches, then step; returns (mean loss, step skipped)."""
    total = torch.zeros((), device=env.device)
    for i, chunk in enumerate(chunks):
        last = i == len(chunks) - 1
        sync = contextlib.nullcontext() if last or not hasattr(wrapped, "no_sync") else wrapped.no_sync()
        with sync:
            with _autocast(opts, env):
                loss = wrapped(chunk)
            scaler.scale(loss.float() / len(chunks)).backward()
        total += loss.detach().float() / len(chunks)
    if opts.max_grad_norm is not None:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, opts.max_grad_norm)
    scale = scaler.get_scale() if scaler.is_enabled() else None
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return total, scale is not None and scaler.get_scale() < scale


def _mezo_step(wrapped, chunks, opts, env, optimizer) -> torch.Tensor:
    def closure() -> torch.Tensor:
        with _autocast(opts, env):
            return sum(wrapped(c).float() for c in chunks) / len(chunks)

    return optimizer.step(closure)


def train(task: torch.nn.Module, batches: dict, opts, env: TrainEnv | None = None, digest: str = "",
          stop_after: int | None = None) -> dict:
    """Train `task` for `opts.steps` optimizer steps on `batches` (each tensor [steps*batch_size, ...]).

    Args:
        task: module returning a scalar loss for a batch dict; trains its requires_grad parameters.
        batches: input tensors, `opts.batch_size` rows per step.
        opts: TrainOptions (or any object with the same attributes).
        env: device, rank/world (torch.distributed must be initialized when world > 1), state folder.
        digest: identifies the configuration; a saved state with another digest is not resumed.
        stop_after: stop (raising KeyboardInterrupt) after this many steps; simulates a kill in tests.

    Returns:
        metrics: first/last losses, steps, skipped steps, tokens, seconds, trainable parameters.
    """
    env = env or TrainEnv()
    _check_batches(batches, opts, env)
    run = _setup(task, opts, env)
    start, losses, skipped = 0, [], 0
    if env.state_dir is not None:
        resumed = train_state.load_state(env.state_dir, task, run.wrapped, run.optimizer, run.scheduler, run.scaler,
                                         digest, env.rank, run.sharded)
        if resumed is not None:
            start, losses = resumed
            if env.is_main:
                log.info(f"resuming training at step {start}/{opts.steps} from {env.state_dir}")
    after = getattr(task, "after_step", None)  # e.g. keep pruned weights at zero
    t0 = time.perf_counter()
    for step in range(start, opts.steps):
        loss, skip = run.step(batch_rows(batches, step, opts, env))
        skipped += int(skip)
        if after is not None:
            after()
        losses.append(_mean_over_ranks(loss, env))
        done = step + 1
        if env.is_main and (done % opts.log_every == 0 or done == opts.steps):
            log.info(f"    step {done}/{opts.steps}  loss {losses[-1]:.4f}  lr {run.scheduler.get_last_lr()[0]:.3g}")
        if env.state_dir is not None and opts.checkpoint_every and done % opts.checkpoint_every == 0 \
                and done < opts.steps:
            train_state.save_state(env.state_dir, done, task, run.wrapped, run.optimizer, run.scheduler, run.scaler,
                                   losses, digest, env.rank, run.sharded)
        if stop_after is not None and stop_after <= done < opts.steps:
            raise KeyboardInterrupt(f"stopped after step {done} (stop_after)")
    seconds = time.perf_counter() - t0
    if run.sharded:
        unshard_fsdp(task)
        if after is not None:
            after()
    task.eval()
    tokens = (opts.steps - start) * opts.batch_size * next(iter(batches.values())).shape[1]
    return _metrics(losses, opts, skipped, run.trainable, seconds, tokens, env=env)


def _check_batches(batches: dict, opts, env: TrainEnv) -> None:
    if opts.batch_size % (env.world * opts.grad_accum):
        raise ValueError(f"batch_size ({opts.batch_size}) must be a multiple of processes x grad_accum "
                         f"({env.world} x {opts.grad_accum})")
    rows = next(iter(batches.values())).shape[0]
    if rows < opts.steps * opts.batch_size:
        raise ValueError(f"training needs {opts.steps * opts.batch_size} sequences, got {rows}")


@dataclass
class _Run:
    """The objects one training run steps: wrapped task, optimizer, schedule, loss scaler."""

    wrapped: torch.nn.Module
    params: list
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler
    sharded: bool
    trainable: int
    opts: object
    env: TrainEnv

    def step(self, chunks: list[dict]) -> tuple[torch.Tensor, bool]:
        """One optimizer step on this process's micro-batches; returns (loss, step skipped)."""
        if self.opts.optimizer == "mezo":
            loss, skip = _mezo_step(self.wrapped, chunks, self.opts, self.env, self.optimizer), False
        else:
            loss, skip = _grad_step(self.wrapped, chunks, self.opts, self.env, self.optimizer, self.scaler,
                                    self.params)
        if not skip:  # a step skipped for inf gradients does not advance the schedule
            self.scheduler.step()
        return loss, skip


def _setup(task: torch.nn.Module, opts, env: TrainEnv) -> _Run:
    task.to(env.device).train()
    trainable = sum(p.numel() for p in task.parameters() if p.requires_grad)
    sharded = env.world > 1 and opts.distributed.strategy == "fsdp"
    if sharded and opts.optimizer == "mezo":
        raise ValueError("mezo needs no sharding (it keeps no gradients or states); use strategy: ddp")
    wrapped = _wrap(task, opts, env)
    params = [p for p in wrapped.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, opts)
    scaler = torch.amp.GradScaler(env.device.type, enabled=opts.precision == "fp16")
    return _Run(wrapped, params, optimizer, build_scheduler(optimizer, opts), scaler, sharded, trainable, opts, env)


def _metrics(losses, opts, skipped, trainable, seconds, tokens, env) -> dict:
    k = max(1, min(10, len(losses) // 2))  # first and last windows never overlap
    finite = [x for x in losses if math.isfinite(x)]
    out = {"train_steps": opts.steps, "train_loss_first": sum(losses[:k]) / max(k, 1),
           "train_loss_last": sum(losses[-k:]) / max(k, 1), "train_loss_min": min(finite) if finite else None,
           "skipped_steps": skipped, "trainable_params": trainable, "train_seconds": seconds,
           "train_tokens_per_s": tokens / max(seconds, 1e-9), "processes": env.world}
    if env.device.type == "cuda":
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated(env.device) / 2**20
    return out
