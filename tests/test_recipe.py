"""Recipe parsing: overrides, defaults, schema, messages."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from effopt.errors import RecipeError
from effopt.recipe import apply_overrides, dump_recipe, json_schema, load_recipe, parse_recipe, recipe_digest

BASE = {"name": "t", "stages": [{"stage": "load"}, {"stage": "eval"},
                                {"stage": "quantize", "method": "rtn", "bits": 8}]}


def write(tmp_path: Path, data) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("override,check", [
    ("stages.2.bits=4", lambda r: r.stages[2].bits == 4),
    ("stages.2.symmetric=true", lambda r: r.stages[2].symmetric is True),
    ("seed=7", lambda r: r.seed == 7),
    ("data.eval.max_tokens=100", lambda r: r.data["eval"].max_tokens == 100),
    ("data.eval.source=builtin:austen/emma", lambda r: r.data["eval"].source == "builtin:austen/emma"),
    ("stages.2.targets=[\"*.q_proj\"]", lambda r: r.stages[2].targets == ["*.q_proj"]),
])
def test_overrides_apply_and_revalidate(tmp_path, override, check):
    recipe = load_recipe(write(tmp_path, BASE), [override])
    assert check(recipe)


@pytest.mark.parametrize("override,message", [
    ("stages.2.bits=16", "stages.2.bits"),
    ("stages.9.bits=4", "stages.9"),
    ("nokey", "KEY=VALUE"),
    ("stages.2.bitz=4", "stages.2.bitz"),
    ("data.eval.source=/does/not/exist.txt", "data.eval.source"),
])
def test_bad_overrides_are_input_errors(tmp_path, override, message):
    with pytest.raises(RecipeError, match=message.replace(".", r"\.")):
        load_recipe(write(tmp_path, BASE), [override])


def test_override_data_source_to_a_text_file(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    recipe = load_recipe(write(tmp_path, BASE), [f"data.eval.source={notes}"])
    assert recipe.data["eval"].source == str(notes)


def test_model_override_replaces_load_source(tmp_path):
    recipe = load_recipe(write(tmp_path, BASE), model_source="builtin:gemma3-270m")
    assert recipe.stages[0].source == "builtin:gemma3-270m"


def test_defaults_fill_required_sources():
    recipe = parse_recipe(BASE)
    assert {"calibration", "train", "eval"} <= set(recipe.data)
    assert recipe.data["eval"].source == "builtin:austen/persuasion"


def test_partial_data_source_keeps_defaults():
    recipe = parse_recipe({**BASE, "data": {"eval": {"max_tokens": 10}}})
    assert recipe.data["eval"].max_tokens == 10
    assert recipe.data["eval"].source == "builtin:austen/persuasion"


def test_resolved_recipe_round_trips_and_digest_is_stable():
    recipe = parse_recipe(BASE)
    again = parse_recipe(yaml.safe_load(dump_recipe(recipe)))
    assert recipe_digest(recipe) == recipe_digest(again)
    assert recipe_digest(recipe) != recipe_digest(parse_recipe({**BASE, "seed": 1}))


def test_apply_overrides_does_not_mutate_input():
    raw = {"a": {"b": 1}}
    out = apply_overrides(raw, ["a.b=2"])
    assert raw["a"]["b"] == 1 and out["a"]["b"] == 2


def test_json_schema_has_stage_union():
    schema = json_schema()
    text = str(schema)
    for stage in ("load", "eval", "quantize", "export"):
        assert f"'{stage}'" in text
