"""Prompt tuning through peft (Lester et al. 2021): soft tokens prepended to the input
embeddings, the only trained weights besides the task head. Initialised at random or
from the embeddings of a text."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from shardtune.adapters.registry import PREPENDED_POSITIONS, AdapterFamily, register_adapter
from shardtune.schema import AdapterBase


class PromptTuningAdapter(AdapterBase):
    method: Literal["prompt_tuning"]
    num_virtual_tokens: int = Field(20, ge=1, le=512, description="soft tokens prepended to every input")
    init_text: str | None = Field(
        None, description="initialise the soft tokens from this text's embeddings (default: random)")


def config(recipe, task, model, tokenizer_path: str):
    from peft import PromptTuningConfig, PromptTuningInit

    ad = recipe.adapter
    from_text = ad.init_text is not None
    return PromptTuningConfig(
        task_type=task.peft_task_type, num_virtual_tokens=ad.num_virtual_tokens,
        prompt_tuning_init=PromptTuningInit.TEXT if from_text else PromptTuningInit.RANDOM,
        prompt_tuning_init_text=ad.init_text, tokenizer_name_or_path=tokenizer_path if from_text else None,
        modules_to_save=ad.modules_to_save if ad.modules_to_save is not None else task.head_modules(model),
    )


def apply(model, recipe, task):
    from peft import get_peft_model

    from shardtune.backbone import model_location

    return get_peft_model(model, config(recipe, task, model, model_location(recipe)))


register_adapter(AdapterFamily(method="prompt_tuning", section=PromptTuningAdapter, apply=apply, soft_prompt=True,
                               summary="soft tokens prepended to the input embeddings (prompt tuning)",
                               rules=(PREPENDED_POSITIONS,)))
