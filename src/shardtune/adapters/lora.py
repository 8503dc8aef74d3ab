"""LoRA through peft: low-rank updates on the named linear layers, head trained in full."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model


def lora_config(recipe, task, model: torch.nn.Module) -> LoraConfig:
    ad = recipe.adapter
    return LoraConfig(
        task_type=task.peft_task_type,
        r=ad.r,
        lora_alpha=ad.alpha,
        lora_dropout=ad.dropout,
        target_modules=ad.target_modules,
        # The task's head is new and must train in full; peft saves it with the adapter.
        modules_to_save=ad.modules_to_save if ad.modules_to_save is not None else task.head_modules(model),
    )


def apply(model: torch.nn.Module, recipe, task) -> torch.nn.Module:
    # peft raises a ValueError naming the target modules it could not find; the engine
    # turns it into a recipe error.
    return get_peft_model(model, lora_config(recipe, task, model))
