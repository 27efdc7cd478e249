"""quantize on the real builtin model (SmolLM2-135M): GPTQ W4 g128 through the runner, on a small
calibration set, is clearly better than RTN at the same layout, and its checkpoint reloads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from effopt.cli import app

pytestmark = [pytest.mark.real, pytest.mark.slow]


def _run(tmp_path: Path, name: str, quantize: dict) -> dict:
    recipe = {"name": name,
              "data": {"eval": {"source": "builtin:austen/persuasion", "max_tokens": 2048, "seq_len": 1024},
                       "calibration": {"num_samples": 16, "seq_len": 256}},
              "stages": [{"stage": "load", "source": "builtin:smollm2-135m"},
                         {"stage": "eval", "metrics": ["perplexity", "size"]},
                         dict(quantize, stage="quantize"),
                         {"stage": "eval", "metrics": ["perplexity", "size"]}]}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / name
    result = CliRunner().invoke(app, ["run", "--quiet", str(path), "--output", str(out)])
    assert result.exit_code == 0, result.output
    return json.loads((out / "run.json").read_text())


def test_gptq_beats_rtn_on_the_real_model(tmp_path):
    rtn = _run(tmp_path, "rtn", {"method": "rtn", "bits": 4, "group_size": 128})
    gptq = _run(tmp_path, "gptq", {"method": "gptq", "bits": 4, "group_size": 128})
    base = rtn["stages"][1]["metrics"]["perplexity"]
    assert gptq["stages"][1]["metrics"]["perplexity"] == pytest.approx(base)
    rtn_ppl, gptq_ppl = rtn["stages"][3]["metrics"]["perplexity"], gptq["stages"][3]["metrics"]["perplexity"]
    assert base < gptq_ppl < rtn_ppl
    assert gptq_ppl - base < 0.75 * (rtn_ppl - base)
    assert gptq["stages"][2]["metrics"]["quantized_layers"] == 210
    assert gptq["stages"][3]["metrics"]["size_bytes"] < 0.45 * gptq["stages"][1]["metrics"]["size_bytes"]
