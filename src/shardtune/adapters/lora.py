"""LoRA through peft, with its variants: rsLoRA scaling, DoRA, Gaussian or PiSSA
initialisation, and LoRA+ (the B matrices on a larger learning rate). The task's head
trains in full and is saved with the adapter."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model

INIT = {"default": True, "gaussian": "gaussian", "pissa": "pissa"}


def config(recipe, task, model: torch.nn.Module) -> LoraConfig:
    ad = recipe.adapter
    return LoraConfig(
        task_type=task.peft_task_type, r=ad.r, lora_alpha=ad.alpha, lora_dropout=ad.dropout,
        target_modules=ad.target_modules, use_rslora=ad.use_rslora, use_dora=ad.use_dora,
        init_lora_weights=INIT[ad.init],
        modules_to_save=ad.modules_to_save if ad.modules_to_save is not None else task.head_modules(model),
    )


def apply(model: torch.nn.Module, recipe, task) -> torch.nn.Module:
    return get_peft_model(model, config(recipe, task, model))


def learning_rate_scale(name: str, recipe) -> float:
    """LoRA+ (Hayou et al. 2024): B learns `loraplus_lr_ratio` times faster than A."""
    ratio = recipe.adapter.loraplus_lr_ratio
    is_b = ".lora_B." in name or ".lora_embedding_B." in name
    return ratio if ratio and is_b else 1.0
