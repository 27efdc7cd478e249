"""Distillation losses on logits and hidden states (plain functions on tensors).

- Logit distillation (Hinton et al. 2015): T^2 * KL(softmax(z_t / T) || softmax(z_s / T)) per token;
  the T^2 factor keeps gradient magnitudes comparable across temperatures.
- Feature distillation (e.g. TinyBERT, Jiao et al. 2020): MSE between the (projected) student
  hidden state and the mapped teacher hidden state; `nmse` divides each token's squared error by
  the squared norm of the teacher's hidden state there, so the loss is scale-free (LLM hidden
  states carry a few huge outlier dimensions) and a mean over tokens (so it splits exactly over
  data-parallel processes); `cosine` uses 1 - cosine similarity per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return values.mean()
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1)


def kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
            mask: torch.Tensor | None = None) -> torch.Tensor:
    """T^2 * KL(teacher || student) at temperature T, averaged over tokens where `mask` is True.

    Args:
        student_logits, teacher_logits: [..., vocab] (same shape).
        mask: [...] bool, tokens to include (default all).
    """
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    per_token = (t.exp() * (t - s)).sum(-1)
    return temperature**2 * _masked_mean(per_token, mask)


def ce_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits [..., V] against labels [...] (-100 = ignored)."""
    return F.cross_entropy(logits.float().flatten(0, -2), labels.flatten(), ignore_index=-100)


def feature_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str = "nmse") -> torch.Tensor:
    """Distance between hidden states [..., d] of equal width (project the student first)."""
    student, teacher = student.float(), teacher.float()
    if kind == "mse":
        return F.mse_loss(student, teacher)
    if kind == "nmse":
        err = (student - teacher).pow(2).sum(-1) / teacher.pow(2).sum(-1).clamp_min(1e-12)
        return err.mean()
    if kind == "cosine":
        return (1 - F.cosine_similarity(student, teacher, dim=-1)).mean()
    raise ValueError(f"unknown feature loss {kind!r} (mse, nmse, cosine)")
