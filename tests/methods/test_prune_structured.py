"""Structured pruning: shapes, config, the lowest-norm structure goes, and the model reloads in transformers."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import tiny_llama
from effopt.methods.pruning import structured


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run many small ops: one thread avoids stalls on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

IDS = torch.randint(3, 250, (2, 20), generator=torch.Generator().manual_seed(0))


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def reload(model, tmp_path):
    model.save_pretrained(tmp_path)
    return AutoModelForCausalLM.from_pretrained(tmp_path).eval()


def _silence_head(attn, head, head_dim):
    with torch.no_grad():
        attn.q_proj.weight[head * head_dim:(head + 1) * head_dim] = 0
        attn.o_proj.weight[:, head * head_dim:(head + 1) * head_dim] = 0


@pytest.mark.parametrize("mode,heads,kv", [("query_heads", 6, 3), ("kv_groups", 6, 2)])
def test_prune_heads_shapes_config_and_reload(mode, heads, kv, tmp_path):
    model = tiny_llama(heads=9, kv_heads=3, hidden=72)  # head_dim 8, 3 query heads per KV head
    out = structured.prune_heads(model, 0.3, "l2", mode)
    assert (out["heads_after"], out["kv_heads_after"]) == (heads, kv)
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (heads, kv)
    for layer in model.model.layers:
        attn = layer.self_attn
        assert attn.q_proj.weight.shape == (heads * 8, 72) and attn.o_proj.weight.shape == (72, heads * 8)
        assert attn.k_proj.weight.shape == (kv * 8, 72) and attn.v_proj.weight.shape == (kv * 8, 72)
        assert type(attn.q_proj) is torch.nn.Linear
    before = logits(model)
    assert torch.allclose(logits(reload(model, tmp_path)), before, atol=1e-5)


def test_silent_query_heads_are_the_ones_removed():
    model = tiny_llama(heads=9, kv_heads=3, hidden=72)
    for layer in model.model.layers:
        for head in (1, 5, 6):  # one per KV group
            _silence_head(layer.self_attn, head, 8)
    before = logits(model)
    structured.prune_heads(model, 0.34, "l1", "query_heads")
    assert torch.allclose(logits(model), before, atol=1e-5)  # silent heads contributed nothing


def test_silent_kv_group_is_the_one_removed():
    model = tiny_llama(heads=9, kv_heads=3, hidden=72)
    for layer in model.model.layers:
        for head in (3, 4, 5):  # KV group 1
            _silence_head(layer.self_attn, head, 8)
        with torch.no_grad():
            layer.self_attn.k_proj.weight[8:16] = 0
            layer.self_attn.v_proj.weight[8:16] = 0
    before = logits(model)
    structured.prune_heads(model, 0.3, "l2", "kv_groups")
    assert model.config.num_key_value_heads == 2
    assert torch.allclose(logits(model), before, atol=1e-5)


def test_prune_channels_removes_silent_channels_and_reloads(tmp_path):
    model = tiny_llama(intermediate=100)
    silent = torch.tensor([3, 17, 40, 41, 99])
    for layer in model.model.layers:
        with torch.no_grad():
            layer.mlp.down_proj.weight[:, silent] = 0
            layer.mlp.up_proj.weight[silent] = 0
            layer.mlp.gate_proj.weight[silent] = 0
    before = logits(model)
    out = structured.prune_channels(model, 0.05, "l2")
    assert out["channels_after"] == 95 and model.config.intermediate_size == 95
    for layer in model.model.layers:
        assert layer.mlp.gate_proj.weight.shape == (95, 64) and layer.mlp.down_proj.weight.shape == (64, 95)
    assert torch.allclose(logits(model), before, atol=1e-5)
    assert torch.allclose(logits(reload(model, tmp_path)), before, atol=1e-5)


def test_prune_layers_removes_an_identity_layer_and_reloads(tmp_path):
    model = tiny_llama(layers=4)
    with torch.no_grad():  # layer 2 adds nothing to the residual stream: an identity
        for m in model.model.layers[2].modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.zero_()
    before = logits(model)
    out = structured.prune_layers(model, 0.25, "l2")
    assert out["layers_removed"] == [2] and model.config.num_hidden_layers == 3
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2]
    assert torch.allclose(logits(model), before, atol=1e-5)
    reloaded = reload(model, tmp_path)
    assert len(reloaded.model.layers) == 3
    assert torch.allclose(logits(reloaded), before, atol=1e-5)
    with torch.no_grad():  # generation with a KV cache works with the renumbered layers
        reloaded.generate(IDS[:1, :5], max_new_tokens=3, do_sample=False)


def test_shrunk_model_is_smaller_on_disk(tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path / "dense")
    structured.prune_channels(model, 0.5)
    model.save_pretrained(tmp_path / "pruned")
    size = lambda p: (p / "model.safetensors").stat().st_size  # noqa: E731
    assert size(tmp_path / "pruned") < 0.9 * size(tmp_path / "dense")


@pytest.mark.parametrize("amount", [0.01, 0.99])
def test_amounts_that_remove_nothing_or_everything_are_refused(amount):
    with pytest.raises(ValueError):
        structured.prune_layers(tiny_llama(layers=2), amount)


def test_structure_norms():
    parts = [torch.tensor([[3.0, -4.0], [0.0, 1.0]]), torch.tensor([[0.0], [-1.0]])]
    assert structured.structure_norm(parts, "l1").tolist() == [7.0, 2.0]
    assert torch.allclose(structured.structure_norm(parts, "l2"), torch.tensor([5.0, 2 ** 0.5]))


@pytest.mark.parametrize("structure", ["heads", "channels", "layers"])
def test_saliencies_replace_weights_as_the_ranking(structure):
    """Given saliencies, the structure with zero saliency goes even though its weights are large."""
    model = tiny_llama(heads=9, kv_heads=3, hidden=72, layers=3, intermediate=96)
    linears = structured.decoder_linears(model)
    assert len(linears) == 21
    saliency = {m: torch.ones_like(m.weight) for m in linears.values()}
    layer0 = model.model.layers[0]
    if structure == "heads":
        for proj, dim in ((layer0.self_attn.q_proj, 0), (layer0.self_attn.o_proj, 1)):
            saliency[proj].narrow(dim, 8, 8).zero_()  # head 1
        with torch.no_grad():
            layer0.self_attn.q_proj.weight[8:16] *= 100
        q_before = layer0.self_attn.q_proj.weight.detach().clone()
        structured.prune_heads(model, 0.34, "l1", "query_heads", saliency)
        kept = model.model.layers[0].self_attn.q_proj.weight
        assert torch.equal(kept[:8], q_before[:8]) and torch.equal(kept[8:16], q_before[16:24])
    elif structure == "channels":
        for m, dim in ((layer0.mlp.gate_proj, 0), (layer0.mlp.up_proj, 0), (layer0.mlp.down_proj, 1)):
            saliency[m].narrow(dim, 5, 1).zero_()
        up_before = layer0.mlp.up_proj.weight.detach().clone()
        structured.prune_channels(model, 1 / 96, "l1", saliency)
        kept = model.model.layers[0].mlp.up_proj.weight
        assert torch.equal(kept, torch.cat([up_before[:5], up_before[6:]]))
    else:
        for m in model.model.layers[1].modules():
            if isinstance(m, torch.nn.Linear):
                saliency[m].zero_()
        out = structured.prune_layers(model, 0.34, "l2", saliency)
        assert out["layers_removed"] == [1]
