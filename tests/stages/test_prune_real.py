"""The prune stage on the real builtin model (SmolLM2-135M): calibrated N:M pruning keeps the model
usable, and structured pruning gives a smaller model that plain transformers loads."""

from __future__ import annotations

import pytest
import torch

from effopt import metrics
from effopt.data import TextData
from effopt.recipe import TextSource

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def real():
    from effopt.models import load_model

    model, tokenizer, _ = load_model("builtin:smollm2-135m", "float32", "cpu")
    sources = {"calibration": TextSource(source="builtin:austen/emma", max_tokens=8192, seq_len=128, num_samples=16),
               "eval": TextSource(source="builtin:austen/persuasion", max_tokens=1024, seq_len=512)}
    return model, tokenizer, TextData(sources, tokenizer, 0)


def _fresh(real):
    import copy

    return copy.deepcopy(real[0])


@pytest.mark.slow
def test_sparsegpt_2of4_on_the_real_model_beats_magnitude(real):
    from effopt.methods.pruning.masks import masks_from_scores
    from effopt.methods.pruning.scores import magnitude_scores
    from effopt.methods.pruning.sparsegpt import sparsegpt_sequential
    from effopt.nn.masked_linear import MaskedLinear, apply_mask
    from effopt.stages.base import DEFAULT_TARGETS
    from effopt.stages.quantize import select_linears

    _, tokenizer, data = real
    windows = data.windows("eval")
    dense = metrics.perplexity(real[0], windows)["perplexity"]
    results = {}
    for method in ("magnitude", "sparsegpt"):
        model = _fresh(real)
        names = [n for n, _ in select_linears(model, DEFAULT_TARGETS, ["lm_head"])]
        if method == "sparsegpt":
            masks = sparsegpt_sequential(model, data.samples("calibration"), names, nm=(2, 4))
        else:
            masks = masks_from_scores(magnitude_scores({n: model.get_submodule(n) for n in names}), nm=(2, 4))
        for name, keep in masks.items():
            apply_mask(model, name, keep, "2:4")
        layers = [m for m in model.modules() if isinstance(m, MaskedLinear)]
        assert len(layers) == 210
        assert all(m.weight_mask.view(m.out_features, -1, 4).sum(-1).eq(2).all() for m in layers)
        results[method] = metrics.perplexity(model, windows)["perplexity"]
    # measured: dense ~22, sparsegpt 2:4 with 16 x 128 calibration tokens ~100, magnitude 2:4 in the thousands
    assert results["sparsegpt"] < 8 * dense < results["magnitude"], (dense, results)


def test_structured_heads_and_channels_on_the_real_model_reload_in_transformers(real, tmp_path):
    from transformers import AutoModelForCausalLM

    from effopt.methods.pruning.structured import prune_channels, prune_heads
    from effopt.models import save_checkpoint

    model = _fresh(real)
    heads = prune_heads(model, 0.2, "l2", "query_heads")
    channels = prune_channels(model, 0.2, "l2")
    assert (heads["heads_after"], heads["kv_heads_after"], channels["channels_after"]) == (6, 3, 1229)
    ids = real[2].windows("eval")[0][:64].unsqueeze(0)
    with torch.no_grad():
        before = model(input_ids=ids).logits
    save_checkpoint(model, real[1], tmp_path)  # the HF layout: config.json + model.safetensors
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.num_attention_heads == 6 and reloaded.config.intermediate_size == 1229
    assert reloaded.model.layers[0].self_attn.q_proj.weight.shape == (6 * 64, 576)
    assert sum(p.numel() for p in reloaded.parameters()) < 0.85 * sum(p.numel() for p in real[0].parameters())
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, before, atol=1e-4)
