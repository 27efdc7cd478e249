"""Every recipe shipped in recipes/ validates (the schema is the single source of truth)."""

from __future__ import annotations

from pathlib import Path

import pytest

from effopt.recipe import load_recipe

RECIPES = sorted((Path(__file__).resolve().parent.parent / "recipes").rglob("*.yaml"))


def test_recipes_exist():
    assert any(p.name == "quickstart.yaml" for p in RECIPES)


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_shipped_recipe_validates(path: Path):
    recipe = load_recipe(path)
    assert recipe.stages[0].stage == "load"
