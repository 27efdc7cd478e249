"""Training state on disk, so a killed stage resumes mid-way: trainable weights, optimizer,
scheduler, loss scaler, step, losses and RNG, saved with torch.save and read back with
torch.load(weights_only=True) (no pickled code runs on load).

Layout of a stage's state folder (run_dir/train_state/NN): `state.pt` (written by rank 0) and
`rng_rank{r}.pt` (one per process). Files are written to a temp name and renamed, so a kill during
a save leaves the previous state intact.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

STATE_FILE = "state.pt"


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def trainable_names(module: torch.nn.Module) -> list[str]:
    """Names of the parameters that require gradients (the part of the model a state stores)."""
    return [n for n, p in module.named_parameters() if p.requires_grad]


def _weights_and_optimizer(task, wrapped, optimizer, sharded: bool) -> tuple[dict, dict]:
    names = set(trainable_names(task))
    if not sharded:
        weights = {n: p.detach().cpu().clone() for n, p in task.named_parameters() if n in names}
        return weights, optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights, optim = get_state_dict(wrapped, optimizer, options=opts)
    return {n: t for n, t in weights.items() if n in names}, optim


def save_state(folder: Path, step: int, task, wrapped, optimizer, scheduler, scaler, losses: list[float],
               digest: str, rank: int = 0, sharded: bool = False) -> None:
    """Write the state after `step` completed steps (every process calls this; rank 0 writes state.pt)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights, optim = _weights_and_optimizer(task, wrapped, optimizer, sharded)
    if rank == 0:
        _atomic_save({"step": step, "digest": digest, "weights": weights, "optimizer": optim,
                      "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "losses": list(losses)},
                     folder / STATE_FILE)
    _atomic_save(_rng_state(), folder / f"rng_rank{rank}.pt")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def load_state(folder: Path, task, wrapped, optimizer, scheduler, scaler, digest: str, rank: int = 0,
               sharded: bool = False) -> tuple[int, list[float]] | None:
    """Restore a saved state into the given objects; return (completed steps, losses), or None when
    there is no state or it belongs to another configuration."""
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("digest") != digest:
        return None
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(wrapped, optimizer, model_state_dict=state["weights"], optim_state_dict=state["optimizer"],
                       options=StateDictOptions(full_state_dict=True, strict=False))
    else:
        params = dict(task.named_parameters())
        with torch.no_grad():
            for name, value in state["weights"].items():
                params[name].copy_(value)
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    rng = Path(folder) / f"rng_rank{rank}.pt"
    if rng.is_file():
        _set_rng_state(torch.load(rng, map_location="cpu", weights_only=True))
    return int(state["step"]), list(state["losses"])
