"""The recipe schema: the single source of truth for `run`, `validate`, `schema` and `stages`.

The schema is assembled from the stage registry: `stages:` is a discriminated union tagged by
`stage:`, and stages with several methods nest a second union tagged by `method:`. Every error is
turned into one message naming the file, the line, the key path and what was expected.
"""

from __future__ import annotations

import copy
import functools
import hashlib
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from effopt.errors import RecipeError
from effopt.registry import stages as registered_stages

AUSTEN_NOVELS = ("emma", "mansfield_park", "northanger_abbey", "persuasion", "pride_and_prejudice",
                 "sense_and_sensibility")
TEXT_SUFFIXES = (".txt", ".txt.gz", ".jsonl")
# Metrics an eval stage records; gates may only name these.
GATE_METRICS = ("perplexity", "bits_per_byte", "size_bytes", "parameters", "bits_per_weight", "sparsity",
                "tokens_per_s", "run_seconds", "peak_rss_mb")


class TextSource(BaseModel):
    """A named text source: where the text comes from and how it is cut into windows."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(description="builtin:austen/<novel>, or a path to a .txt, .txt.gz or .jsonl file "
                                    "(jsonl: one object per line with a 'text' field).")
    max_tokens: int = Field(32768, gt=0, description="Token budget: only the first max_tokens tokens are used.")
    seq_len: int = Field(1024, ge=2, description="Window length in tokens.")
    num_samples: int | None = Field(None, gt=0, description="Number of windows to use (calibration/train); "
                                                            "default all windows in the budget.")
    bos: bool | None = Field(None, description="Prepend BOS to every window; null = the tokenizer's own default.")

    @field_validator("source")
    @classmethod
    def _source_exists(cls, value: str) -> str:
        if value.startswith("builtin:"):
            name = value.removeprefix("builtin:")
            novels = [f"austen/{n}" for n in AUSTEN_NOVELS]
            if name not in novels:
                raise ValueError(f"unknown builtin text {value!r}; expected one of "
                                 + ", ".join(f"builtin:{n}" for n in novels))
            return value
        if not value.endswith(TEXT_SUFFIXES):
            raise ValueError(f"text file {value!r} must end in one of {', '.join(TEXT_SUFFIXES)}")
        if not Path(value).expanduser().is_file():
            raise ValueError(f"text file {value!r} does not exist")
        return value


DEFAULT_DATA = {
    "calibration": {"source": "builtin:austen/emma", "max_tokens": 131072, "seq_len": 512, "num_samples": 64},
    "train": {"source": "builtin:austen/pride_and_prejudice", "max_tokens": 131072, "seq_len": 512},
    "eval": {"source": "builtin:austen/persuasion", "max_tokens": 32768, "seq_len": 1024},
}


class Gate(BaseModel):
    """A threshold on a metric of the run's last eval; a failed gate makes `effopt run` exit 1."""

    model_config = ConfigDict(extra="forbid")

    metric: Literal[GATE_METRICS] = Field(description="Metric of the last eval point (run_seconds and "  # type: ignore[valid-type]
                                                      "peak_rss_mb are whole-run figures).")
    max: float | None = Field(None, description="Fail when the value is above this.")
    min: float | None = Field(None, description="Fail when the value is below this.")
    max_ratio: float | None = Field(None, gt=0, description="Fail when value / first eval's value is above this.")
    min_ratio: float | None = Field(None, gt=0, description="Fail when value / first eval's value is below this.")

    @model_validator(mode="after")
    def _has_threshold(self) -> "Gate":
        if all(v is None for v in (self.max, self.min, self.max_ratio, self.min_ratio)):
            raise ValueError("a gate needs at least one of max, min, max_ratio, min_ratio")
        return self

    def describe(self) -> str:
        """`perplexity <= 1.05 x first eval` style text."""
        parts = []
        for key, op in (("max", "<="), ("min", ">="), ("max_ratio", "<= x first"), ("min_ratio", ">= x first")):
            value = getattr(self, key)
            if value is not None:
                parts.append(f"{self.metric} {op} {value:g}" if "ratio" not in key else f"{self.metric} {op.split()[0]} {value:g} x first eval")
        return " and ".join(parts)


def _stage_union() -> Any:
    """The `stages:` item type: a union tagged by `stage`, nested by `method` where a stage has several."""
    members = []
    for spec in registered_stages().values():
        if len(spec.configs) == 1:
            members.append(spec.configs[0])
        else:
            members.append(Annotated[Union[tuple(spec.configs)], Field(discriminator="method")])
    if len(members) == 1:
        return members[0]
    return Annotated[Union[tuple(members)], Field(discriminator="stage")]


@functools.cache
def recipe_model() -> type[BaseModel]:
    """Build the Recipe pydantic model from the registry (once per process)."""
    StageItem = _stage_union()

    class Recipe(BaseModel):
        """An effopt recipe: named text sources, stages run in order, and gates on the result."""

        model_config = ConfigDict(extra="forbid")

        name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="Run name (letters, digits, _ . -).")
        seed: int = Field(0, description="Seed for every random choice (sampling, init, data order).")
        data: dict[str, TextSource] = Field(default_factory=dict, validate_default=True, description="Named text sources; "
                                            "calibration, train and eval get defaults when absent.")
        stages: list[StageItem] = Field(min_length=1, description="Stages, run in order.")  # type: ignore[valid-type]
        gates: list[Gate] = Field(default_factory=list, description="Checks on the final metrics.")

        @field_validator("data", mode="before")
        @classmethod
        def _default_sources(cls, value: Any) -> Any:
            if value is None:
                value = {}
            if not isinstance(value, dict):
                return value
            merged = {k: dict(v) for k, v in DEFAULT_DATA.items()}
            for key, item in value.items():
                merged[key] = {**merged.get(key, {}), **item} if isinstance(item, dict) else item
            return merged

        @model_validator(mode="after")
        def _check_references(self) -> "Recipe":
            if self.stages[0].stage != "load":
                raise ValueError("the first stage must be `stage: load`")
            for i, stage in enumerate(self.stages):
                for key in ("data", "teacher_data"):
                    ref = getattr(stage, key, None)
                    if isinstance(ref, str) and ref not in self.data:
                        raise ValueError(f"stages.{i}.{key}: no data source named {ref!r} "
                                         f"(defined: {', '.join(sorted(self.data))})")
            return self

    return Recipe


