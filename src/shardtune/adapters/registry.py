"""The adapter families, each registered from its own module (as peft's methods register
with `register_peft_method` from src/peft/tuners/<method>/__init__.py).

A family owns its recipe section, what it trains and saves, the combinations it refuses
(with the reason and what to change) and how it is applied. The recipe's adapter union, the
compatibility table and its docs, the optimizer's groups and `merge` ask this registry; no
other module names a method. This module and the families' top levels import no torch or
peft, so that validating a recipe stays fast; `apply` imports them when a model is built.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal


@dataclass(frozen=True)
class Rule:
    """A cell of the compatibility matrix this family refuses."""
    key: str  # the matrix footnote's name
    reason: str  # why, and what to change instead: the validation message
    refuses: Callable[[str, int, str], bool]  # (quantization.mode, ZeRO stage, task family) -> refused


@dataclass(frozen=True)
class RecipeRule:
    """A refusal that depends on the family's own options (off the matrix's axes)."""
    key: str
    reason: str  # names the field, says why and what to change: the validation message
    refuses: Callable[[object], bool]  # recipe -> refused


@dataclass(frozen=True)
class AdapterFamily:
    method: str  # adapter.method
    section: type  # its recipe section (a schema.AdapterSection or schema.Section)
    apply: Callable  # (model, recipe, task) -> the model that trains
    summary: str  # one line for the docs
    saves: Literal["adapter", "model"] = "adapter"  # what a finished run holds: adapter/ or model/
    trains_weights: bool = True  # False: only a template's {soft} tokens train
    soft_prompt: bool = False  # virtual tokens on the input or every layer: no weights to merge into
    rules: tuple[Rule, ...] = ()
    recipe_rules: tuple[RecipeRule, ...] = ()
    lr_scale: Callable[[str, object], float] | None = None  # (parameter name, recipe) -> learning-rate factor
    notes: tuple[str, ...] = field(default=())  # extra lines for docs/compatibility.md


_FAMILIES: dict[str, AdapterFamily] = {}


def register_adapter(family: AdapterFamily) -> AdapterFamily:
    if family.method in _FAMILIES:
        raise ValueError(f"adapter method {family.method!r} is registered twice")
    if family.section.model_fields["method"].annotation != Literal[family.method]:
        raise ValueError(f"the section of adapter method {family.method!r} must have method: "
                         f"Literal[{family.method!r}]")
    _FAMILIES[family.method] = family
    return family


def adapter_family(method: str) -> AdapterFamily:
    return _FAMILIES[method]


def adapter_families() -> list[AdapterFamily]:
    """In registration order: the order of the docs and the matrix."""
    return list(_FAMILIES.values())


# The families that prepend soft tokens share this rule: a shifted position breaks outputs
# that are aligned with the input tokens.
PREPENDED_POSITIONS = Rule(
    "soft tokens+positions",
    "prompt_tuning and p_tuning prepend soft tokens to the input, which shifts every position, so per-token tags "
    "and answer spans no longer line up with the model's outputs; use prefix_tuning (trained keys and values on "
    "every layer, positions unchanged) or lora",
    lambda quant, zero, family: family in ("tagging", "qa"))
