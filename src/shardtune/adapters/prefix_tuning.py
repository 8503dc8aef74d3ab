"""Prefix tuning through peft (Li & Liang 2021): trained keys and values prepended on every
attention layer. Without the projection MLP this is P-tuning v2's deep prompt tuning.
The sequence keeps its positions, so it also serves tagging and extractive QA."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from shardtune.adapters.registry import AdapterFamily, RecipeRule, register_adapter
from shardtune.schema import AdapterBase


class PrefixTuningAdapter(AdapterBase):
    """Trained keys and values on every layer: deep prompts, as in P-tuning v2."""
    method: Literal["prefix_tuning"]
    num_virtual_tokens: int = Field(20, ge=1, le=512, description="prefix length on every layer")
    projection: bool = Field(
        False, description="reparameterise the prefix through a two-layer MLP (prefix tuning paper)")
    projection_hidden_size: int | None = Field(None, ge=1, description="the MLP's hidden size; default: the model's")


def config(recipe, task, model):
    from peft import PrefixTuningConfig

    ad = recipe.adapter
    kwargs = {"encoder_hidden_size": ad.projection_hidden_size} if ad.projection_hidden_size else {}
    return PrefixTuningConfig(
        task_type=task.peft_task_type, num_virtual_tokens=ad.num_virtual_tokens,
        prefix_projection=ad.projection, **kwargs,
        modules_to_save=ad.modules_to_save if ad.modules_to_save is not None else task.head_modules(model),
    )


def apply(model, recipe, task):
    from peft import get_peft_model

    return get_peft_model(model, config(recipe, task, model))


# peft feeds the prefix in as past keys and values, which checkpointed layers cannot take.
NO_CHECKPOINTING = RecipeRule(
    key="prefix_tuning_checkpointing", refuses=lambda recipe: recipe.train.gradient_checkpointing,
    reason="train.gradient_checkpointing: peft's prefix tuning passes its prefix as past keys and values, which "
           "gradient checkpointing cannot recompute; set train.gradient_checkpointing: false, or use "
           "adapter.method: prompt_tuning, p_tuning or lora")

register_adapter(AdapterFamily(method="prefix_tuning", section=PrefixTuningAdapter, apply=apply, soft_prompt=True,
                               recipe_rules=(NO_CHECKPOINTING,),
                               summary="trained keys and values on every attention layer (prefix tuning)"))
