"""Prompt tuning through peft (Lester et al. 2021): soft tokens prepended to the input
embeddings, the only trained weights besides the task head. Initialised at random or
from the embeddings of a text."""

from __future__ import annotations

import torch
from peft import PromptTuningConfig, PromptTuningInit, get_peft_model


def config(recipe, task, model: torch.nn.Module, tokenizer_path: str) -> PromptTuningConfig:
    ad = recipe.adapter
    from_text = ad.init_text is not None
    return PromptTuningConfig(
        task_type=task.peft_task_type, num_virtual_tokens=ad.num_virtual_tokens,
        prompt_tuning_init=PromptTuningInit.TEXT if from_text else PromptTuningInit.RANDOM,
        prompt_tuning_init_text=ad.init_text, tokenizer_name_or_path=tokenizer_path if from_text else None,
        modules_to_save=ad.modules_to_save if ad.modules_to_save is not None else task.head_modules(model),
    )


def apply(model: torch.nn.Module, recipe, task) -> torch.nn.Module:
    from shardtune.backbone import model_location

    return get_peft_model(model, config(recipe, task, model, model_location(recipe)))
