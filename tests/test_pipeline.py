"""The runner end to end on a tiny random Llama: run dir contract, gates, failures, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from effopt.cli import app

REPO = Path(__file__).resolve().parent.parent
TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
        "must be in want of a wife. ") * 40


def make_recipe(tmp_path: Path, model_dir: Path, stages=None, gates=None, eval_tokens=1024, seq_len=64,
                eval_repeats: int = 1) -> Path:
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    eval_text = tmp_path / "eval.txt"
    eval_text.write_text(TEXT * eval_repeats)
    recipe = {
        "name": "tiny", "seed": 0,
        "data": {"eval": {"source": str(eval_text), "max_tokens": eval_tokens, "seq_len": seq_len},
                 "calibration": {"source": str(text), "max_tokens": 2048, "seq_len": 32, "num_samples": 4},
                 "train": {"source": str(text), "max_tokens": 2048, "seq_len": 32}},
        "stages": stages or [
            {"stage": "load", "source": str(model_dir)},
            {"stage": "eval", "metrics": ["perplexity", "size"]},
            {"stage": "quantize", "method": "rtn", "bits": 8, "group_size": 32},
            {"stage": "eval", "metrics": ["perplexity", "size"]},
            {"stage": "export"},
        ],
        "gates": gates or [],
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def run_cli(*args: str):
    return CliRunner().invoke(app, ["run", "--quiet", *args])


def test_run_writes_the_run_directory(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    result = run_cli(str(make_recipe(tmp_path, tiny_model_dir)), "--output", str(out))
    assert result.exit_code == 0, result.output
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "completed"
    assert [s["stage"] for s in record["stages"]] == ["load", "eval", "quantize", "eval", "export"]
    for stage in record["stages"]:
        assert stage["status"] == "completed"
        assert stage["seconds"] >= 0 and stage["peak_rss_mb"] > 0
    first, second = record["stages"][1]["metrics"], record["stages"][3]["metrics"]
    assert first["perplexity"] > 1 and second["perplexity"] > 1
    assert second["size_bytes"] < first["size_bytes"]  # int8 codes are smaller than float32
    assert record["stages"][2]["checkpoint"] == "checkpoints/02-quantize"
    assert (out / "checkpoints" / "02-quantize" / "model.safetensors").is_file()
    assert (out / "recipe.yaml").is_file() and (out / "log.txt").read_text()
    assert record["environment"]["torch"] == torch.__version__
    assert (out / "model" / "effopt_manifest.json").is_file()


@pytest.mark.usefixtures("exact_quant_path")  # atol vs the dequantized path, not the bf16 CPU ops
def test_export_loads_in_plain_transformers_with_same_logits(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from effopt.models import load_model

    out = tmp_path / "run"
    assert run_cli(str(make_recipe(tmp_path, tiny_model_dir)), "--output", str(out)).exit_code == 0
    ckpt_model, _, _ = load_model(str(out / "checkpoints" / "02-quantize"), device="cpu")
    hf_model = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    ids = torch.randint(3, 250, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ckpt_model(ids).logits, hf_model(ids).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    manifest = json.loads((out / "model" / "effopt_manifest.json").read_text())
    assert [h["stage"] for h in manifest["history"]] == ["load", "eval", "quantize", "eval"]


def test_same_seed_same_perplexity(tmp_path, tiny_model_dir):
    recipe = make_recipe(tmp_path, tiny_model_dir)
    ppl = []
    for name in ("a", "b"):
        assert run_cli(str(recipe), "--output", str(tmp_path / name)).exit_code == 0
        record = json.loads((tmp_path / name / "run.json").read_text())
        ppl.append(round(record["stages"][3]["metrics"]["perplexity"], 4))
    assert ppl[0] == ppl[1]


def test_failed_gate_exits_1_and_says_which(tmp_path, tiny_model_dir):
    gates = [{"metric": "perplexity", "max": 1.0}, {"metric": "size_bytes", "max": 1e12}]
    result = run_cli(str(make_recipe(tmp_path, tiny_model_dir, gates=gates)), "--output", str(tmp_path / "r"))
    assert result.exit_code == 1, result.output
    record = json.loads((tmp_path / "r" / "run.json").read_text())
    assert record["status"] == "gate_failed"
    assert [g["passed"] for g in record["gates"]] == [False, True]
    assert "perplexity" in result.output and "> max 1" in result.output


def test_failing_stage_exits_3_keeps_record_and_checkpoints(tmp_path, tiny_model_dir):
    stages = [{"stage": "load", "source": str(tiny_model_dir)},
              {"stage": "quantize", "method": "rtn", "bits": 8, "group_size": 32},
              {"stage": "quantize", "method": "rtn", "bits": 4, "targets": ["*.no_such_layer"]},
              {"stage": "eval"}]
    out = tmp_path / "r"
    result = run_cli(str(make_recipe(tmp_path, tiny_model_dir, stages=stages)), "--output", str(out))
    assert result.exit_code == 3, result.output
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "failed"
    assert [s["status"] for s in record["stages"]] == ["completed", "completed", "failed", "pending"]
    assert "matched no linear layer" in record["stages"][2]["error"]
    assert (out / "checkpoints" / "01-quantize" / "model.safetensors").is_file()


def test_existing_run_dir_needs_resume(tmp_path, tiny_model_dir):
    recipe = make_recipe(tmp_path, tiny_model_dir)
    out = tmp_path / "r"
    assert run_cli(str(recipe), "--output", str(out)).exit_code == 0
    result = run_cli(str(recipe), "--output", str(out))
    assert result.exit_code == 2 and "--resume" in result.output


def test_resume_refuses_a_different_recipe(tmp_path, tiny_model_dir):
    recipe = make_recipe(tmp_path, tiny_model_dir)
    out = tmp_path / "r"
    assert run_cli(str(recipe), "--output", str(out)).exit_code == 0
    result = run_cli(str(recipe), "--output", str(out), "--resume", "--set", "seed=3")
    assert result.exit_code == 2 and "differs" in result.output


def test_json_summary_on_stdout(tmp_path, tiny_model_dir):
    result = CliRunner().invoke(app, ["run", "--quiet", "--json", str(make_recipe(tmp_path, tiny_model_dir)),
                                      "--output", str(tmp_path / "r")])
    assert result.exit_code == 0
    summary = json.loads(result.stdout)
    assert summary["status"] == "completed" and len(summary["stages"]) == 5


def test_killed_run_resumes_to_the_same_metrics(tmp_path, tiny_model_dir):
    """SIGKILL a run in the middle of its last eval, resume it, compare with an uninterrupted run."""
    # TEXT is ~4k bytes (one token each); 10 copies hold the 30k tokens the eval asks for (~2 s here), so
    # the last eval lasts long enough to be killed in, even on a fast machine.
    recipe = make_recipe(tmp_path, tiny_model_dir, eval_tokens=30_000, seq_len=32, eval_repeats=10)
    cmd = [sys.executable, "-m", "effopt", "run", "--quiet", str(recipe)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    killed = tmp_path / "killed"
    proc = subprocess.Popen(cmd + ["--output", str(killed)], env=env, cwd=tmp_path)
    deadline = time.time() + 240
    while time.time() < deadline:
        try:
            stages = json.loads((killed / "run.json").read_text())["stages"]
        except (OSError, ValueError):
            stages = []
        if stages and stages[3]["status"] == "running":
            break
        assert proc.poll() is None, "run ended before it could be killed"
        time.sleep(0.02)
    time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    record = json.loads((killed / "run.json").read_text())
    assert record["stages"][3]["status"] == "running" and record["stages"][4]["status"] == "pending"
    resumed = subprocess.run(cmd + ["--output", str(killed), "--resume"], env=env, cwd=tmp_path)
    assert resumed.returncode == 0
    straight = tmp_path / "straight"
    assert subprocess.run(cmd + ["--output", str(straight)], env=env, cwd=tmp_path).returncode == 0
    a = json.loads((killed / "run.json").read_text())
    b = json.loads((straight / "run.json").read_text())
    assert a["status"] == "completed" and a["resumed"] == 1
    for i in (1, 3):
        assert round(a["stages"][i]["metrics"]["perplexity"], 4) == round(b["stages"][i]["metrics"]["perplexity"], 4)
