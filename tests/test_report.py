"""effopt report: rows, Pareto front, regression rules and the CLI's formats and exit codes.

Run directories are written by hand here (report reads run.json only), so these tests are fast.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from effopt.cli import app
from effopt.report import check_rule, collect, parse_rule, pareto_front, to_json, to_markdown

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(root: Path, name: str, ppl: float, size: int, speed: float | None = 40.0, status: str = "completed",
              source: str = "builtin:austen/persuasion", folder: str | None = None) -> Path:
    """A run directory with load, eval (float), quantize, eval (quantized), as the runner writes it."""
    def eval_stage(index, p, s):
        metrics = {"perplexity": p, "size_bytes": s, "parameters": 1_000_000, "bits_per_weight": 8 * s / 1e6,
                   "sparsity": 0.0, "eval_source": source, "eval_seq_len": 1024, "eval_tokens": 16368}
        if speed is not None:
            metrics["tokens_per_s"] = speed * (1.5 if index == 3 else 1.0)
        return {"index": index, "stage": "eval", "method": None, "label": "eval", "status": "completed",
                "seconds": 3.0, "peak_rss_mb": 900.0, "metrics": metrics}

    stages = [{"index": 0, "stage": "load", "method": None, "label": "load", "status": "completed", "seconds": 1.0,
               "peak_rss_mb": 800.0, "metrics": {}},
              eval_stage(1, ppl * 0.98, 4 * size),
              {"index": 2, "stage": "quantize", "method": "rtn", "label": "quantize/rtn", "status": "completed",
               "seconds": 2.0, "peak_rss_mb": 950.0, "metrics": {}},
              eval_stage(3, ppl, size)]
    if status == "failed":
        stages[3].update(status="failed", metrics={}, error="boom")
    run_dir = root / (folder or name)
    run_dir.mkdir(parents=True)
    (run_dir / "run.json").write_text(json.dumps({"format": 1, "name": name, "status": status, "stages": stages,
                                                  "gates": [], "seconds": 9.0}))
    return run_dir


def report(*args: str):
    return CliRunner().invoke(app, ["report", *map(str, args)])


@pytest.mark.parametrize("text, metric, op, value, kind", [
    ("perplexity>+2%", "perplexity", ">", 2.0, "relative"),
    ("size>+0%", "size_bytes", ">", 0.0, "relative"),
    ("tokens_per_s<-10%", "tokens_per_s", "<", -10.0, "relative"),
    ("speed <= -5.5%", "tokens_per_s", "<=", -5.5, "relative"),
    ("ppl>+0.5", "perplexity", ">", 0.5, "delta"),
    ("perplexity>30", "perplexity", ">", 30.0, "absolute"),
    ("memory>=+10%", "peak_rss_mb", ">=", 10.0, "relative"),
])
def test_parse_rule(text, metric, op, value, kind):
    rule = parse_rule(text)
    assert (rule.metric, rule.op, rule.value, rule.kind) == (metric, op, value, kind)


@pytest.mark.parametrize("text, error", [
    ("perplexity", "expected METRIC OP VALUE"),
    ("perplexity=+2%", "expected METRIC OP VALUE"),
    ("latency>+2%", "unknown metric 'latency'"),
    ("perplexity>2%", "write it with a sign"),
    ("perplexity>+x%", "expected METRIC OP VALUE"),
])
def test_malformed_rules_are_refused(text, error):
    with pytest.raises(ValueError, match=re.escape(error)):
        parse_rule(text)


@pytest.mark.parametrize("rule, value, baseline, violated", [
    ("perplexity>+2%", 10.19, 10.0, False),
    ("perplexity>+2%", 10.21, 10.0, True),
    ("size>+0%", 1000, 1000, False),
    ("size>+0%", 1001, 1000, True),
    ("tokens_per_s<-10%", 91.0, 100.0, False),
    ("tokens_per_s<-10%", 89.0, 100.0, True),
    ("perplexity>+0.5", 10.4, 10.0, False),
    ("perplexity>+0.5", 10.6, 10.0, True),
    ("perplexity>30", 31.0, None, True),
])
def test_rule_thresholds(rule, value, baseline, violated):
    assert parse_rule(rule).violated(value, baseline) is violated


@pytest.mark.parametrize("points, maximize_x, front", [
    ([(1, 10), (2, 9), (3, 11)], False, [True, True, False]),
    ([(1, 10), (1, 10)], False, [True, True]),  # ties do not dominate each other
    ([(5, 10), (2, 10), (2, 12)], False, [False, True, False]),
    ([(10, 5), (20, 5), (30, 4)], True, [False, False, True]),  # speed: more is better
])
def test_pareto_front(points, maximize_x, front):
    assert pareto_front(points, maximize_x=maximize_x) == front


def test_rows_keep_their_columns_and_eval_protocol(tmp_path):
    rows = collect([write_run(tmp_path, "a", 20.0, 1000)])
    assert [r["point"] for r in rows] == ["1: after load", "3: after quantize/rtn"]
    assert rows[1]["eval_source"] == "builtin:austen/persuasion" and rows[1]["ppl_ratio"] == pytest.approx(1 / 0.98)
    assert to_markdown(rows).count("\n") == 4 and json.loads(to_json(rows))["rows"][0]["run"] == "a"


@pytest.mark.parametrize("candidate, message", [
    ({"source": "builtin:austen/emma"}, "not comparable: eval_source differs"),
    ({"speed": None}, "tokens_per_s was not measured in the candidate"),
    ({"status": "failed"}, "the run did not finish with a completed eval"),
])
def test_checks_that_cannot_be_trusted_fail_loudly(tmp_path, candidate, message):
    base = collect([write_run(tmp_path, "base", 20.0, 1000)])[-1]
    cand = collect([write_run(tmp_path, "cand", 20.0, 1000, **candidate)])[-1]
    rule = parse_rule("tokens_per_s<-10%" if "speed" in candidate else "perplexity>+2%")
    result = check_rule(rule, cand, base)
    assert not result["passed"] and message in result["message"]


def test_cli_passes_identical_runs_and_fails_regressions_with_a_clear_list(tmp_path):
    base = write_run(tmp_path, "nightly", 20.0, 1000, folder="day1")
    same = write_run(tmp_path, "nightly", 20.0, 1000, folder="day2")
    worse = write_run(tmp_path, "nightly", 20.5, 1001, speed=35.0, folder="day3")
    rules = ["--fail-on", "perplexity>+2%", "--fail-on", "size>+0%", "--fail-on", "tokens_per_s<-10%"]
    ok = report(same, "--baseline", base, *rules, "--format", "md")
    assert ok.exit_code == 0, ok.output
    assert "0 failed, 3 passed" in ok.stdout and "nightly [day1] (baseline)" in ok.stdout
    bad = report(worse, "--baseline", base, *rules, "--format", "md")
    assert bad.exit_code == 1
    assert "3 failed, 0 passed" in bad.stdout
    assert "perplexity 20 -> 20.5 (+2.50%); perplexity>+2% fails above 20.4" in bad.output
    assert "size_bytes 1000 -> 1001 (+0.10%); size>+0% fails above 1000" in bad.output
    assert "tokens_per_s 60 -> 52.5 (-12.50%); tokens_per_s<-10% fails below 54" in bad.output


@pytest.mark.parametrize("args, error", [
    (["--fail-on", "perplexity>>2"], "expected METRIC OP VALUE"),
    (["--fail-on", "perplexity>+2%"], "pass --baseline RUN_DIR"),
    (["--format", "png"], "pass --output DIR"),
    (["--format", "pdf"], "--format: expected"),
    (["--baseline", "nowhere"], "not an effopt run directory"),
])
def test_cli_input_errors_exit_2(tmp_path, args, error):
    result = report(write_run(tmp_path, "a", 20.0, 1000), *args)
    assert result.exit_code == 2 and error in result.output


def test_baseline_without_eval_is_an_input_error(tmp_path):
    base = write_run(tmp_path, "base", 20.0, 1000, status="failed")
    base_record = json.loads((base / "run.json").read_text())
    base_record["stages"] = base_record["stages"][:1]
    (base / "run.json").write_text(json.dumps(base_record))
    result = report(write_run(tmp_path, "c", 20.0, 1000), "--baseline", base, "--fail-on", "perplexity>+2%")
    assert result.exit_code == 2 and "has no completed eval" in result.output


def test_json_report_carries_the_checks(tmp_path):
    base, cand = write_run(tmp_path, "b", 20.0, 1000), write_run(tmp_path, "c", 21.0, 1000)
    result = report(cand, "--baseline", base, "--fail-on", "ppl>+2%", "--format", "json")
    assert result.exit_code == 1
    data = json.loads(result.stdout)
    assert [c["passed"] for c in data["checks"]] == [False] and len(data["rows"]) == 4


def test_html_report_is_self_contained_with_three_plots(tmp_path):
    runs = [write_run(tmp_path, n, p, s) for n, p, s in (("big", 20.0, 4000), ("small", 20.5, 1000),
                                                         ("dominated", 21.0, 2000))]
    out = tmp_path / "report.html"
    assert report(*runs, "--format", "html", "--output", out).exit_code == 0
    text = out.read_text()
    assert text.startswith("<!DOCTYPE html>") and "<script" not in text
    assert not re.search(r"(src|href)=\"(?!data:)", text) and "http://" not in text and "https://" not in text
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', text)
    assert len(images) == 3 and all(base64.b64decode(i).startswith(PNG_MAGIC) for i in images)
    # front: big's two points and small's quantized one; small's float point and both of dominated's are greyed
    assert text.count('class="dominated"') == 3 and text.count('class="front"') == 3


def test_png_format_writes_each_plot(tmp_path):
    runs = [write_run(tmp_path, "a", 20.0, 1000), write_run(tmp_path, "b", 21.0, 900, speed=None)]
    result = report(*runs, "--format", "png", "--output", tmp_path / "plots")
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert names == ["ppl_vs_size.png", "ppl_vs_speed.png", "stage_time_memory.png"]
    assert all((tmp_path / "plots" / n).read_bytes().startswith(PNG_MAGIC) for n in names)


def test_report_modules_never_import_torch():
    code = ("import sys, effopt.report, effopt.report_html, effopt.plots; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_checking_the_baseline_against_itself_is_an_input_error(tmp_path):
    base = write_run(tmp_path, "b", 20.0, 1000)
    result = report(base, "--baseline", base, "--fail-on", "ppl>+2%")
    assert result.exit_code == 2 and "no run to check besides the baseline" in result.output
