"""Every malformed recipe in tests/recipes_invalid/ exits 2 and names the offending key."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from effopt.cli import app

CASES = sorted((Path(__file__).parent / "recipes_invalid").glob("*.yaml"))


def _expected(path: Path) -> str:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# expect: "), f"{path.name} needs a '# expect: ' first line"
    return first.removeprefix("# expect: ").strip()


def test_there_are_at_least_25_cases():
    assert len(CASES) >= 25


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_invalid_recipe_exits_2_and_names_the_key(path: Path):
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 2, result.output
    assert _expected(path) in result.output, result.output
    assert str(path) in result.output  # the file is named


@pytest.mark.parametrize("path", CASES[:5], ids=[p.stem for p in CASES[:5]])
def test_run_refuses_invalid_recipe_before_doing_anything(path: Path, tmp_path: Path):
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", str(path), "--output", str(out)])
    assert result.exit_code == 2, result.output
    assert not out.exists()


def test_error_names_the_line(tmp_path: Path):
    result = CliRunner().invoke(app, ["validate", str(Path(__file__).parent / "recipes_invalid" / "wrong_type_bits.yaml")])
    assert "wrong_type_bits.yaml:7" in result.output, result.output
