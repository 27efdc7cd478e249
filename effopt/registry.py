"""The one registry of stages: stage name -> (config types, apply function).

A stage module registers itself explicitly (see effopt/stages/__init__.py); the recipe schema and
the runner are built from this table, so adding a stage never touches either. Registering a name
twice is an error, never a silent override.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from pydantic import BaseModel


@dataclass(frozen=True)
class StageSpec:
    """What the runner needs to know about one stage.

    Attributes:
        name: the `stage:` tag in recipes.
        configs: one pydantic config per method (or a single one for method-less stages).
        apply: `apply(config, ctx) -> dict` transforms `ctx.model` in place and returns metrics.
        changes_model: True when the stage alters weights, so the runner checkpoints after it.
        summary: one line for `effopt stages`.
    """

    name: str
    configs: tuple[type[BaseModel], ...]
    apply: Callable[[Any, Any], dict]
    changes_model: bool
    summary: str


_STAGES: dict[str, StageSpec] = {}


def register_stage(name: str, configs: list[type[BaseModel]] | type[BaseModel], apply: Callable[[Any, Any], dict],
                   *, changes_model: bool, summary: str) -> StageSpec:
    """Add a stage to the registry. Raises ValueError on a duplicate name or method tag."""
    if name in _STAGES:
        raise ValueError(f"stage {name!r} is already registered")
    configs = tuple(configs) if isinstance(configs, (list, tuple)) else (configs,)
    methods = [c.model_fields["method"].default if "method" in c.model_fields else None for c in configs]
    if len(configs) > 1 and (None in methods or len(set(methods)) != len(methods)):
        raise ValueError(f"stage {name!r}: every config needs a distinct `method` tag, got {methods}")
    spec = StageSpec(name, configs, apply, changes_model, summary)
    _STAGES[name] = spec
    return spec


def stages() -> dict[str, StageSpec]:
    """Every registered stage, in registration order (load stages first)."""
    import effopt.stages  # noqa: F401  (registers the builtin stages)

    return dict(_STAGES)


def spec_of(stage_name: str) -> StageSpec:
    """The spec registered for `stage_name` (KeyError if none)."""
    return stages()[stage_name]
