"""Taylor scores against a hand-computed |w * grad|, and the hard-concrete L0 gates."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import tiny_llama
from effopt.methods.pruning.learned import BETA, GAMMA, ZETA, HardConcreteGate, train_gates
from effopt.methods.pruning.masks import masks_from_scores, mask_sparsity
from effopt.methods.pruning.scores import magnitude_scores, taylor_scores

IDS = torch.randint(3, 250, (4, 24), generator=torch.Generator().manual_seed(0))


def test_taylor_scores_sum_per_batch_abs_w_grad():
    model = tiny_llama()
    name = "model.layers.1.mlp.down_proj"
    module = model.get_submodule(name)
    scores = taylor_scores(model, {name: module}, IDS.split(2))
    expected = torch.zeros_like(module.weight)
    for batch in IDS.split(2):
        model.zero_grad()
        model(input_ids=batch, labels=batch).loss.backward()
        expected += (module.weight * module.weight.grad).abs()
    assert torch.allclose(scores[name], expected, rtol=1e-4, atol=1e-9)
    assert not module.weight.requires_grad or all(p.requires_grad for p in model.parameters())


def test_taylor_restores_requires_grad_flags():
    model = tiny_llama()
    model.model.embed_tokens.weight.requires_grad_(False)
    name = "model.layers.0.self_attn.q_proj"
    taylor_scores(model, {name: model.get_submodule(name)}, [IDS])
    assert not model.model.embed_tokens.weight.requires_grad
    assert model.get_submodule(name).weight.requires_grad


def test_magnitude_scores_are_abs_weights():
    model = tiny_llama()
    name = "model.layers.0.mlp.up_proj"
    assert torch.equal(magnitude_scores({name: model.get_submodule(name)})[name],
                       model.get_submodule(name).weight.abs())


def test_hard_concrete_gate_statistics():
    torch.manual_seed(0)
    gate = HardConcreteGate(torch.Size([200_000]), init_keep=0.5)  # log_alpha = 0
    z = gate.sample()
    assert z.min() == 0 and z.max() == 1  # exact zeros and ones occur (the "hard" part)
    p_open = float(gate.open_probability()[0])
    assert math.isclose(p_open, 1 / (1 + math.exp(BETA * math.log(-GAMMA / ZETA))), rel_tol=1e-6)
    assert abs(float((z > 0).float().mean()) - p_open) < 0.01  # P(z != 0) matches the L0 term


@pytest.mark.parametrize("target", [0.5])
def test_train_gates_drives_expected_sparsity_to_the_target(target):
    torch.manual_seed(0)
    model = tiny_llama()
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    weights = {n: model.get_submodule(n).weight.detach().clone() for n in names}
    samples = torch.randint(3, 250, (8, 32), generator=torch.Generator().manual_seed(1))
    scores, stats = train_gates(model, {n: model.get_submodule(n) for n in names}, samples, target, steps=120,
                                batch_size=2, lr=0.1, lambda_lr=0.5)
    assert abs(stats["expected_sparsity"] - target) < 0.15, stats
    masks = masks_from_scores(scores, target)
    assert abs(mask_sparsity(masks) - target) < 1e-3
    for n in names:  # the weights themselves never trained, and the original layers are back
        assert type(model.get_submodule(n)) is torch.nn.Linear
        assert torch.equal(model.get_submodule(n).weight, weights[n])
