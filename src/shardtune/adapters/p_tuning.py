"""P-tuning through peft (Liu et al. 2021): soft tokens produced by a small prompt encoder
(MLP or LSTM) and prepended to the input embeddings."""

from __future__ import annotations

import torch
from peft import PromptEncoderConfig, PromptEncoderReparameterizationType, get_peft_model


def config(recipe, task, model: torch.nn.Module) -> PromptEncoderConfig:
    ad = recipe.adapter
    kwargs = {"encoder_hidden_size": ad.encoder_hidden_size} if ad.encoder_hidden_size else {}
    return PromptEncoderConfig(
        task_type=task.peft_task_type, num_virtual_tokens=ad.num_virtual_tokens,
        encoder_reparameterization_type=PromptEncoderReparameterizationType[ad.encoder], **kwargs,
        modules_to_save=ad.modules_to_save if ad.modules_to_save is not None else task.head_modules(model),
    )


def apply(model: torch.nn.Module, recipe, task) -> torch.nn.Module:
    return get_peft_model(model, config(recipe, task, model))
