"""Full fine-tuning: no adapter, every weight trains. The baseline adapters are judged by."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from shardtune.adapters.registry import AdapterFamily, RecipeRule, Rule, register_adapter
from shardtune.schema import Section


class FullFineTuning(Section):
    method: Literal["none"]
    modules_to_save: list[str] | None = Field(None, description="not used: every weight trains")


def apply(model, recipe, task):
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    return model


QUANTIZED = Rule(
    "full+quantised",
    "full fine-tuning trains every weight, and bitsandbytes weights are frozen integer codes that cannot take "
    "gradient steps; use an adapter on the quantised backbone (LoRA on 4-bit is QLoRA) or quantization.mode: none",
    lambda quant, zero, family: quant != "none")
MODULES_TO_SAVE = RecipeRule(
    "full+modules_to_save",
    "adapter.modules_to_save applies to adapters; with method: none every weight trains already, so remove it",
    lambda recipe: bool(recipe.adapter.modules_to_save))

register_adapter(AdapterFamily(method="none", section=FullFineTuning, apply=apply, saves="model",
                               summary="full fine-tuning: every weight trains (the baseline)",
                               rules=(QUANTIZED,), recipe_rules=(MODULES_TO_SAVE,)))
