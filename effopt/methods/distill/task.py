"""The distillation training task: a student learns from a frozen teacher on the same batch."""

from __future__ import annotations

import torch

from effopt.methods.distill.layer_map import projections
from effopt.methods.distill.losses import ce_loss, feature_loss, kl_loss


class DistillTask(torch.nn.Module):
    """loss = kl_weight * KD(T) + ce_weight * CE + feature_weight * mean over mapped layers of
    feature_loss(proj(h_student), h_teacher).

    The teacher is held outside the module tree (not a submodule), so it is never trained, wrapped
    by DDP/FSDP or saved with the student. Hidden state i + 1 of a Hugging Face model is the output
    of decoder layer i; logit terms cover the positions whose next token has a label (not -100).
    """

    def __init__(self, student: torch.nn.Module, teacher: torch.nn.Module, temperature: float = 1.0,
                 kl_weight: float = 1.0, ce_weight: float = 0.0, feature_weight: float = 0.0,
                 pairs: list[tuple[int, int]] | None = None, feature_kind: str = "nmse",
                 always_project: bool = False):
        super().__init__()
        self.student = student
        self._teacher = [teacher.eval().requires_grad_(False)]
        self.temperature, self.kl_weight, self.ce_weight = temperature, kl_weight, ce_weight
        self.feature_weight, self.feature_kind = feature_weight, feature_kind
        self.pairs = list(pairs or [])
        if feature_weight and not self.pairs:
            raise ValueError("feature distillation needs at least one (student, teacher) layer pair")
        self.projections = projections(self.pairs, student.config.hidden_size, teacher.config.hidden_size,
                                       always_project)

    @property
    def teacher(self) -> torch.nn.Module:
        """The frozen teacher."""
        return self._teacher[0]

    def _apply(self, fn, *args, **kwargs):
        self._teacher[0] = self._teacher[0]._apply(fn, *args, **kwargs)
        return super()._apply(fn, *args, **kwargs)

    def forward(self, batch: dict) -> torch.Tensor:
        ids = batch["input_ids"]
        labels = batch.get("labels", ids)
        features = self.feature_weight > 0
        with torch.no_grad():
            t_out = self.teacher(input_ids=ids, output_hidden_states=features, use_cache=False)
        s_out = self.student(input_ids=ids, output_hidden_states=features, use_cache=False)
        mask = labels[:, 1:] != -100
        loss = torch.zeros((), device=ids.device)
        if self.kl_weight:
            loss = loss + self.kl_weight * kl_loss(s_out.logits[:, :-1], t_out.logits[:, :-1], self.temperature,
                                                   mask)
        if self.ce_weight:
            loss = loss + self.ce_weight * ce_loss(s_out.logits[:, :-1], labels[:, 1:])
        if features:
            terms = [feature_loss(proj(s_out.hidden_states[i + 1]), t_out.hidden_states[j + 1], self.feature_kind)
                     for proj, (i, j) in zip(self.projections, self.pairs)]
            loss = loss + self.feature_weight * torch.stack(terms).mean()
        return loss

    def after_step(self) -> None:
        """Keep the student's pruned weights at zero."""
        from effopt.training.tasks import enforce_masks

        enforce_masks(self.student)
