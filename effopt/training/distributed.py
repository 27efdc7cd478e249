"""Multi-process training through torch.distributed, launched by torchrun's own elastic agent.

A training stage with `distributed.nproc > 1` saves its input model (and teacher) plus the training
batches into a scratch folder and starts `nproc` workers on this host with
`torch.distributed.launcher.api.elastic_launch` (what `torchrun --standalone --nproc_per_node N`
runs). Each worker joins the process group (nccl on CUDA, one GPU per local rank; gloo on CPU),
runs the very same job function a single process runs (the loop wraps the task in DDP or FSDP2),
and rank 0 writes the trained model back as an effopt checkpoint, which the parent loads. Stages
that do not train run once, in the parent.
"""

from __future__ import annotations

import importlib
import json
import os
import resource
import shutil
import tempfile
import uuid
from pathlib import Path

import torch

from effopt.training.loop import TrainEnv

JOB_FILE = "job.json"


def resolve(path: str):
    """Import `package.module:function`."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def backend_for(opts_backend: str, cuda: bool) -> str:
    """nccl on CUDA, gloo on CPU, unless the recipe says otherwise."""
    if opts_backend != "auto":
        return opts_backend
    return "nccl" if cuda else "gloo"


def _save_payload(folder: Path, job: str, cfg, model, teacher, batches: dict, env: TrainEnv) -> None:
    from effopt import log
    from effopt.models import save_checkpoint

    save_checkpoint(model, None, folder / "model", {})
    if teacher is not None:
        save_checkpoint(teacher, None, folder / "teacher", {})
    torch.save(batches, folder / "batches.pt")
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    meta = {"job": job, "config_type": f"{type(cfg).__module__}:{type(cfg).__qualname__}",
            "config": cfg.model_dump(mode="json"), "dtype": dtype, "seed": env.seed,
            "state_dir": str(env.state_dir) if env.state_dir else None,
            "artifact_dir": str(env.artifact_dir) if env.artifact_dir else None,
            "log_file": str(log._log_file) if log._log_file else None, "quiet": log._quiet}
    (folder / JOB_FILE).write_text(json.dumps(meta))


def worker(folder: str) -> dict:
    """Entry point of one worker process (RANK, WORLD_SIZE, LOCAL_RANK come from the agent)."""
    from effopt import log
    from effopt.models import load_checkpoint, save_checkpoint

    folder_path = Path(folder)
    meta = json.loads((folder_path / JOB_FILE).read_text())
    cfg = resolve(meta["config_type"]).model_validate(meta["config"])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    log.set_quiet(meta["quiet"] or rank != 0)  # rank 0 logs for everyone, into the run's log.txt too
    if rank == 0 and meta["log_file"]:
        log.set_log_file(Path(meta["log_file"]))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    torch.distributed.init_process_group(backend_for(cfg.distributed.backend, cuda))
    try:
        dtype = getattr(torch, meta["dtype"])
        model, _ = load_checkpoint(folder_path / "model", dtype, device)
        teacher = load_checkpoint(folder_path / "teacher", dtype, device)[0] \
            if (folder_path / "teacher").is_dir() else None
        batches = torch.load(folder_path / "batches.pt", weights_only=True)
        env = TrainEnv(device=device, rank=rank, world=world, seed=meta["seed"],
                       state_dir=Path(meta["state_dir"]) if meta["state_dir"] else None,
                       artifact_dir=Path(meta["artifact_dir"]) if meta["artifact_dir"] else None)
        model, metrics = resolve(meta["job"])(cfg, model, teacher, batches, env)
        if rank == 0:
            save_checkpoint(model, None, folder_path / "out", {})
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()
    metrics["worker_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return metrics


def launch(job: str, cfg, model, teacher, batches: dict, env: TrainEnv, scratch: Path | None = None):
    """Run `job(cfg, model, teacher, batches, env)` on cfg.distributed.nproc processes of this host;
    return (trained model on env.device, metrics of rank 0 plus the largest worker RSS)."""
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from effopt.models import load_checkpoint

    nproc = cfg.distributed.nproc
    if torch.cuda.is_available() and torch.cuda.device_count() < nproc:
        raise ValueError(f"distributed.nproc={nproc} but only {torch.cuda.device_count()} GPUs are visible")
    folder = Path(tempfile.mkdtemp(prefix="effopt-dist-", dir=scratch))
    try:
        dtype = next(model.parameters()).dtype
        _save_payload(folder, job, cfg, model, teacher, batches, env)
        for held in (model, teacher):  # the workers hold the copies now: free this process's device memory
            if held is not None:
                held.to("cpu")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=uuid.uuid4().hex[:12],
                              rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0,
                              monitor_interval=0.5, start_method="spawn")
        results = elastic_launch(config, worker)(str(folder))
        trained, _ = load_checkpoint(folder / "out", dtype, env.device)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    metrics = dict(results[0])
    metrics["worker_peak_rss_mb"] = max(r["worker_peak_rss_mb"] for r in results.values())
    return trained, metrics


def run_job(job: str, cfg, model, teacher, batches: dict, env: TrainEnv):
    """Run a training job in this process, or on several through `launch` when cfg asks for it."""
    if cfg.distributed.nproc == 1:
        return resolve(job)(cfg, model, teacher, batches, env)
    scratch = env.state_dir.parent if env.state_dir is not None else None
    if scratch is not None:
        scratch.mkdir(parents=True, exist_ok=True)
    return launch(job, cfg, model, teacher, batches, env, scratch)


def set_nproc(recipe, nproc: int) -> int:
    """`effopt run --nproc N`: set distributed.nproc on every training stage of a parsed recipe (each
    stage re-validated, e.g. batch_size must split over N processes); returns how many changed.

    Raises:
        InputError: a training stage cannot run on N processes.
    """
    from pydantic import ValidationError

    from effopt.errors import InputError

    changed = 0
    for i, stage in enumerate(recipe.stages):
        if not hasattr(stage, "distributed"):
            continue
        data = stage.model_dump()
        data["distributed"]["nproc"] = nproc
        try:
            recipe.stages[i] = type(stage).model_validate(data)
        except ValidationError as exc:
            msgs = "; ".join(e["msg"] for e in exc.errors())
            raise InputError(f"--nproc {nproc}: stage {i} ({stage.stage}): {msgs}") from None
        changed += 1
    return changed
