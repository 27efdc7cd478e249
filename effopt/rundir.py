"""The run directory contract: recipe.yaml, run.json, log.txt, checkpoints/, model/.

run.json is a stable interface (README: run.json format); every write is atomic (temp + rename),
so a run killed at any moment leaves a readable record.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path

RUN_FORMAT = 1


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temp file and rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: Path, data: dict) -> None:
    """Atomic JSON write."""
    write_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


def read_run(run_dir: Path) -> dict:
    """Read DIR/run.json (ValueError when it is not a run directory)."""
    path = Path(run_dir) / "run.json"
    if not path.is_file():
        raise ValueError(f"{run_dir}: not an effopt run directory (no run.json)")
    return json.loads(path.read_text())


def checkpoint_dir(run_dir: Path, index: int, stage: str) -> Path:
    """Folder of the checkpoint written after stage `index`."""
    return Path(run_dir) / "checkpoints" / f"{index:02d}-{stage}"


def git_revision() -> str | None:
    """The git revision of the effopt source tree, when it is a checkout."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(seed: int, device: str | None = None) -> dict:
    """Versions and machine facts recorded in run.json."""
    import torch
    import transformers

    import effopt
    from effopt import hostmem

    env = {"effopt": effopt.__version__, "python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__, "platform": platform.platform(), "cpu_count": os.cpu_count(),
           "cuda": torch.cuda.is_available(), "git_revision": git_revision(), "seed": seed, "device": device,
           "host_allocator": hostmem.applied or None}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    return env