# ----------------------------------------------------------------------------------------------
# Reading recipes, overrides and error messages


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise RecipeError(f"--set {text!r}: expected KEY=VALUE, e.g. stages.2.bits=4")
    key, raw = text.split("=", 1)
    if not key:
        raise RecipeError(f"--set {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as exc:
        raise RecipeError(f"--set {text!r}: value is not valid YAML: {exc}") from None
    return key.split("."), value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Return a copy of `raw` with `KEY.PATH=VALUE` overrides applied (values parsed as YAML)."""
    data = copy.deepcopy(raw)
    for text in overrides:
        path, value = _parse_override(text)
        node: Any = data
        for depth, part in enumerate(path):
            last = depth == len(path) - 1
            where = ".".join(path[: depth + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise RecipeError(f"--set {text}: {where} is not an index of a list of {len(node)} items")
                if last:
                    node[int(part)] = value
                else:
                    node = node[int(part)]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    node = node.setdefault(part, {})
            else:
                raise RecipeError(f"--set {text}: {'.'.join(path[:depth])} is a value, not a mapping or list")
    return data


def _line_of(root: yaml.Node | None, loc: tuple) -> int | None:
    """1-based line of the deepest YAML node along the key path `loc`."""
    node, line = root, (root.start_mark.line + 1 if root is not None else None)
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = [v for k, v in node.value if getattr(k, "value", None) == str(part)]
            if not match:
                break
            node = match[0]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
        else:
            break
        line = node.start_mark.line + 1
    return line


def _clean_loc(loc: tuple) -> tuple:
    """Drop the union-branch tags pydantic inserts after `stages.<i>` (they are not keys of the file)."""
    if len(loc) < 3 or loc[0] != "stages" or not isinstance(loc[1], int):
        return loc
    rest = list(loc[2:])
    tags = set(registered_stages()) | {c.model_fields["method"].default for s in registered_stages().values()
                                       for c in s.configs if "method" in c.model_fields}
    for _ in range(2):
        if rest and isinstance(rest[0], str) and (rest[0] in tags or rest[0].startswith(("function-", "tagged-"))):
            rest.pop(0)
    return (loc[0], loc[1], *rest)


def _format_errors(exc: ValidationError, origin: str, root: yaml.Node | None) -> str:
    lines = [f"{origin}: invalid recipe ({exc.error_count()} error{'s' if exc.error_count() > 1 else ''})"]
    for err in exc.errors(include_url=False):
        loc = _clean_loc(tuple(err["loc"]))
        line = _line_of(root, loc)
        where = f"{origin}:{line}" if line else origin
        key = ".".join(str(p) for p in loc) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check its spelling; `effopt stages` lists every option)"
        got = err.get("input")
        got_text = "" if err["type"] in ("missing", "extra_forbidden") or isinstance(got, (dict, list)) else f" (got {got!r})"
        lines.append(f"  {where}: {key}: {msg}{got_text}")
    return "\n".join(lines)


def parse_recipe(raw: Any, origin: str = "<recipe>", root: yaml.Node | None = None) -> BaseModel:
    """Validate a recipe given as plain data. Raises RecipeError with a located message."""
    if not isinstance(raw, dict):
        raise RecipeError(f"{origin}: a recipe is a YAML mapping with name, stages, ... ; got {type(raw).__name__}")
    try:
        return recipe_model().model_validate(raw)
    except ValidationError as exc:
        raise RecipeError(_format_errors(exc, origin, root)) from None


def read_yaml(path: Path) -> tuple[dict, yaml.Node | None]:
    """Read a recipe file with yaml.safe_load (and its node tree for line numbers)."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        raw = yaml.safe_load(text)
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise RecipeError(f"{where}: YAML syntax error: {getattr(exc, 'problem', exc)}") from None
    return raw, root


def load_recipe(path: Path, overrides: list[str] | None = None, model_source: str | None = None) -> BaseModel:
    """Read, override and validate a recipe file.

    Args:
        path: the YAML file.
        overrides: `KEY.PATH=VALUE` strings (CLI --set), applied before validation.
        model_source: replaces the first load stage's `source` (CLI --model).
    """
    raw, root = read_yaml(path)
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping with name, stages, ...; got {type(raw).__name__}")
    raw = apply_overrides(raw, list(overrides or []))
    if model_source is not None:
        stages = raw.get("stages")
        if not isinstance(stages, list) or not stages or not isinstance(stages[0], dict):
            raise RecipeError(f"{path}: --model needs a first `stage: load` in stages")
        stages[0]["source"] = model_source
    return parse_recipe(raw, str(path), root)


def dump_recipe(recipe: BaseModel) -> str:
    """The resolved recipe (defaults filled in) as YAML: what run directories store."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)


def recipe_digest(recipe: BaseModel) -> str:
    """A stable hash of the resolved recipe; resume refuses a different one."""
    return hashlib.sha256(dump_recipe(recipe).encode()).hexdigest()[:16]


def json_schema() -> dict:
    """JSON Schema of recipes, for editors."""
    return recipe_model().model_json_schema()
