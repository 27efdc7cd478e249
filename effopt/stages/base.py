"""Config bases shared by every stage: strict pydantic models (a misspelled key fails at parse)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

# The decoder's linear layers of Llama/Gemma-style models; lm_head and embeddings stay out.
DEFAULT_TARGETS = ["*.q_proj", "*.k_proj", "*.v_proj", "*.o_proj", "*.gate_proj", "*.up_proj", "*.down_proj"]


class StageConfig(BaseModel):
    """Fields every stage has."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    label: str | None = Field(None, description="Name shown in reports for this stage (default: stage[/method]).")


class TargetedStageConfig(StageConfig):
    """A stage that picks layers by module-name globs."""

    targets: list[str] = Field(default_factory=lambda: list(DEFAULT_TARGETS),
                               description="Glob patterns over module names (fnmatch) of layers to transform.")
    ignore: list[str] = Field(default_factory=lambda: ["lm_head"],
                              description="Glob patterns of module names to leave alone, even if targeted.")
