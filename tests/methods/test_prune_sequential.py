"""The layer-by-layer engine: every linear sees its full input once, after everything upstream was pruned."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_llama
from effopt.methods.pruning.sequential import run_layers
from effopt.methods.pruning.sparsegpt import sparsegpt_sequential
from effopt.methods.pruning.wanda import wanda_sequential


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run many small ops: one thread avoids stalls on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

IDS = torch.randint(3, 250, (3, 16), generator=torch.Generator().manual_seed(0))
ORDER = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
         "mlp.up_proj", "mlp.down_proj"]


def linear_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]


def test_run_layers_visits_every_linear_in_order_with_all_tokens():
    model = tiny_llama()
    seen = []
    run_layers(model, IDS, linear_names(model), lambda name, mod, x: seen.append((name, tuple(x.shape))))
    assert [n for n, _ in seen] == [f"model.layers.{i}.{s}" for i in range(2) for s in ORDER]
    assert all(shape == (48, 64) for _, shape in seen[:3])  # every token of all samples at once


def test_layers_compute_with_the_weights_changed_before_them():
    """Zeroing layer 0's down_proj in the hook must change what layer 1 receives."""
    model, reference = tiny_llama(), tiny_llama()
    inputs = {}

    def hook(name, module, x):
        if name.endswith("layers.0.mlp.down_proj"):
            module.weight.zero_()
        if name.endswith("layers.1.self_attn.q_proj"):
            inputs["q1"] = x.clone()

    run_layers(model, IDS, linear_names(model), hook)
    with torch.no_grad():
        reference.model.layers[0].mlp.down_proj.weight.zero_()
        states = reference(input_ids=IDS, output_hidden_states=True).hidden_states
        expected = reference.model.layers[1].input_layernorm(states[1]).reshape(48, -1)
    assert torch.allclose(inputs["q1"], expected, atol=1e-5)


def test_run_layers_refuses_linears_outside_the_decoder():
    model = tiny_llama(tie=False)
    with pytest.raises(ValueError, match="decoder-layer"):
        run_layers(model, IDS, ["lm_head"], lambda *a: None)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_sequential_pruning_zeroes_weights_in_place(method):
    model = tiny_llama()
    names = linear_names(model)
    fn = wanda_sequential if method == "wanda" else sparsegpt_sequential
    masks = fn(model, IDS, names, 0.5)
    assert set(masks) == set(names)
    for name in names:
        weight = model.get_submodule(name).weight
        assert (weight[~masks[name]] == 0).all()
        assert abs(float((~masks[name]).float().mean()) - 0.5) < 1 / weight.shape[1]


def test_sparsegpt_sequential_beats_wanda_and_magnitude_on_model_output():
    """On a random model Wanda is about magnitude (no outlier features), SparseGPT clearly better."""
    from effopt.methods.pruning.masks import layer_mask

    base = tiny_llama(layers=2, hidden=64, intermediate=128)
    calib = torch.randint(3, 250, (8, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = base(input_ids=calib).logits
    errors = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        model = tiny_llama(layers=2, hidden=64, intermediate=128)
        names = linear_names(model)
        if method == "magnitude":
            with torch.no_grad():
                for name in names:
                    w = model.get_submodule(name).weight
                    w.mul_(layer_mask(w.abs(), 0.5))
        else:
            (wanda_sequential if method == "wanda" else sparsegpt_sequential)(model, calib, names, 0.5)
        with torch.no_grad():
            errors[method] = float((model(input_ids=calib).logits - ref).pow(2).mean())
    assert errors["sparsegpt"] < 0.7 * min(errors["wanda"], errors["magnitude"]), errors
