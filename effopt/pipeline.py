"""The runner: stage order, run directory, run.json, checkpoints, resume and gates.

One runner for every recipe. Stages come from the registry; a stage that changes weights is
followed by a checkpoint, so a failed or killed run resumes from the last completed checkpoint and
ends with the same metrics as an uninterrupted one.
"""

from __future__ import annotations

import datetime as dt
import shutil
import time
import traceback
from pathlib import Path

from effopt import log
from effopt.context import RunContext
from effopt.errors import InputError, StageError
from effopt.monitor import PeakMemory
from effopt.recipe import dump_recipe, recipe_digest
from effopt.registry import spec_of
from effopt.rundir import RUN_FORMAT, checkpoint_dir, environment, read_run, write_atomic, write_json


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def stage_label(cfg) -> str:
    """`quantize/rtn`-style label unless the recipe gave one."""
    method = getattr(cfg, "method", None)
    return cfg.label or (f"{cfg.stage}/{method}" if method else cfg.stage)


def _fresh_record(recipe, run_dir: Path) -> dict:
    return {
        "format": RUN_FORMAT, "name": recipe.name, "status": "pending", "run_dir": str(run_dir),
        "recipe_digest": recipe_digest(recipe), "started": _now(), "finished": None, "seconds": 0.0,
        "stages": [{"index": i, "stage": s.stage, "method": getattr(s, "method", None), "label": stage_label(s),
                    "status": "pending", "seconds": None, "peak_rss_mb": None, "peak_gpu_mb": None,
                    "metrics": {}, "checkpoint": None, "error": None} for i, s in enumerate(recipe.stages)],
        "gates": [], "environment": environment(recipe.seed), "resumed": 0,
    }


def _open_run_dir(recipe, run_dir: Path, resume: bool) -> dict:
    """Create or reopen the run directory; return its run record."""
    if (run_dir / "run.json").is_file():
        if not resume:
            raise InputError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --output")
        record = read_run(run_dir)
        if record.get("recipe_digest") != recipe_digest(recipe):
            raise InputError(f"{run_dir}: the recipe differs from the one this run started with "
                             f"({run_dir / 'recipe.yaml'}); resume needs the same recipe and overrides")
        record["resumed"] = record.get("resumed", 0) + 1
        return record
    if resume and run_dir.exists() and any(run_dir.iterdir()):
        raise InputError(f"{run_dir}: nothing to resume (no run.json)")
    run_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(run_dir / "recipe.yaml", dump_recipe(recipe))
    return _fresh_record(recipe, run_dir)


def _resume_point(record: dict, run_dir: Path) -> int:
    """Index of the last completed stage whose checkpoint exists, preceded only by completed stages."""
    point = -1
    for entry in record["stages"]:
        if entry["status"] != "completed":
            break
        if entry.get("checkpoint") and (run_dir / entry["checkpoint"]).is_dir():
            point = entry["index"]
    return point


def _load_from_checkpoint(ctx: RunContext, folder: Path) -> None:
    from effopt.data import TextData
    from effopt.models import load_checkpoint, read_manifest

    manifest = read_manifest(folder)
    device = ctx.device
    if device is None:
        from effopt.models import pick_device

        device = pick_device(getattr(ctx.recipe.stages[0], "device", "auto"))
    import torch

    dtype = getattr(torch, manifest.get("dtype", "float32"))
    ctx.model, ctx.tokenizer = load_checkpoint(folder, dtype, device)
    ctx.device = device
    ctx.runtime = dict(manifest.get("runtime", {}))
    ctx.history = list(manifest.get("history", []))
    ctx.load_info = dict(manifest.get("load", {}))
    ctx.data = TextData(ctx.recipe.data, ctx.tokenizer, ctx.recipe.seed)


def checkpoint_manifest(ctx: RunContext) -> dict:
    """The manifest stored with checkpoints and exports: what the model is and how it was made."""
    import torch

    import effopt

    dtype = next((p.dtype for p in ctx.model.parameters()), torch.float32)
    return {"effopt": effopt.__version__, "recipe": ctx.recipe.model_dump(mode="json"), "history": ctx.history,
            "runtime": ctx.runtime, "load": ctx.load_info, "dtype": str(dtype).removeprefix("torch.")}


def _make_snapshot_loader(ctx: RunContext, record: dict, run_dir: Path):
    def load(index: int):
        from effopt.models import load_checkpoint, load_model

        best = None
        for entry in record["stages"][: index + 1]:
            if entry["status"] == "completed" and entry.get("checkpoint"):
                best = run_dir / entry["checkpoint"]
        if best is None:
            cfg = ctx.recipe.stages[0]
            model, _, _ = load_model(cfg.source, cfg.dtype, cfg.device, cfg.trust_remote_code)
            return model
        dtype = next(ctx.model.parameters()).dtype
        return load_checkpoint(best, dtype, ctx.device)[0]

    return load


