"""The prune stage through recipes and the runner on a tiny Llama: options validated, masks kept
through checkpoints and training, structured results load in plain transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from effopt.errors import RecipeError
from effopt.models import load_checkpoint
from effopt.nn.masked_linear import MaskedLinear
from effopt.pipeline import run_recipe
from effopt.recipe import load_recipe, parse_recipe

TEXT = ("She was the youngest of the two daughters of a most affectionate, indulgent father; and had, in "
        "consequence of her sister's marriage, been mistress of his house from a very early period. ") * 30


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run many small ops: one thread avoids stalls on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def recipe_dict(tmp_path: Path, model_dir: Path, prune: dict, after: list | None = None) -> dict:
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    return {
        "name": "tiny-prune", "seed": 0,
        "data": {"eval": {"source": str(text), "max_tokens": 512, "seq_len": 64},
                 "calibration": {"source": str(text), "max_tokens": 2048, "seq_len": 32, "num_samples": 6},
                 "train": {"source": str(text), "max_tokens": 2048, "seq_len": 32}},
        "stages": [{"stage": "load", "source": str(model_dir)}, {"stage": "prune", **prune},
                   {"stage": "eval", "metrics": ["perplexity", "size"]}, *(after or [])],
    }


def run(tmp_path: Path, model_dir: Path, prune: dict, after: list | None = None) -> dict:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe_dict(tmp_path, model_dir, prune, after)))
    return run_recipe(load_recipe(path), tmp_path / "run")


@pytest.mark.parametrize("prune,message", [
    ({"method": "magnitude", "sparsity": 1.0}, "less than 1"),
    ({"method": "magnitude", "sparsity": -0.1}, "greater than or equal to 0"),
    ({"method": "wanda"}, "exactly one of sparsity"),
    ({"method": "wanda", "sparsity": 0.5, "pattern": "2:4"}, "exactly one of sparsity"),
    ({"method": "sparsegpt", "pattern": "4:2"}, "0 < N < M"),
    ({"method": "sparsegpt", "pattern": "2of4"}, "should match pattern"),
    ({"method": "magnitude", "pattern": "2:4", "scope": "global"}, "global"),
    ({"method": "taylor", "sparsity": 0.5, "scope": "row"}, "scope"),
    ({"method": "learned", "sparsity": 0.5, "steps": 0}, "greater than 0"),
    ({"method": "structured", "structure": "heads", "amount": 1.0}, "less than 1"),
    ({"method": "structured", "structure": "blocks", "amount": 0.2}, "structure"),
    ({"method": "structured", "structure": "layers", "amount": 0.2, "criterion": "random"}, "criterion"),
    ({"method": "structured", "structure": "heads", "amount": 0.2, "sparsity": 0.5}, "unknown key"),
    ({"method": "pruney", "sparsity": 0.5}, "method"),
    ({"method": "wanda", "sparsity": 0.5, "blocksize": 64}, "unknown key"),
    ({"method": "magnitude", "pattern": "4:8", "semi_structured": True}, "semi_structured: true needs pattern"),
    ({"method": "wanda", "sparsity": 0.5, "semi_structured": True}, "semi_structured: true needs pattern"),
])
def test_invalid_prune_options_are_refused(prune, message, tmp_path, tiny_model_dir):
    with pytest.raises(RecipeError, match=message):
        parse_recipe(recipe_dict(tmp_path, tiny_model_dir, {"stage": "prune", **prune}))


@pytest.mark.parametrize("prune", [
    {"method": "magnitude", "sparsity": 0.5},
    {"method": "magnitude", "sparsity": 0.4, "scope": "global"},
    {"method": "taylor", "pattern": "2:4", "batch_size": 3},
    {"method": "gradient", "sparsity": 0.3},
    {"method": "wanda", "pattern": "4:8"},
    {"method": "sparsegpt", "sparsity": 0.6, "block_size": 32},
    {"method": "sparsegpt", "pattern": "2:4"},
    {"method": "learned", "sparsity": 0.5, "steps": 4, "batch_size": 2},
], ids=lambda p: "-".join(str(v) for v in p.values()))
def test_unstructured_methods_leave_masked_layers_at_the_target(prune, tmp_path, tiny_model_dir):
    record = run(tmp_path, tiny_model_dir, prune)
    metrics = record["stages"][1]["metrics"]
    target = prune.get("sparsity", 0.5)
    assert metrics["pruned_layers"] == 14 and abs(metrics["achieved_sparsity"] - target) < 1 / 64
    model, _ = load_checkpoint(tmp_path / "run" / record["stages"][1]["checkpoint"])
    masked = [m for m in model.modules() if isinstance(m, MaskedLinear)]
    assert len(masked) == 14
    if "pattern" in prune:
        n, m = (int(v) for v in prune["pattern"].split(":"))
        for layer in masked:
            assert layer.weight_mask.view(layer.out_features, -1, m).sum(-1).eq(n).all()
            assert layer.pattern == prune["pattern"]
    assert record["stages"][2]["metrics"]["sparsity"] > 0.8 * target  # eval sees the zeros (lm_head excluded)


def test_masks_survive_a_checkpoint_round_trip_and_training(tmp_path, tiny_model_dir):
    record = run(tmp_path, tiny_model_dir, {"method": "wanda", "sparsity": 0.5})
    model, _ = load_checkpoint(tmp_path / "run" / record["stages"][1]["checkpoint"])
    layer = model.get_submodule("model.layers.0.mlp.down_proj")
    assert isinstance(layer, MaskedLinear) and abs(float((~layer.weight_mask).float().mean()) - 0.5) < 1 / 128
    pruned = ~layer.weight_mask.clone()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(3, 250, (2, 16))
    for _ in range(3):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        assert (layer.weight.grad[pruned] == 0).all()  # no gradient reaches a pruned weight
        opt.step()
    assert (layer.effective_weight()[pruned] == 0).all()
    assert torch.equal(~layer.weight_mask, pruned)


@pytest.mark.parametrize("prune,check", [
    ({"structure": "heads", "amount": 0.5}, lambda c: c["num_attention_heads"] == 2 and c["num_key_value_heads"] == 2),
    ({"structure": "heads", "amount": 0.5, "gqa": "kv_groups", "norm": "l1"},
     lambda c: c["num_attention_heads"] == 2 and c["num_key_value_heads"] == 1),
    ({"structure": "channels", "amount": 0.25}, lambda c: c["intermediate_size"] == 96),
    ({"structure": "layers", "amount": 0.5}, lambda c: c["num_hidden_layers"] == 1),
], ids=["query-heads", "kv-groups", "channels", "layers"])
def test_structured_export_is_smaller_and_loads_in_transformers(prune, check, tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    record = run(tmp_path, tiny_model_dir, {"method": "structured", **prune}, after=[{"stage": "export"}])
    metrics = record["stages"][1]["metrics"]
    assert metrics["parameters_after"] < metrics["parameters_before"]
    export = tmp_path / "run" / "model"
    assert check(json.loads((export / "config.json").read_text()))
    hf = AutoModelForCausalLM.from_pretrained(export).eval()
    ckpt, _ = load_checkpoint(tmp_path / "run" / record["stages"][1]["checkpoint"])
    assert not any(isinstance(m, MaskedLinear) for m in ckpt.modules())
    ids = torch.randint(3, 250, (1, 12))
    with torch.no_grad():
        assert torch.allclose(hf(input_ids=ids).logits, ckpt(input_ids=ids).logits, atol=1e-5)
    assert sum(p.numel() for p in hf.parameters()) == metrics["parameters_after"]


def test_structured_with_taylor_criterion_runs_and_shrinks(tmp_path, tiny_model_dir):
    record = run(tmp_path, tiny_model_dir, {"method": "structured", "structure": "channels", "amount": 0.25,
                                            "criterion": "taylor", "norm": "l1", "batch_size": 2})
    assert record["stages"][1]["metrics"]["channels_after"] == 96
    assert record["stages"][2]["metrics"]["perplexity"] > 1


def test_semi_structured_is_a_runtime_option_saved_with_the_checkpoint(tmp_path, tiny_model_dir):
    """On this CPU the 2:4 layers stay dense (the kernels are CUDA-only); the option travels with the model."""
    from effopt.models import read_manifest

    record = run(tmp_path, tiny_model_dir, {"method": "magnitude", "pattern": "2:4", "semi_structured": True})
    assert record["status"] == "completed"
    checkpoint = tmp_path / "run" / record["stages"][1]["checkpoint"]
    assert read_manifest(checkpoint)["runtime"] == {"semi_structured": True}
    (tmp_path / "plain").mkdir()
    plain = run(tmp_path / "plain", tiny_model_dir, {"method": "magnitude", "pattern": "2:4"})
    assert read_manifest(tmp_path / "plain" / "run" / plain["stages"][1]["checkpoint"])["runtime"] == {}
    assert record["stages"][2]["metrics"]["perplexity"] == plain["stages"][2]["metrics"]["perplexity"]
