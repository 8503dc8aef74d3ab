"""A frozen backbone with no adapter: only a prompt template's {soft} tokens train (they
belong to the prompt model, prompting/model.py). The soft-prompt training mode with a
hand-written or learned template and nothing else trained."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from shardtune.adapters.registry import AdapterFamily, RecipeRule, Rule, register_adapter
from shardtune.schema import Section
from shardtune.tasks.registry import task_kind


class FrozenBackbone(Section):
    """No adapter and no backbone weight trains: only a prompt template's {soft} tokens."""
    method: Literal["frozen"]
    modules_to_save: list[str] | None = Field(None, description="not used: nothing but the soft tokens trains")


def apply(model, recipe, task):
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


OUTSIDE_PROMPTS = Rule(
    "frozen outside prompts",
    "adapter.method frozen trains nothing but a prompt template's {soft} tokens, which only task.type "
    "prompt_classification has; choose an adapter (lora, ia3, prefix_tuning, ...)",
    lambda quant, zero, family: family != "prompt")
NO_SOFT_TOKENS = RecipeRule(
    "frozen without soft tokens",
    "adapter.method frozen trains only the templates' {soft} tokens, and no template has one: nothing would train. "
    "Add soft tokens (e.g. '{soft:4} {text} {mask}'), or choose an adapter (lora, prompt_tuning, ...)",
    lambda recipe: task_kind(recipe.task.type).family == "prompt" and not recipe.task.has_soft_tokens())

register_adapter(AdapterFamily(method="frozen", section=FrozenBackbone, apply=apply, trains_weights=False,
                               summary="nothing but a prompt template's {soft} tokens trains",
                               rules=(OUTSIDE_PROMPTS,), recipe_rules=(NO_SOFT_TOKENS,)))
