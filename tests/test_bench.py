"""`effopt bench`: every field of the JSON report, the CLI, and how sources resolve."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_llama, tiny_tokenizer
from typer.testing import CliRunner

from effopt.bench import (BENCH_FIELDS, KV_FIELDS, RATIO_FIELDS, SPEC_FIELDS, make_prompts, resolve_source,
                          run_bench, to_markdown)
from effopt.cli import app
from effopt.generation.measure import RUN_FIELDS


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def _check_fields(result: dict, kv: bool, spec: bool) -> None:
    assert set(BENCH_FIELDS) <= set(result)
    for row in result["runs"]:
        assert set(RUN_FIELDS) | set(RATIO_FIELDS) | {"name", "model"} <= set(row)
        assert row["decode_tokens_per_s"] > 0 and row["ttft_s"] > 0 and row["prefill_s"] > 0
        assert row["kv_cache_bytes"] > 0 and row["peak_host_mb"] > 0
    names = [r["name"] for r in result["runs"]]
    assert names[0] == "transformers generate" and "effopt decode, float KV" in names
    assert result["runs"][0]["decode_speedup"] == 1.0
    if kv:
        assert set(KV_FIELDS) <= set(result["kv_cache"])
        assert result["kv_cache"]["ratio"] < 1
    if spec:
        assert set(SPEC_FIELDS) <= set(result["speculative"])
        assert result["speculative"]["identical_to_plain_greedy"] is True
        assert result["speculative"]["assisted"]["identical_to_plain_greedy"] is True
    json.dumps(result)  # serializable as is


@pytest.mark.parametrize("batch,kv,draft", [(1, "int8", True), (3, "int4", False), (2, "bf16", False)])
def test_run_bench_reports_every_field(batch, kv, draft):
    target = tiny_llama()
    models = {"source": target, "tokenizer": tiny_tokenizer()}
    if draft:
        models["draft"] = tiny_llama(seed=3, layers=1)
    result = run_bench("tiny", prompt_len=12, gen_len=6, batch=batch, kv_cache=kv,
                       draft="tiny-draft" if draft else None, ppl_tokens=300, models=models)
    _check_fields(result, kv != "bf16", draft)
    assert result["settings"]["prompt_lens"] == [12 - i * (12 // (2 * batch)) for i in range(batch)]
    float_row = next(r for r in result["runs"] if r["name"] == "effopt decode, float KV")
    assert float_row["same_tokens_as_baseline"] == 1.0  # same greedy tokens as transformers
    assert "| effopt decode, float KV |" in to_markdown(result)


def test_prompts_are_seeded_and_of_different_lengths():
    tok = tiny_tokenizer()
    a, b = make_prompts(tok, 259, 4, 40, 0), make_prompts(tok, 259, 4, 40, 0)
    assert a == b and [len(p) for p in a] == [40, 35, 30, 25]
    assert make_prompts(tok, 259, 4, 40, 1) != a


def test_cli_bench_json(tiny_model_dir, tmp_path):
    out = tmp_path / "bench.json"
    res = CliRunner().invoke(app, ["bench", str(tiny_model_dir), "--prompt-len", "10", "--gen-len", "4",
                                   "--kv-cache", "int4", "--draft", "source", "--ppl-tokens", "0", "--json", "--threads", "1",
                                   "-o", str(out)])
    assert res.exit_code == 0, res.output
    result = json.loads(out.read_text())
    _check_fields(result, kv=True, spec=True)
    assert result["speculative"]["acceptance_rate"] == 1.0  # drafting with the target itself


@pytest.mark.parametrize("args", [["--kv-cache", "fp8"], ["--batch", "2", "--draft", "source"]])
def test_cli_bench_rejects_bad_flags(tiny_model_dir, args):
    res = CliRunner().invoke(app, ["bench", str(tiny_model_dir), *args])
    assert res.exit_code == 2


def test_run_directory_resolves_to_export_or_last_checkpoint(tmp_path, tiny_model_dir):
    run = tmp_path / "run"
    (run / "checkpoints" / "01-quantize").mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"stages": [
        {"status": "completed", "checkpoint": None},
        {"status": "completed", "checkpoint": "checkpoints/01-quantize"},
        {"status": "failed", "checkpoint": None}]}))
    assert resolve_source(str(run)) == str(run / "checkpoints" / "01-quantize")
    (run / "model").mkdir()
    (run / "model" / "config.json").write_text("{}")
    assert resolve_source(str(run)) == str(run / "model")
    assert resolve_source(str(tiny_model_dir)) == str(tiny_model_dir)


def test_eval_stage_bench_metric_set_and_kv_runtime():
    """The eval stage measures under the run's runtime: an int4 KV cache shows in perplexity and bench."""
    from types import SimpleNamespace

    from effopt.stages.eval import EvalConfig, apply_eval

    windows = [torch.randint(3, 259, (64,), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    data = SimpleNamespace(windows=lambda name: windows, bos=lambda name: False,
                           config=lambda name: SimpleNamespace(source="x", seq_len=64))
    ctx = SimpleNamespace(model=tiny_llama(), tokenizer=tiny_tokenizer(), data=data, runtime={},
                          recipe=SimpleNamespace(seed=0))
    cfg = EvalConfig(metrics=["perplexity", "bench"], bench={"prompt_len": 8, "gen_len": 4})
    plain = apply_eval(cfg, ctx)
    ctx.runtime = {"kv_cache": {"bits": 4, "granularity": "head_token"}}
    quant = apply_eval(cfg, ctx)
    assert plain["bench_kv_cache"] == "bf16" and quant["bench_kv_cache"] == "int4"
    assert quant["perplexity"] != plain["perplexity"]
    assert quant["bench_kv_cache_bytes"] < plain["bench_kv_cache_bytes"]
    assert plain["bench_decode_tokens_per_s"] > 0 and plain["bench_same_tokens_as_hf"] == 1.0
    assert ctx.model.config._attn_implementation == "sdpa"
