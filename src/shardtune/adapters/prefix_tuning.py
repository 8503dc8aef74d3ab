"""Prefix tuning through peft (Li & Liang 2021): trained keys and values prepended on every
attention layer. Without the projection MLP this is P-tuning v2's deep prompt tuning.
The sequence keeps its positions, so it also serves tagging and extractive QA."""

from __future__ import annotations

import torch
from peft import PrefixTuningConfig, get_peft_model


def config(recipe, task, model: torch.nn.Module) -> PrefixTuningConfig:
    ad = recipe.adapter
    kwargs = {"encoder_hidden_size": ad.projection_hidden_size} if ad.projection_hidden_size else {}
    return PrefixTuningConfig(
        task_type=task.peft_task_type, num_virtual_tokens=ad.num_virtual_tokens,
        prefix_projection=ad.projection, **kwargs,
        modules_to_save=ad.modules_to_save if ad.modules_to_save is not None else task.head_modules(model),
    )


def apply(model: torch.nn.Module, recipe, task) -> torch.nn.Module:
    return get_peft_model(model, config(recipe, task, model))
