"""Export writers, one module per format: plain functions from a model to a folder other tools load.

Each writer takes the model, its tokenizer, the output folder and the run's manifest, writes the
folder atomically (a `.tmp` sibling renamed into place) with an `effopt_manifest.json` whose
`format` entry says what the folder holds, and returns metrics for run.json. None of them imports
from `effopt.stages`, so they are usable (and tested) without a recipe or a run directory.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

MANIFEST_FILE = "effopt_manifest.json"


def fresh_tmp(folder: Path) -> Path:
    """An empty `<folder>.tmp` sibling to write into before `commit`."""
    tmp = Path(folder).with_name(Path(folder).name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def commit(tmp: Path, folder: Path, manifest: dict) -> int:
    """Write the manifest into `tmp`, replace `folder` by it; return the folder's bytes on disk."""
    (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1, default=str))
    folder = Path(folder)
    if folder.exists():
        shutil.rmtree(folder)
    tmp.replace(folder)
    return folder_bytes(folder)


def folder_bytes(folder: Path) -> int:
    """Total size of the files under `folder`."""
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


def package_version(name: str) -> str | None:
    """Installed version of a distribution (None when absent): recorded in manifests."""
    import importlib.metadata as md

    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None
