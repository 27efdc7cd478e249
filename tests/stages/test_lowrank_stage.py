"""The lowrank stage through the runner: tiny random Llama for every method, the real model marked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from effopt.cli import app
from effopt.errors import RecipeError
from effopt.recipe import parse_recipe

TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
        "must be in want of a wife. However little known the feelings or views of such a man may be. ") * 40


REAL_DATA = {"eval": {"source": "builtin:austen/persuasion", "max_tokens": 2048, "seq_len": 1024},
             "calibration": {"source": "builtin:austen/emma", "max_tokens": 16384, "seq_len": 512, "num_samples": 8}}


def _recipe(tmp_path: Path, source: str, lowrank: dict, extra_stages=(), data: dict | None = None) -> Path:
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    recipe = {"name": "lowrank", "seed": 0,
              "data": data or {"eval": {"source": str(text), "max_tokens": 512, "seq_len": 64},
                               "calibration": {"source": str(text), "max_tokens": 4096, "seq_len": 64,
                                               "num_samples": 8}},
              "stages": [{"stage": "load", "source": source}, {"stage": "eval", "metrics": ["perplexity", "size"]},
                         {"stage": "lowrank", **lowrank}, {"stage": "eval", "metrics": ["perplexity", "size"]},
                         *extra_stages]}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _run(recipe: Path, out: Path):
    result = CliRunner().invoke(app, ["run", "--quiet", str(recipe), "--output", str(out)])
    return result, json.loads((out / "run.json").read_text())


@pytest.mark.parametrize("lowrank,message", [
    ({"method": "svd"}, "exactly one of ratio, energy, param_budget"),
    ({"method": "svd", "ratio": 0.8, "energy": 0.9}, "exactly one"),
    ({"method": "svd", "ratio": 1.5}, "less than or equal to 1"),
    ({"method": "svd", "param_budget": 1.0}, "less than 1"),
    ({"method": "svd_llm", "ratio": 0.8, "damping": -1}, "greater than or equal to 0"),
    ({"method": "nmf", "ratio": 0.8, "rank": 4}, "unknown key"),
    ({"method": "pca", "ratio": 0.8}, "svd"),
])
def test_invalid_lowrank_configs_are_refused(lowrank, message):
    raw = {"name": "x", "stages": [{"stage": "load"}, {"stage": "lowrank", **lowrank}]}
    with pytest.raises(RecipeError, match=message):
        parse_recipe(raw)


@pytest.mark.parametrize("lowrank,factored", [
    ({"method": "svd", "ratio": 0.5}, (14, 14)),
    ({"method": "svd", "ratio": 0.5, "targets": ["*.mlp.*"]}, (6, 6)),
    ({"method": "svd_llm", "param_budget": 0.6, "sequential": False}, (10, 14)),  # some layers may stay dense
])
def test_lowrank_stage_shrinks_the_targeted_layers(tmp_path, tiny_model_dir, lowrank, factored):
    result, record = _run(_recipe(tmp_path, str(tiny_model_dir), lowrank), tmp_path / "run")
    assert result.exit_code == 0, result.output
    metrics = record["stages"][2]["metrics"]
    assert factored[0] <= metrics["layers_factored"] <= factored[1]
    kept = lowrank.get("ratio") or lowrank.get("param_budget") or 1.0
    assert metrics["targeted_params_after"] <= kept * metrics["targeted_params_before"]
    before, after = record["stages"][1]["metrics"], record["stages"][3]["metrics"]
    assert after["parameters"] < before["parameters"] and after["size_bytes"] < before["size_bytes"]


def test_packed_and_dense_exports_load_back(tmp_path, tiny_model_dir):
    exports = [{"stage": "export", "path": "packed", "packed": True}, {"stage": "export", "path": "dense"}]
    recipe = _recipe(tmp_path, str(tiny_model_dir), {"method": "svd_llm", "ratio": 0.6}, exports)
    result, record = _run(recipe, tmp_path / "run")
    assert result.exit_code == 0, result.output
    from transformers import AutoModelForCausalLM

    from effopt.models import load_checkpoint, load_model
    from effopt.nn.lowrank_linear import LowRankLinear

    out = tmp_path / "run"
    checkpoint, _ = load_checkpoint(out / record["stages"][2]["checkpoint"])
    packed, _, _ = load_model(str(out / "packed"))
    dense = AutoModelForCausalLM.from_pretrained(out / "dense").eval()
    assert sum(isinstance(m, LowRankLinear) for m in packed.modules()) == 14
    assert not any(isinstance(m, LowRankLinear) for m in dense.modules())
    ids = torch.randint(3, 259, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = checkpoint(ids).logits
        torch.testing.assert_close(packed(ids).logits, ref, rtol=0, atol=0)
        torch.testing.assert_close(dense(ids).logits, ref, rtol=1e-4, atol=1e-4)
    packed_bytes, dense_bytes = ((out / d / "model.safetensors").stat().st_size for d in ("packed", "dense"))
    assert packed_bytes < dense_bytes


def test_nmf_on_signed_weights_fails_naming_the_layer(tmp_path, tiny_model_dir):
    result, record = _run(_recipe(tmp_path, str(tiny_model_dir), {"method": "nmf", "ratio": 0.5}), tmp_path / "run")
    assert result.exit_code == 3
    error = record["stages"][2]["error"]
    assert "NegativeWeightError" in error and "model.layers.0.self_attn.q_proj" in error


@pytest.mark.real
def test_svd_on_the_real_model_exports_a_dense_model_transformers_loads(tmp_path):
    """Two decoder layers of SmolLM2 factored at 20% fewer parameters; the dense export reloads."""
    lowrank = {"method": "svd", "ratio": 0.8, "targets": ["model.layers.0.*", "model.layers.1.*"]}
    recipe = _recipe(tmp_path, "builtin:smollm2-135m", lowrank, [{"stage": "export", "path": "dense"}],
                     {**REAL_DATA, "eval": {**REAL_DATA["eval"], "max_tokens": 1024}})
    result, record = _run(recipe, tmp_path / "run")
    assert result.exit_code == 0, result.output
    metrics = record["stages"][2]["metrics"]
    assert metrics["layers_factored"] == 14 and metrics["targeted_params_kept"] <= 0.8
    before, after = record["stages"][1]["metrics"]["perplexity"], record["stages"][3]["metrics"]["perplexity"]
    assert before < after < float("inf")  # plain SVD of early MLPs costs a lot of perplexity on this model

    from transformers import AutoModelForCausalLM

    from effopt.models import load_checkpoint

    compressed, tokenizer = load_checkpoint(tmp_path / "run" / record["stages"][2]["checkpoint"])
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "dense").eval()
    ids = tokenizer("Anne Elliot walked along the Cobb at Lyme.", return_tensors="pt").input_ids
    with torch.no_grad():  # U (V x) against (U V) x in fp32 through 30 layers: one logit in 540k once differed by
        # 1.13e-3 on a fresh machine; a wrong export differs by whole units
        torch.testing.assert_close(dense(ids).logits, compressed(ids).logits, rtol=1e-4, atol=2e-3)


@pytest.mark.real
@pytest.mark.slow
def test_svd_llm_loses_less_than_svd_on_the_real_model(tmp_path):
    """The issue's target at small scale: whitened SVD beats plain SVD at 20% fewer parameters."""
    ppl = {}
    for method in ("svd", "svd_llm"):
        recipe = _recipe(tmp_path, "builtin:smollm2-135m", {"method": method, "ratio": 0.8}, data=REAL_DATA)
        result, record = _run(recipe, tmp_path / method)
        assert result.exit_code == 0, result.output
        ppl[method] = record["stages"][3]["metrics"]["perplexity"] / record["stages"][1]["metrics"]["perplexity"]
    assert ppl["svd_llm"] < ppl["svd"], ppl
