"""Which student layer imitates which teacher layer, and the projections between their widths."""

from __future__ import annotations

import torch


def layer_map(student_layers: int, teacher_layers: int, stride: int | None = None,
              student_indices: list[int] | None = None) -> list[tuple[int, int]]:
    """(student layer, teacher layer) pairs, 0-based: student layer i imitates teacher layer
    (i + 1) * k - 1, i.e. every k-th teacher layer (k = teacher_layers / student_layers by default),
    so the last student layer always maps to the last teacher layer.

    Args:
        stride: k; must satisfy student_layers * k <= teacher_layers.
        student_indices: only these student layers (default all).
    """
    if stride is None:
        if teacher_layers % student_layers:
            raise ValueError(f"teacher has {teacher_layers} layers, not a multiple of the student's "
                             f"{student_layers}: give layer_stride")
        stride = teacher_layers // student_layers
    if stride < 1 or student_layers * stride > teacher_layers:
        raise ValueError(f"layer_stride {stride}: {student_layers} student layers x {stride} exceeds the "
                         f"teacher's {teacher_layers}")
    indices = range(student_layers) if student_indices is None else student_indices
    pairs = []
    for i in indices:
        if not 0 <= i < student_layers:
            raise ValueError(f"student layer {i} out of range 0..{student_layers - 1}")
        pairs.append((i, (i + 1) * stride - 1))
    return pairs


def projections(pairs: list[tuple[int, int]], student_width: int, teacher_width: int,
                always: bool = False) -> torch.nn.ModuleList:
    """One learnable linear map student_width -> teacher_width per pair when the widths differ (or
    `always`); identities otherwise."""
    if student_width == teacher_width and not always:
        return torch.nn.ModuleList(torch.nn.Identity() for _ in pairs)
    maps = torch.nn.ModuleList()
    for _ in pairs:
        proj = torch.nn.Linear(student_width, teacher_width, bias=False)
        if student_width == teacher_width:
            torch.nn.init.eye_(proj.weight)
        maps.append(proj)
    return maps
