"""format: hf round trips (dense and packed) and the export stage's option checks."""

from __future__ import annotations

import json

import pytest
import torch
from export_helpers import llama, logits, rtn, token_ids

from effopt.exporters.hf import export_hf
from effopt.nn.quant_linear import QuantLinear


@pytest.mark.usefixtures("exact_quant_path")  # atol 1e-5 vs the dequantized path, not the bf16 CPU ops
def test_dense_hf_export_loads_in_transformers_with_the_same_logits(tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM

    model = rtn(llama(), 4, 32, False)
    metrics = export_hf(model, tokenizer, tmp_path / "m", {"history": []})
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    ids = token_ids()
    torch.testing.assert_close(logits(loaded, ids), logits(model, ids), rtol=0, atol=1e-5)
    fmt = json.loads((tmp_path / "m" / "effopt_manifest.json").read_text())["format"]
    assert fmt["name"] == "hf" and fmt["packed"] is False and fmt["modules"] == {}
    assert metrics["export_weights_bytes"] == (tmp_path / "m" / "model.safetensors").stat().st_size


def test_packed_hf_export_keeps_quantlinear_and_reloads_exactly(tmp_path, tokenizer):
    from effopt.models import load_model

    model = rtn(llama(), 4, 32, True)
    export_hf(model, tokenizer, tmp_path / "m", {"history": []}, packed=True)
    loaded, _, _ = load_model(str(tmp_path / "m"), device="cpu")
    assert isinstance(loaded.model.layers[0].self_attn.q_proj, QuantLinear)
    ids = token_ids()
    torch.testing.assert_close(logits(loaded, ids), logits(model, ids), rtol=0, atol=0)
    fmt = json.loads((tmp_path / "m" / "effopt_manifest.json").read_text())["format"]
    assert fmt["packed"] is True and len(fmt["modules"]) == 14 and set(fmt["modules"].values()) == {"QuantLinear"}
    assert fmt["loads_with"] == "effopt"


def test_packed_export_is_smaller_than_dense(tmp_path, tokenizer):
    model = rtn(llama(), 4, 32, True)
    dense = export_hf(model, tokenizer, tmp_path / "d", {})["export_weights_bytes"]
    packed = export_hf(model, tokenizer, tmp_path / "p", {}, packed=True)["export_weights_bytes"]
    assert packed < 0.6 * dense


@pytest.mark.parametrize("stage, error", [
    ({"stage": "export", "format": "gguf", "packed": True}, "packed applies to format hf or peft"),
    ({"stage": "export", "format": "hf", "gguf_type": "Q4_0"}, "gguf_type applies to format gguf"),
    ({"stage": "export", "format": "compressed-tensors", "tokenizer_pre": "smollm"}, "tokenizer_pre applies"),
    ({"stage": "export", "format": "onnx"}, "format"),
    ({"stage": "export", "format": "gguf", "gguf_type": "Q3_K"}, "gguf_type"),
])
def test_export_stage_rejects_options_of_other_formats(stage, error, tiny_model_dir):
    from effopt.errors import RecipeError
    from effopt.recipe import parse_recipe

    with pytest.raises(RecipeError, match=error):
        parse_recipe({"name": "x", "stages": [{"stage": "load", "source": str(tiny_model_dir)}, stage]})


@pytest.mark.parametrize("stage", [
    {"stage": "export"},
    {"stage": "export", "format": "hf", "packed": True},
    {"stage": "export", "format": "gguf", "gguf_type": "Q4_K", "tokenizer_pre": "smollm"},
    {"stage": "export", "format": "compressed-tensors", "path": "vllm"},
    {"stage": "export", "format": "peft", "packed": True},
])
def test_export_stage_accepts_each_format(stage, tiny_model_dir):
    from effopt.recipe import parse_recipe

    recipe = parse_recipe({"name": "x", "stages": [{"stage": "load", "source": str(tiny_model_dir)}, stage]})
    assert recipe.stages[1].format == stage.get("format", "hf")


def test_resolved_recipe_with_every_export_option_spelled_out_reloads(tmp_path, tiny_model_dir):
    """run directories store the recipe with defaults filled in; it must validate again."""
    from effopt.recipe import dump_recipe, load_recipe, parse_recipe

    recipe = parse_recipe({"name": "x", "stages": [{"stage": "load", "source": str(tiny_model_dir)},
                                                   {"stage": "export", "format": "gguf", "gguf_type": "Q4_0"},
                                                   {"stage": "export", "format": "compressed-tensors"}]})
    (tmp_path / "recipe.yaml").write_text(dump_recipe(recipe))
    assert load_recipe(tmp_path / "recipe.yaml").stages[1].gguf_type == "Q4_0"
