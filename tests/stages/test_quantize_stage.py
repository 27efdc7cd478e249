"""quantize stage: every method through its config on a tiny model, checkpoints rebuild the
quantized modules exactly, KV-cache settings reach the runtime, options are validated."""

from __future__ import annotations

import json

import pytest
import torch

from effopt.context import RunContext
from effopt.data import TextData
from effopt.errors import RecipeError
from effopt.models import MODULES_FILE, load_checkpoint, save_checkpoint
from effopt.recipe import parse_recipe
from effopt.stages.quantize import apply_quantize
from tests.conftest import tiny_llama, tiny_tokenizer

TEXT = "It is a truth universally acknowledged, that a single man in possession of a good fortune. " * 30


def _context(tmp_path, stage: dict):
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    recipe = parse_recipe({
        "name": "t", "data": {"calibration": {"source": str(text), "max_tokens": 2048, "seq_len": 32,
                                              "num_samples": 6}},
        "stages": [{"stage": "load", "source": "builtin:smollm2-135m"}, dict(stage, stage="quantize")]})
    ctx = RunContext(recipe=recipe, run_dir=tmp_path)
    torch.manual_seed(0)
    ctx.model, ctx.tokenizer = tiny_llama(layers=2), tiny_tokenizer()
    ctx.device = torch.device("cpu")
    ctx.data = TextData(recipe.data, ctx.tokenizer, 0)
    return ctx, recipe.stages[1]


CASES = [
    ({"method": "rtn", "bits": 3, "granularity": "tensor"}, "QuantLinear", 0.5),
    ({"method": "rtn", "bits": 4, "group_size": 32, "clip_search": True}, "QuantLinear", 0.2),
    ({"method": "gptq", "bits": 4, "group_size": 48, "act_order": True, "batch_size": 4}, "QuantLinear", 0.2),
    ({"method": "gptq", "bits": 8, "group_size": -1, "symmetric": True, "calibration_precision": "bfloat16"},
     "QuantLinear", 0.02),
    ({"method": "awq", "bits": 4, "group_size": 32, "n_grid": 5, "search_samples": 2}, "QuantLinear", 0.2),
    ({"method": "awq", "bits": 4, "group_size": 32, "n_grid": 4, "quantizer": "gptq", "clip": False},
     "QuantLinear", 0.2),
    ({"method": "awq", "grid": "nf4", "n_grid": 4, "search_samples": 2}, "Bnb4bitLinear", 0.2),
    ({"method": "awq", "grid": "nf4", "quantizer": "gptq", "n_grid": 4, "blocksize": 32, "act_order": True},
     "Bnb4bitLinear", 0.2),
    ({"method": "smoothquant", "alpha": 0.5}, "ActQuantLinear", 0.05),
    ({"method": "bnb", "quant_type": "nf4", "double_quant": True}, "Bnb4bitLinear", 0.2),
    ({"method": "bnb", "quant_type": "fp4"}, "Bnb4bitLinear", 0.25),
    ({"method": "bnb", "quant_type": "int8"}, "Bnb8bitLinear", 0.05),
]


@pytest.mark.parametrize("stage, kind, max_rel", CASES, ids=[f"{c[0]['method']}-{i}" for i, c in enumerate(CASES)])
def test_method_quantizes_and_checkpoint_rebuilds_it(tmp_path, stage, kind, max_rel):
    ctx, cfg = _context(tmp_path, stage)
    ids = torch.randint(3, 259, (2, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = ctx.model(input_ids=ids).logits
    metrics = apply_quantize(cfg, ctx)
    assert metrics["quantized_layers"] == 14
    kinds = {type(m).__name__ for n, m in ctx.model.named_modules() if n.endswith("_proj")}
    assert kinds == {kind}
    with torch.no_grad():
        out = ctx.model(input_ids=ids).logits
    assert 0 < ((out - ref).norm() / ref.norm()).item() < max_rel
    save_checkpoint(ctx.model, ctx.tokenizer, tmp_path / "ckpt", {})
    specs = json.loads((tmp_path / "ckpt" / MODULES_FILE).read_text())
    assert len(specs) == 14 and {v["type"] for v in specs.values()} == {kind}
    model, _ = load_checkpoint(tmp_path / "ckpt")
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, out, atol=1e-6, rtol=0)


@pytest.mark.parametrize("bits", [8, 4])
def test_kv_cache_sets_runtime_only(tmp_path, bits):
    ctx, cfg = _context(tmp_path, {"method": "kv_cache", "bits": bits})
    before = {k: v.clone() for k, v in ctx.model.state_dict().items()}
    assert apply_quantize(cfg, ctx) == {"kv_cache_bits": bits}
    assert ctx.runtime["kv_cache"] == {"bits": bits, "granularity": "head_token"}
    assert all(torch.equal(v, ctx.model.state_dict()[k]) for k, v in before.items())


def test_targets_outside_decoder_layers_are_refused(tmp_path):
    ctx, cfg = _context(tmp_path, {"method": "gptq", "targets": ["*_proj", "lm_head"], "ignore": []})
    with pytest.raises(ValueError, match="outside them"):
        apply_quantize(cfg, ctx)


@pytest.mark.parametrize("stage, key", [
    ({"method": "gptq", "bits": 5}, "bits"), ({"method": "gptq", "percdamp": 0}, "percdamp"),
    ({"method": "awq", "quantizer": "hqq"}, "quantizer"), ({"method": "smoothquant", "alpha": 1.5}, "alpha"),
    ({"method": "smoothquant", "bits": 4}, "bits"), ({"method": "bnb", "quant_type": "int4"}, "quant_type"),
    ({"method": "kv_cache", "bits": 3}, "bits"), ({"method": "rtn", "granularity": "row"}, "granularity"),
    ({"method": "gptq", "calibration_precision": "float16"}, "calibration_precision"),
    ({"method": "awq", "search_precision": "float16"}, "search_precision"),
    ({"method": "awq", "grid": "nf4", "bits": 3}, "grid: nf4 stores bitsandbytes NF4 .* bits does not apply"),
    ({"method": "awq", "grid": "nf4", "group_size": 64, "symmetric": True},
     "group_size and symmetric do not apply: remove them"),
    ({"method": "awq", "grid": "nf4", "blocksize": 48}, "blocksize"),
    ({"method": "awq", "blocksize": 64}, "blocksize is the NF4 block"),
    ({"method": "awq", "grid": "fp4"}, "grid"),
])
def test_invalid_options_are_rejected(stage, key):
    with pytest.raises(RecipeError, match=key):
        parse_recipe({"name": "x", "stages": [{"stage": "load"}, dict(stage, stage="quantize")]})
