"""The nightly CI job of docs/NIGHTLY.md, run step by step as written, for three nights on a tiny model.

Night 1 has no baseline (report only), night 2 compresses an unchanged checkpoint (checks pass),
night 3 a degraded one (perplexity regresses: the job fails, the report is still kept, and the
baseline stays night 2's). GitHub's `uses:` steps (cache restore/save, artifact upload) are stood in
for by folder copies; every `run:` script is executed by bash exactly as the workflow holds it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "NIGHTLY.md"


def workflow() -> dict:
    """The one ```yaml block of docs/NIGHTLY.md, parsed."""
    blocks = re.findall(r"```yaml\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) == 1, "docs/NIGHTLY.md should hold exactly one workflow"
    return yaml.safe_load(blocks[0])


def fast_recipe(tmp_path: Path) -> Path:
    """recipes/nightly.yaml with a short eval (the tiny model needs no 16k tokens)."""
    recipe = yaml.safe_load((REPO / "recipes" / "nightly.yaml").read_text())
    recipe["data"]["eval"].update(max_tokens=1024, seq_len=128)
    path = tmp_path / "nightly-fast.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def effopt_shim(tmp_path: Path) -> Path:
    """A bin folder whose `effopt` runs this checkout with this interpreter."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "effopt"
    shim.write_text(f'#!/bin/sh\nPYTHONPATH="{REPO}" exec "{sys.executable}" -m effopt "$@"\n')
    shim.chmod(0o755)
    return bin_dir


class Night:
    """One workflow run in a fresh workspace; the cache folder outlives it."""

    def __init__(self, root: Path, cache: Path, env: dict):
        self.ws, self.cache, self.env = root, cache, dict(env)
        self.ws.mkdir(parents=True)
        self.files = {k: root / f".{k}" for k in ("GITHUB_ENV", "GITHUB_PATH", "GITHUB_STEP_SUMMARY")}
        for key, path in self.files.items():
            path.touch()
            self.env[key] = str(path)
        self.results: dict[str, int] = {}

    def bash(self, script: str) -> int:
        proc = subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", script], cwd=self.ws,
                              env=self.env, capture_output=True, text=True, timeout=600)
        self.log = getattr(self, "log", "") + proc.stdout + proc.stderr
        for line in self.files["GITHUB_ENV"].read_text().splitlines():
            key, _, value = line.partition("=")
            self.env[key] = value
        return proc.returncode

    def uses(self, step: dict) -> int:
        action, with_ = step["uses"].split("@")[0], step.get("with", {})
        if action == "actions/cache/restore":
            if (self.cache / "baseline").is_dir():
                shutil.copytree(self.cache / "baseline", self.ws / with_["path"])
        elif action == "actions/cache/save":
            shutil.rmtree(self.cache / "baseline", ignore_errors=True)
            shutil.copytree(self.ws / with_["path"], self.cache / "baseline")
        elif action == "actions/upload-artifact":
            kept = [p for p in with_["path"].split() if (self.ws / p).is_file()]
            self.artifact = kept
        return 0

    def run(self, job: dict) -> bool:
        ok = True
        for step in job["steps"]:
            cond = step.get("if", "success()")
            if step.get("id") == "install" or step["uses" if "uses" in step else "run"] == "actions/checkout@v4":
                continue  # this checkout's interpreter is already installed (effopt_shim)
            if cond == "success()" and not ok:
                continue
            code = self.uses(step) if "uses" in step else self.bash(step["run"])
            self.results[step.get("id", step.get("name"))] = code
            ok = ok and code == 0
        return ok


def make_checkpoint(src: Path, dst: Path, logit_scale: float = 1.0) -> None:
    """A 'training checkpoint': the tiny model, optionally degraded (final norm scaled up)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src)
    with torch.no_grad():
        model.model.norm.weight.mul_(logit_scale)
    model.save_pretrained(dst)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    stamp = 1_700_000_000 + len(list(dst.parent.iterdir())) * 1000  # newest = made last
    os.utime(dst, (stamp, stamp))


def test_nightly_job_passes_unchanged_checkpoints_and_fails_a_regression(tmp_path, tiny_model_dir):
    job = workflow()["jobs"]["compress"]
    ckpts, cache = tmp_path / "checkpoints", tmp_path / "cache"
    ckpts.mkdir()
    env = {**os.environ, **job["env"], "CHECKPOINTS": str(ckpts), "RECIPE": str(fast_recipe(tmp_path)),
           "PATH": f"{effopt_shim(tmp_path)}{os.pathsep}{os.environ['PATH']}", "EFFOPT_CACHE": str(tmp_path / "ec")}

    make_checkpoint(tiny_model_dir, ckpts / "step-1000")
    first = Night(tmp_path / "night1", cache, env)
    assert first.run(job), first.log
    assert "no baseline run" in first.log and "Regression checks" not in (first.ws / "report.md").read_text()
    assert (cache / "baseline" / "run.json").is_file()

    make_checkpoint(tiny_model_dir, ckpts / "step-2000")  # training did not move: same weights
    second = Night(tmp_path / "night2", cache, env)
    assert second.run(job), second.log
    assert first.env["MODEL"].endswith("step-1000") and second.env["MODEL"].endswith("step-2000")
    summary = Path(second.env["GITHUB_STEP_SUMMARY"]).read_text()
    assert "Regression checks: 0 failed, 2 passed" in summary
    assert set(second.artifact) == {"report.html", "report.md", "run/run.json", "run/recipe.yaml", "run/log.txt"}

    make_checkpoint(tiny_model_dir, ckpts / "step-3000", logit_scale=8.0)  # a bad checkpoint
    third = Night(tmp_path / "night3", cache, env)
    assert not third.run(job)
    assert third.results["compare"] == 1 and "keep" not in third.results and "save" not in third.results
    summary = Path(third.env["GITHUB_STEP_SUMMARY"]).read_text()
    assert "Regression checks: 1 failed, 1 passed" in summary
    assert re.search(r"\*\*FAIL\*\* .*perplexity .* -> .*perplexity>\+2% fails above", summary)
    assert "regression:" in third.log and "perplexity" in third.log
    html = (third.ws / "report.html").read_text()
    assert "1 failed" in html and third.artifact  # the report is kept even though the night failed
    baseline_recipe = yaml.safe_load((cache / "baseline" / "recipe.yaml").read_text())
    assert baseline_recipe["stages"][0]["source"].endswith("step-2000")  # still the last good night


@pytest.mark.parametrize("step_id", ["newest", "compress", "compare", "keep"])
def test_documented_steps_are_plain_bash(step_id):
    steps = {s.get("id"): s for s in workflow()["jobs"]["compress"]["steps"]}
    assert "${{" not in steps[step_id]["run"]  # runnable outside Actions, as the test above runs them
