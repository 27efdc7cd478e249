"""The state a stage works on: the model, its tokenizer, the run's text data and bookkeeping."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class RunContext:
    """Passed to every stage's apply function; stages change `model` in place (or replace it).

    Attributes:
        recipe: the validated recipe.
        run_dir: the run directory.
        model, tokenizer: set by the load stage (or a resumed checkpoint).
        device: torch device the model lives on.
        data: effopt.data.TextData over the recipe's sources (set once a tokenizer exists).
        stage_index: index of the stage being applied.
        runtime: options the model needs at inference (e.g. KV-cache quantization); saved in
            checkpoints and exports so they survive resume and reload.
        history: one entry per completed stage (stage, method, key options): the manifest's history.
        load_info: what the load stage resolved (source, file hash).
        snapshot_loader: callable(stage_index) -> model as it was after that stage (for teachers).
    """

    recipe: Any
    run_dir: Path
    model: Any = None
    tokenizer: Any = None
    device: Any = None
    data: Any = None
    stage_index: int = 0
    runtime: dict = field(default_factory=dict)
    history: list = field(default_factory=list)
    load_info: dict = field(default_factory=dict)
    snapshot_loader: Any = None

    def snapshot(self, stage_index: int):
        """The model as it was right after stage `stage_index` (a fresh copy)."""
        if self.snapshot_loader is None:
            raise RuntimeError("no snapshot loader in this context")
        return self.snapshot_loader(stage_index)
