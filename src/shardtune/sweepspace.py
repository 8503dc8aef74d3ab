"""A sweep's search space and budget: the file `shardtune sweep --space` reads, and
`--grid key=[a,b]`, validated like a recipe before anything starts.

    metric: loss            # what to choose by (default: output.keep_best_by, else the validation loss)
    mode: min               # min / max (default: min for a *loss*, max for anything else)
    trials: 8               # samples of the space; a grid is run whole for each
    max_concurrent: 2       # trials at once (default: as many as the cluster's CPUs/GPUs hold)
    time_budget_s: 3600     # stop starting and running trials after this long
    scheduler: asha         # asha (stop trials that trail at each rung) or none
    grace_period: 1         # ASHA: epochs a trial trains before it can be stopped
    reduction_factor: 3     # ASHA: one in this many trials goes on at each rung
    seed: 0                 # the random draws of choice / uniform / loguniform
    parameters:
      train.learning_rate: {loguniform: [1.0e-5, 1.0e-3]}
      adapter.r: {choice: [8, 16, 32]}
      adapter.dropout: {uniform: [0.0, 0.1]}
      adapter.target_modules: {grid: [[query, value], all-linear]}

Every parameter must be a recipe field: each of its values (a range's two ends) is set
into the recipe and validated, so a misspelt key fails with the recipe's did-you-mean and
a value the recipe refuses fails with the recipe's message, before any trial starts.
Only Ray Tune (sweep.py) turns the space into trials; this module imports neither Ray
nor torch, so a bad space is answered at once.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from shardtune.errors import RecipeError
from shardtune.recipe import load_raw, parse_overrides, set_value, validate_recipe
from shardtune.recipe.messages import explain_errors

# Fields a sweep decides itself (every trial's run directory is its own) or that do not
# change what a trial computes.
NOT_SWEPT = {"output": "the sweep gives every trial its own run directory under --out",
             "cluster.address": "every trial runs on the sweep's cluster (--address)"}


class Parameter(BaseModel):
    """One swept field: exactly one of the four kinds."""

    model_config = ConfigDict(extra="forbid")
    choice: list[Any] | None = Field(None, min_length=1, description="values drawn at random, one per trial")
    grid: list[Any] | None = Field(None, min_length=1, description="every value, each in its own trial")
    uniform: tuple[float, float] | None = Field(None, description="[low, high], drawn uniformly")
    loguniform: tuple[float, float] | None = Field(None, description="[low, high] (> 0), drawn on a log scale")

    @model_validator(mode="after")
    def _one_kind(self):
        kinds = [k for k in ("choice", "grid", "uniform", "loguniform") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError("give exactly one of choice, grid, uniform, loguniform "
                             f"(got {', '.join(kinds) or 'none'})")
        bounds = self.uniform or self.loguniform
        if bounds is not None and not bounds[0] < bounds[1]:
            raise ValueError(f"a range is [low, high] with low < high (got {list(bounds)})")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError(f"loguniform's low end must be above 0 (got {self.loguniform[0]})")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("choice", "grid", "uniform", "loguniform") if getattr(self, k) is not None)

    def values_to_check(self) -> list:
        """The values validated against the recipe: every listed one; a range's ends and a
        point between them (a fraction, so that a range over a whole-number field fails)."""
        if self.choice is not None or self.grid is not None:
            return list(self.choice or self.grid)
        low, high = self.uniform or self.loguniform
        middle = math.sqrt(low * high) if self.loguniform else (low + high) / 2
        return [low, high, middle + 1e-3 * (high - low) if float(middle).is_integer() else middle]


class SweepSpace(BaseModel):
    model_config = ConfigDict(extra="forbid")
    parameters: dict[str, Parameter] = Field(min_length=1, description="recipe field (section.key) -> its values")
    metric: str | None = Field(None, description="the validation metric to choose by")
    mode: Literal["min", "max"] | None = None
    trials: int = Field(1, ge=1, description="samples of the space (a grid is run whole for each)")
    max_concurrent: int | None = Field(None, ge=1)
    time_budget_s: float | None = Field(None, gt=0)
    scheduler: Literal["asha", "none"] = "asha"
    grace_period: float = Field(1.0, gt=0, description="ASHA: epochs before a trial may be stopped")
    reduction_factor: float = Field(3.0, ge=2)
    seed: int = 0

    def size(self) -> int:
        """How many trials the space makes, as Tune counts them: `trials` times every grid."""
        return self.trials * math.prod(len(p.grid) for p in self.parameters.values() if p.grid is not None)

    def metric_and_mode(self, raw_recipe: dict) -> tuple[str, str]:
        """What the sweep ranks trials by: the space's metric, else the recipe's
        keep_best_by, else the validation loss; lower is better for a loss."""
        metric = self.metric or (raw_recipe.get("output") or {}).get("keep_best_by") or "loss"
        return metric, self.mode or ("min" if "loss" in metric else "max")


def parse_grid(pairs: list[str]) -> dict[str, Parameter]:
    """`--grid 'train.learning_rate=[1e-4, 3e-4]'` -> a grid parameter per key."""
    found = {}
    for (path, value), pair in zip(parse_overrides(pairs), pairs):
        if not isinstance(value, list) or not value:
            raise RecipeError(f"--grid '{pair}': the value is a YAML list of the values to try, e.g. "
                              f"--grid '{'.'.join(path)}=[1, 2]'")
        found[".".join(path)] = Parameter(grid=value)
    return found


def load_space(path: Path | None, grid: list[str], **cli: Any) -> SweepSpace:
    """The space file (if any) with --grid parameters added and the command line's
    budget options over the file's; a bad file is refused with the field named."""
    raw: dict = {}
    where = str(path) if path is not None else "--grid"
    if path is not None:
        raw = load_raw(path)  # the recipe's safe, size-limited YAML reader
    raw.setdefault("parameters", {})
    if not isinstance(raw["parameters"], dict):
        raise RecipeError("parameters: a mapping of recipe fields (section.key) to {choice|grid|uniform|"
                          "loguniform: ...}", where=where)
    raw["parameters"].update({k: v.model_dump(exclude_none=True) for k, v in parse_grid(grid).items()})
    raw.update({k: v for k, v in cli.items() if v is not None})
    if not raw["parameters"]:
        raise RecipeError("nothing to sweep: give --space FILE with a parameters: section, or --grid "
                          "'section.key=[a, b]'", where=where)
    try:
        return SweepSpace.model_validate(raw)
    except ValidationError as exc:
        raise RecipeError(explain_errors(exc.errors(), root=SweepSpace), where=where) from None


def check_space(space: SweepSpace, raw_recipe: dict, where: str) -> None:
    """Every swept key is a recipe field the sweep may set, and every value it can take
    gives a valid recipe (files and output are the base recipe's, checked once)."""
    problems = []
    for key, parameter in space.parameters.items():
        refused = next((why for prefix, why in NOT_SWEPT.items() if key == prefix or key.startswith(prefix + ".")),
                       None)
        if refused:
            problems.append(f"parameters.{key}: not sweepable; {refused}")
            continue
        for value in parameter.values_to_check():
            trial = set_value(copy.deepcopy(raw_recipe), key.split("."), value)
            try:
                validate_recipe(trial, where=where, check_files=False)
            except RecipeError as exc:
                hint = ("; a range draws fractions: use choice or grid for whole numbers"
                        if parameter.kind in ("uniform", "loguniform") else "")
                problems.append(f"parameters.{key} = {value!r}: " + "; ".join(exc.problems) + hint)
                break  # one message per key is enough to fix it
    if problems:
        raise RecipeError(problems, where=where)
