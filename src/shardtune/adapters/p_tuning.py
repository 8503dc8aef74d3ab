"""P-tuning through peft (Liu et al. 2021): soft tokens produced by a small prompt encoder
(MLP or LSTM) and prepended to the input embeddings."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from shardtune.adapters.registry import PREPENDED_POSITIONS, AdapterFamily, register_adapter
from shardtune.schema import AdapterBase


class PTuningAdapter(AdapterBase):
    method: Literal["p_tuning"]
    num_virtual_tokens: int = Field(20, ge=1, le=512, description="soft tokens prepended to every input")
    encoder: Literal["MLP", "LSTM"] = Field("MLP", description="the prompt encoder network")
    encoder_hidden_size: int | None = Field(None, ge=1, description="the prompt encoder's hidden size")


def config(recipe, task, model):
    from peft import PromptEncoderConfig, PromptEncoderReparameterizationType

    ad = recipe.adapter
    kwargs = {"encoder_hidden_size": ad.encoder_hidden_size} if ad.encoder_hidden_size else {}
    return PromptEncoderConfig(
        task_type=task.peft_task_type, num_virtual_tokens=ad.num_virtual_tokens,
        encoder_reparameterization_type=PromptEncoderReparameterizationType[ad.encoder], **kwargs,
        modules_to_save=ad.modules_to_save if ad.modules_to_save is not None else task.head_modules(model),
    )


def apply(model, recipe, task):
    from peft import get_peft_model

    return get_peft_model(model, config(recipe, task, model))


register_adapter(AdapterFamily(method="p_tuning", section=PTuningAdapter, apply=apply, soft_prompt=True,
                               summary="soft tokens from a small prompt encoder, prepended to the input (P-tuning)",
                               rules=(PREPENDED_POSITIONS,)))
