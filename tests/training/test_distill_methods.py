"""Distillation losses, layer maps, projections and teacher responses on tiny tensors and models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from effopt.methods.distill.layer_map import layer_map, projections
from effopt.methods.distill.losses import ce_loss, feature_loss, kl_loss
from tests.conftest import tiny_llama


def test_kl_is_zero_for_equal_logits_and_matches_torch_kl_div_with_t_squared():
    s, t = torch.randn(3, 5, 11), torch.randn(3, 5, 11)
    assert kl_loss(t, t, 2.0).abs() < 1e-6
    for temp in (1.0, 2.0, 4.0):
        ref = F.kl_div(F.log_softmax(s / temp, -1), F.log_softmax(t / temp, -1), log_target=True,
                       reduction="none").sum(-1).mean() * temp**2
        torch.testing.assert_close(kl_loss(s, t, temp), ref, atol=1e-6, rtol=1e-5)


def test_kl_mask_selects_tokens():
    s, t = torch.randn(2, 4, 7), torch.randn(2, 4, 7)
    mask = torch.tensor([[True, False, False, False], [False, False, False, True]])
    ref = (kl_loss(s[0, :1], t[0, :1]) + kl_loss(s[1, 3:], t[1, 3:])) / 2
    torch.testing.assert_close(kl_loss(s, t, 1.0, mask), ref, atol=1e-6, rtol=1e-5)


def test_ce_ignores_minus_100():
    logits, labels = torch.randn(2, 3, 5), torch.tensor([[1, -100, 2], [-100, -100, 4]])
    keep = labels != -100
    torch.testing.assert_close(ce_loss(logits, labels), F.cross_entropy(logits[keep], labels[keep]))


@pytest.mark.parametrize("kind,scale_free", [("mse", False), ("nmse", True), ("cosine", True)])
def test_feature_losses(kind, scale_free):
    t = torch.randn(2, 3, 8)
    assert feature_loss(t, t, kind) < 1e-6
    s = t + 0.1 * torch.randn(2, 3, 8)
    base = feature_loss(s, t, kind)
    assert base > 0
    scaled = feature_loss(10 * s, 10 * t, kind)
    assert torch.isclose(scaled, base, rtol=1e-4) == scale_free


@pytest.mark.parametrize("student,teacher,stride,expected", [
    (4, 4, None, [(0, 0), (1, 1), (2, 2), (3, 3)]),
    (2, 6, None, [(0, 2), (1, 5)]),
    (3, 12, 4, [(0, 3), (1, 7), (2, 11)]),
    (2, 5, 2, [(0, 1), (1, 3)]),
])
def test_layer_map_every_kth_teacher_layer(student, teacher, stride, expected):
    assert layer_map(student, teacher, stride) == expected


def test_layer_map_rejects_impossible_maps():
    with pytest.raises(ValueError, match="multiple"):
        layer_map(2, 5)
    with pytest.raises(ValueError, match="exceeds"):
        layer_map(3, 5, 2)


def test_projection_only_when_widths_differ():
    same = projections([(0, 0)], 16, 16)
    assert isinstance(same[0], torch.nn.Identity)
    diff = projections([(0, 1), (1, 3)], 16, 32)
    assert [tuple(p.weight.shape) for p in diff] == [(32, 16), (32, 16)]
    forced = projections([(0, 0)], 16, 16, always=True)
    torch.testing.assert_close(forced[0].weight, torch.eye(16))


def test_feature_distillation_across_widths_trains_the_projection():
    from effopt.methods.distill.task import DistillTask
    from effopt.training.loop import train
    from effopt.training.options import TrainOptions

    student, teacher = tiny_llama(seed=1, layers=2, hidden=32, heads=2, kv_heads=1), tiny_llama(layers=4)
    task = DistillTask(student, teacher, feature_weight=1.0, pairs=layer_map(2, 4), ce_weight=0.5)
    before = task.projections[0].weight.detach().clone()
    ids = torch.randint(3, 259, (8, 16), generator=torch.Generator().manual_seed(0))
    metrics = train(task, {"input_ids": ids}, TrainOptions(steps=4, batch_size=2, seq_len=16, lr=1e-2))
    assert not torch.equal(task.projections[0].weight, before)
    assert metrics["train_loss_last"] < metrics["train_loss_first"]
    assert not any(p.requires_grad for p in teacher.parameters())
    assert all(not n.startswith("_teacher") for n in task.state_dict())


def test_teacher_responses_label_only_the_generated_tokens():
    from effopt.methods.distill.response import teacher_responses

    prompts = torch.randint(3, 259, (3, 5), generator=torch.Generator().manual_seed(0))
    out = teacher_responses(tiny_llama(), prompts, new_tokens=4, batch_size=2, pad_token_id=2)
    assert out["input_ids"].shape == (3, 9)
    assert torch.equal(out["input_ids"][:, :5], prompts)
    assert (out["labels"][:, :5] == -100).all() and torch.equal(out["labels"][:, 5:], out["input_ids"][:, 5:])
    again = teacher_responses(tiny_llama(), prompts, new_tokens=4, batch_size=3, pad_token_id=2)
    assert torch.equal(again["input_ids"], out["input_ids"])  # greedy: deterministic, batch-independent
