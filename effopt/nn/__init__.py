"""What a compressed model is made of: effopt's own modules, and how checkpoints rebuild them.

Every effopt module type is registered here. A registered type has `spec() -> dict` (JSON-able
constructor arguments) and `from_spec(spec)` (an empty module of the right shapes) so a checkpoint
can rebuild the module tree and then load its state dict. Registration rejects duplicates.
"""

from __future__ import annotations

from typing import Any

import torch

MODULE_TYPES: dict[str, type] = {}


def register_module(cls: type) -> type:
    """Class decorator: make an nn.Module type restorable from checkpoints."""
    name = cls.__name__
    if name in MODULE_TYPES:
        raise ValueError(f"effopt module type {name!r} is already registered")
    if not (hasattr(cls, "spec") and hasattr(cls, "from_spec")):
        raise TypeError(f"{name} needs spec() and from_spec(spec) to be checkpointable")
    MODULE_TYPES[name] = cls
    return cls


def set_submodule(model: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    """Replace the submodule at dotted path `name`."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def module_specs(model: torch.nn.Module) -> dict[str, dict[str, Any]]:
    """{module name: {type, spec}} for every effopt module inside `model`."""
    _import_builtin_modules()
    out = {}
    for name, module in model.named_modules():
        if type(module).__name__ in MODULE_TYPES and type(module) is MODULE_TYPES[type(module).__name__]:
            out[name] = {"type": type(module).__name__, "spec": module.spec()}
    return out


def apply_module_specs(model: torch.nn.Module, specs: dict[str, dict[str, Any]]) -> None:
    """Swap in empty effopt modules per `specs` (outermost first) before loading a state dict."""
    _import_builtin_modules()
    for name in sorted(specs, key=lambda n: n.count(".")):
        entry = specs[name]
        cls = MODULE_TYPES.get(entry["type"])
        if cls is None:
            raise ValueError(f"checkpoint needs effopt module type {entry['type']!r}, unknown to this version")
        set_submodule(model, name, cls.from_spec(entry["spec"]))


def _import_builtin_modules() -> None:
    import effopt.nn.modules  # noqa: F401  (registers every builtin module type)
