"""The nightly recipe's exports on the real model (SmolLM2-135M): what vLLM's and llama.cpp's formats
hold scores like effopt's own quantized model when transformers reads them back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from effopt.cli import app

pytestmark = [pytest.mark.real, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
TEXT = ("Sir Walter Elliot, of Kellynch Hall, in Somersetshire, was a man who, for his own amusement, "
        "never took up any book but the Baronetage.")


@pytest.fixture(scope="module")
def nightly_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("real") / "run"
    result = CliRunner().invoke(app, ["run", "--quiet", str(REPO / "recipes" / "nightly.yaml"), "--output", str(out),
                                      "--set", "data.eval.max_tokens=2048"])
    assert result.exit_code == 0, result.output
    return out


def _perplexity(run: Path, model) -> float:
    from effopt.data import TextData
    from effopt.metrics import perplexity
    from effopt.recipe import load_recipe
    from transformers import AutoTokenizer

    recipe = load_recipe(run / "recipe.yaml")
    tokenizer = AutoTokenizer.from_pretrained(run / "model-vllm")
    return perplexity(model.eval(), TextData(recipe.data, tokenizer, recipe.seed).windows("eval"))["perplexity"]


def _effopt_ppl(run: Path) -> float:
    return json.loads((run / "run.json").read_text())["stages"][3]["metrics"]["perplexity"]


def test_compressed_tensors_export_scores_like_effopt(nightly_run):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(nightly_run / "model-vllm")
    assert _perplexity(nightly_run, model) == pytest.approx(_effopt_ppl(nightly_run), rel=1e-4)


def test_gguf_export_scores_close_to_effopt_and_keeps_the_tokenizer(nightly_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = nightly_run / "model-gguf"
    fmt = json.loads((folder / "effopt_manifest.json").read_text())["format"]
    assert len(fmt["transferred"]) == 30 * 7 and fmt["tokenizer"]["pre"] == "smollm"
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file="model-Q4_0.gguf", dtype=torch.float32)
    # codes transferred as they are; the tied embedding is Q8_0 in the file, float in effopt's model
    # (measured on 4096 Persuasion tokens: 45.3081 vs 45.3046)
    assert _perplexity(nightly_run, model) == pytest.approx(_effopt_ppl(nightly_run), rel=1e-3)
    gguf_tok = AutoTokenizer.from_pretrained(folder, gguf_file="model-Q4_0.gguf")
    source_tok = AutoTokenizer.from_pretrained(nightly_run / "model-vllm")
    assert gguf_tok(TEXT)["input_ids"] == source_tok(TEXT)["input_ids"]
