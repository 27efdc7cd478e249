"""Taylor scores against a hand-computed |w * grad|, and the hard-concrete L0 gates."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import tiny_llama
from effopt.methods.pruning.learned import BETA, GAMMA, ZETA, HardConcreteGate, train_gates
from effopt.methods.pruning.masks import masks_from_scores, mask_sparsity
from effopt.methods.pruning.scores import magnitude_scores, taylor_scores



@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run many small ops: one thread avoids stalls on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


def test_taylor_scores_under_bf16_autocast_track_float32_ones():
    model = tiny_llama()
    name = "model.layers.1.mlp.down_proj"
    module = model.get_submodule(name)
    exact = taylor_scores(model, {name: module}, IDS.split(2))[name]
    fast = taylor_scores(model, {name: module}, IDS.split(2), autocast=torch.bfloat16)[name]
    assert fast.dtype == torch.float32 and module.weight.dtype == torch.float32
    assert not torch.equal(fast, exact)  # the passes really ran in bfloat16
    corr = torch.corrcoef(torch.stack([fast.flatten(), exact.flatten()]))[0, 1]
    assert corr > 0.98, corr


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
    p_open = gate.open_probability()[0].item()
    assert math.isclose(p_open, 1 / (1 + math.exp(BETA * math.log(-GAMMA / ZETA))), rel_tol=1e-6)
    assert abs(float((z > 0).float().mean()) - p_open) < 0.01  # P(z != 0) matches the L0 term


def _masked_loss(masks, samples):
    model = tiny_llama()
    with torch.no_grad():
        for name, keep in masks.items():
            model.get_submodule(name).weight.mul_(keep)
        return model(input_ids=samples, labels=samples).loss.item()


def test_learned_gates_reach_the_target_and_beat_magnitude_on_their_text():
    torch.manual_seed(0)
    model = tiny_llama()
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    weights = {n: model.get_submodule(n).weight.detach().clone() for n in names}
    samples = torch.randint(3, 250, (8, 32), generator=torch.Generator().manual_seed(1))
    scores, stats = train_gates(model, {n: model.get_submodule(n) for n in names}, samples, 0.5, steps=100,
                                batch_size=2, lr=0.1, lambda_lr=0.3)
    assert abs(stats["expected_sparsity"] - 0.5) < 0.15, stats
    learned = masks_from_scores(scores, 0.5)
    assert abs(mask_sparsity(learned) - 0.5) < 1e-3
    magnitude = masks_from_scores({n: weights[n].abs() for n in names}, 0.5)
    assert _masked_loss(learned, samples) < _masked_loss(magnitude, samples) - 0.05
    for n in names:  # the weights themselves never trained, and the original layers are back
        assert type(model.get_submodule(n)) is torch.nn.Linear
        assert torch.equal(model.get_submodule(n).weight, weights[n])
