"""CLI commands through Typer's CliRunner."""

from __future__ import annotations

import json
import subprocess
import sys

from typer.testing import CliRunner

from effopt.cli import app


def test_help_does_not_import_torch():
    code = "import sys, effopt.cli; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_help_lists_commands():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("run", "validate", "schema", "stages", "report"):
        assert command in result.output


def test_schema_is_json_schema():
    result = CliRunner().invoke(app, ["schema"])
    schema = json.loads(result.stdout)
    assert schema["title"] == "Recipe" and "stages" in schema["properties"]


def test_stages_lists_every_registered_stage_and_method():
    from effopt.registry import stages

    listing = json.loads(CliRunner().invoke(app, ["stages", "--json"]).stdout)
    names = {(item["stage"], item["method"]) for item in listing}
    for spec in stages().values():
        assert any(stage == spec.name for stage, _ in names)
    rtn = next(item for item in listing if item["method"] == "rtn")
    bits = next(opt for opt in rtn["options"] if opt["name"] == "bits")
    assert bits["default"] == 4 and bits["help"]


def test_validate_accepts_shipped_quickstart():
    result = CliRunner().invoke(app, ["validate", "recipes/quickstart.yaml"])
    assert result.exit_code == 0, result.output


def test_report_rejects_non_run_dir(tmp_path):
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "run.json" in result.output


def test_run_missing_recipe_file_is_exit_2(tmp_path):
    result = CliRunner().invoke(app, ["run", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2 and "does not exist" in result.output
