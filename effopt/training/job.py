"""Plumbing the training stages share: their batches, folders, config digest and job launch."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import torch

from effopt.training.loop import TrainEnv


def config_digest(cfg) -> str:
    """Hash of a stage config: a saved training state resumes only under the same config."""
    return hashlib.sha256(cfg.model_dump_json(exclude={"label", "distributed"}).encode()).hexdigest()[:16]


def lm_batches(ctx, cfg) -> dict:
    """steps x batch_size seeded random windows of cfg.seq_len tokens from the cfg.data source."""
    return {"input_ids": ctx.data.samples(cfg.data, cfg.steps * cfg.batch_size, cfg.seq_len)}


def state_dir(ctx) -> Path:
    """run_dir/train_state/NN: where this stage's training state lives until it completes."""
    return Path(ctx.run_dir) / "train_state" / f"{ctx.stage_index:02d}"


def stage_env(ctx, artifact_name: str | None = None) -> TrainEnv:
    """The TrainEnv of a stage run by the runner (device, seed, state and artifact folders)."""
    device = ctx.device if ctx.device is not None else torch.device("cpu")
    artifacts = Path(ctx.run_dir) / "adapters" / artifact_name if artifact_name else None
    return TrainEnv(device=torch.device(device), seed=ctx.recipe.seed, state_dir=state_dir(ctx),
                    artifact_dir=artifacts)


def run_stage_job(job: str, cfg, ctx, teacher, batches: dict, artifact_name: str | None = None) -> dict:
    """Train through `job` (in-process or on several processes), install the result as ctx.model,
    and drop the stage's training state once it is done. Returns the job's metrics."""
    from effopt.training.distributed import run_job

    env = stage_env(ctx, artifact_name)
    model, metrics = run_job(job, cfg, ctx.model, teacher, batches, env)
    ctx.model = model
    shutil.rmtree(env.state_dir, ignore_errors=True)
    if env.state_dir.parent.is_dir() and not any(env.state_dir.parent.iterdir()):
        env.state_dir.parent.rmdir()
    return metrics
