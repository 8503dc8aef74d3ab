"""IA3 through peft: learned scaling vectors on keys, values and feed-forward inputs
(Liu et al. 2022). Fewer trainable parameters than LoRA by an order of magnitude."""

from __future__ import annotations

import torch
from peft import IA3Config, get_peft_model


def config(recipe, task, model: torch.nn.Module) -> IA3Config:
    ad = recipe.adapter
    return IA3Config(
        task_type=task.peft_task_type, target_modules=ad.target_modules,
        feedforward_modules=ad.feedforward_modules,
        modules_to_save=ad.modules_to_save if ad.modules_to_save is not None else task.head_modules(model),
    )


def apply(model: torch.nn.Module, recipe, task) -> torch.nn.Module:
    return get_peft_model(model, config(recipe, task, model))
