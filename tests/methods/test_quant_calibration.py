"""The layer-by-layer calibration engine: it feeds each layer exactly what the full model would,
accumulates Hessians correctly (shared inputs once), and propagates changed layers' outputs."""

from __future__ import annotations

import pytest
import torch

from effopt.methods.calibration import accumulate_hessians, calibrate_layers, decoder_layers
from tests.conftest import tiny_llama


def _reference_layer_inputs(model, ids):
    """Inputs of every decoder layer and of every linear during one plain forward."""
    seen, handles = {}, []
    for name, module in model.named_modules():
        if name.endswith(("layers.0", "layers.1", "layers.2", "_proj")):
            def hook(mod, args, kwargs, name=name):
                x = args[0] if args else kwargs["hidden_states"]
                seen.setdefault(name, []).append(x.detach().clone())
            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    with torch.no_grad():
        model(input_ids=ids)
    for h in handles:
        h.remove()
    return {k: torch.cat(v) for k, v in seen.items()}


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_layers_see_what_the_full_model_feeds_them(batch_size):
    model = tiny_llama(layers=3)
    ids = torch.randint(3, 259, (5, 24), generator=torch.Generator().manual_seed(0))
    ref = _reference_layer_inputs(model, ids)
    got = {}

    def on_layer(step):
        got[step.name] = torch.cat(step.inputs)
        assert all(p.device.type == "cpu" for p in step.layer.parameters())

    tokens = calibrate_layers(model, ids, on_layer, batch_size=batch_size)
    assert tokens == 5 * 24
    assert [n for n, _ in decoder_layers(model)] == list(got)
    for name, x in got.items():
        assert torch.allclose(x, ref[name], atol=1e-5), name


def test_hessians_match_direct_computation_and_share_inputs():
    model = tiny_llama(layers=2)
    ids = torch.randint(3, 259, (6, 20), generator=torch.Generator().manual_seed(1))
    ref = _reference_layer_inputs(model, ids)
    found = {}

    def on_layer(step):
        names = list(step.linears(["*_proj"]))
        found[step.name] = accumulate_hessians(step, names)

    calibrate_layers(model, ids, on_layer, batch_size=4)
    h = found["model.layers.1"]
    assert h["self_attn.q_proj"] is h["self_attn.k_proj"] is h["self_attn.v_proj"]
    assert h["mlp.gate_proj"] is h["mlp.up_proj"] and h["mlp.up_proj"] is not h["mlp.down_proj"]
    for rel in ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj"):
        x = ref[f"model.layers.1.{rel}"].reshape(-1, h[rel].shape[0])
        assert torch.allclose(h[rel], 2 * x.T @ x / x.shape[0], rtol=1e-4, atol=1e-5), rel


def test_changed_layers_feed_the_next_layer():
    """A callback that zeroes layer 0's MLP output weight changes what layer 1 receives."""
    model = tiny_llama(layers=2)
    ids = torch.randint(3, 259, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.zero_()
        expected = _reference_layer_inputs(model, ids)["model.layers.1"]
    fresh = tiny_llama(layers=2)
    seen = {}

    def on_layer(step):
        if step.index == 0:
            step.layer.mlp.down_proj.weight.data.zero_()
        seen[step.index] = torch.cat(step.inputs)

    calibrate_layers(fresh, ids, on_layer, batch_size=2)
    assert torch.allclose(seen[1], expected, atol=1e-5)


def test_next_inputs_skip_the_recompute():
    model = tiny_llama(layers=2)
    ids = torch.randint(3, 259, (2, 16), generator=torch.Generator().manual_seed(3))
    calls = []

    def on_layer(step):
        if step.index == 0:
            step.layer.register_forward_pre_hook(lambda *a: calls.append(1))
            step.next_inputs = step.run({}, outputs=True)
        else:
            assert len(calls) == 2  # one pass over the two chunks, not two passes

    calibrate_layers(model, ids, on_layer, batch_size=1)


def test_autocast_runs_in_bfloat16_and_keeps_hidden_dtype():
    model = tiny_llama(layers=2)
    ids = torch.randint(3, 259, (2, 16), generator=torch.Generator().manual_seed(4))
    dtypes = set()

    def on_layer(step):
        step.run({"mlp.down_proj": lambda x, chunk: dtypes.add(x.dtype)})
        assert all(x.dtype == torch.float32 for x in step.inputs)

    calibrate_layers(model, ids, on_layer, batch_size=2, autocast=torch.bfloat16)
    assert dtypes == {torch.bfloat16}