def _check_gates(recipe, record: dict) -> list[dict]:
    evals = [s["metrics"] for s in record["stages"] if s["stage"] == "eval" and s["status"] == "completed"]
    results = []
    for gate in recipe.gates:
        if gate.metric == "run_seconds":
            value, first = record["seconds"], None
        elif gate.metric == "peak_rss_mb":
            value, first = max((s["peak_rss_mb"] or 0) for s in record["stages"]), None
        else:
            have = [e[gate.metric] for e in evals if gate.metric in e]
            value, first = (have[-1], have[0]) if have else (None, None)
        reasons = []
        if value is None:
            reasons.append(f"no eval recorded {gate.metric}")
        else:
            if gate.max is not None and value > gate.max:
                reasons.append(f"{gate.metric} = {value:.6g} > max {gate.max:g}")
            if gate.min is not None and value < gate.min:
                reasons.append(f"{gate.metric} = {value:.6g} < min {gate.min:g}")
            for key, bad in (("max_ratio", lambda r, t: r > t), ("min_ratio", lambda r, t: r < t)):
                limit = getattr(gate, key)
                if limit is None:
                    continue
                if first in (None, 0):
                    reasons.append(f"{gate.metric}: no first eval to compare with")
                elif bad(value / first, limit):
                    reasons.append(f"{gate.metric} = {value:.6g} is {value / first:.4f} x the first eval "
                                   f"({first:.6g}), limit {limit:g}")
        results.append({"gate": gate.describe(), "metric": gate.metric, "value": value, "passed": not reasons,
                        "reason": "; ".join(reasons) or None})
    return results


def run_recipe(recipe, run_dir: Path, resume: bool = False) -> dict:
    """Run every stage of `recipe` into `run_dir`; return the final run record.

    Raises:
        InputError: the run directory cannot be used (exists without --resume, other recipe).
        StageError: a stage raised; run.json says which and why, earlier checkpoints stay.
    """
    run_dir = Path(run_dir)
    record = _open_run_dir(recipe, run_dir, resume)
    log.set_log_file(run_dir / "log.txt")
    ctx = RunContext(recipe=recipe, run_dir=run_dir)
    ctx.snapshot_loader = _make_snapshot_loader(ctx, record, run_dir)
    start = 0
    if resume:
        point = _resume_point(record, run_dir)
        if point >= 0:
            log.info(f"resuming after stage {point} ({record['stages'][point]['label']})")
            _load_from_checkpoint(ctx, run_dir / record["stages"][point]["checkpoint"])
            start = point + 1
        for entry in record["stages"][start:]:
            entry.update(status="pending", error=None)
    record["status"] = "running"
    write_json(run_dir / "run.json", record)
    t_run = time.perf_counter()
    prior_seconds = sum((s["seconds"] or 0) for s in record["stages"][:start])
    for index in range(start, len(recipe.stages)):
        _run_stage(ctx, record, index)
        record["seconds"] = prior_seconds + time.perf_counter() - t_run
        write_json(run_dir / "run.json", record)
    record["gates"] = _check_gates(recipe, record)
    record["status"] = "completed" if all(g["passed"] for g in record["gates"]) else "gate_failed"
    record["finished"] = _now()
    write_json(run_dir / "run.json", record)
    log.set_log_file(None)
    return record


def _run_stage(ctx: RunContext, record: dict, index: int) -> None:
    cfg = ctx.recipe.stages[index]
    spec = spec_of(cfg.stage)
    entry = record["stages"][index]
    entry.update(status="running", error=None, metrics={})
    write_json(ctx.run_dir / "run.json", record)
    label = entry["label"]
    log.info(f"[{index + 1}/{len(record['stages'])}] {label}")
    ctx.stage_index = index
    t0 = time.perf_counter()
    try:
        with PeakMemory() as mem:
            metrics = spec.apply(cfg, ctx) or {}
            if cfg.stage == "load" or ctx.data is None:
                from effopt.data import TextData

                ctx.data = TextData(ctx.recipe.data, ctx.tokenizer, ctx.recipe.seed)
            ctx.history.append({"index": index, "stage": cfg.stage,
                                "config": cfg.model_dump(mode="json", exclude={"label"})})
            if spec.changes_model and cfg.stage != "load":
                folder = checkpoint_dir(ctx.run_dir, index, cfg.stage)
                from effopt.models import save_checkpoint

                with log.status(f"saving checkpoint {folder.name}"):
                    metrics["checkpoint_bytes"] = save_checkpoint(ctx.model, ctx.tokenizer, folder,
                                                                  checkpoint_manifest(ctx))
                entry["checkpoint"] = str(folder.relative_to(ctx.run_dir))
    except BaseException as exc:
        entry.update(status="failed", seconds=time.perf_counter() - t0,
                     error=f"{type(exc).__name__}: {exc}" if not isinstance(exc, KeyboardInterrupt) else "interrupted")
        record["status"] = "failed"
        record["finished"] = _now()
        write_json(ctx.run_dir / "run.json", record)
        log.detail(traceback.format_exc())
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        raise StageError(f"stage {index} ({label}) failed: {type(exc).__name__}: {exc}") from exc
    entry.update(status="completed", seconds=time.perf_counter() - t0, peak_rss_mb=round(mem.peak_rss_mb, 1),
                 peak_gpu_mb=round(mem.peak_gpu_mb, 1), metrics=metrics)
    summary = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()
                        if isinstance(v, (int, float)))
    log.info(f"    done in {entry['seconds']:.1f}s  {summary}")


def remove_checkpoints(run_dir: Path) -> None:
    """Delete a run's stage checkpoints (the record and model/ stay)."""
    shutil.rmtree(Path(run_dir) / "checkpoints", ignore_errors=True)
