"""What every recipe section is built from. Outside the recipe package on purpose: plug-ins
(adapters/) define their own sections with it, and the recipe imports the plug-ins to build
its unions, so the plug-ins must not import the recipe."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class Section(BaseModel):
    # inf and nan are never a setting (.inf as cpus_per_worker or alpha used to pass).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


Beta = Annotated[float, Field(ge=0, lt=1)]
TargetModules = list[str] | Literal["all-linear"]


def modules_to_save_field():
    return Field(None, description="modules trained in full and saved with the adapter; default: the task's head")


class AdapterBase(Section):
    """The base of an adapter family's section: its `method` Literal is the union's tag."""
    modules_to_save: list[str] | None = modules_to_save_field()

    @field_validator("target_modules", check_fields=False)
    @classmethod
    def _non_empty(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("must name at least one module, or be all-linear")
        return value


class TaskBase(Section):
    """The base of a task's section: its `type` Literal is the union's tag."""

    def has_soft_tokens(self) -> bool:
        """Whether the task itself trains soft tokens (prompt templates' {soft}): they live
        outside the model's weights, so such a run cannot be merged."""
        return False
