"""IA3 through peft: learned scaling vectors on keys, values and feed-forward inputs
(Liu et al. 2022). Fewer trainable parameters than LoRA by an order of magnitude."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from shardtune.adapters.registry import AdapterFamily, register_adapter
from shardtune.schema import AdapterBase, TargetModules


class IA3Adapter(AdapterBase):
    method: Literal["ia3"]
    target_modules: TargetModules | None = Field(
        None, description="modules whose activations get a learned scaling vector; default: peft's per "
                          "architecture (keys, values and the feed-forward output)")
    feedforward_modules: list[str] | None = Field(
        None, description="those of target_modules that are feed-forward layers (scaled on their input)")


def config(recipe, task, model):
    from peft import IA3Config

    ad = recipe.adapter
    return IA3Config(
        task_type=task.peft_task_type, target_modules=ad.target_modules,
        feedforward_modules=ad.feedforward_modules,
        modules_to_save=ad.modules_to_save if ad.modules_to_save is not None else task.head_modules(model),
    )


def apply(model, recipe, task):
    from peft import get_peft_model

    return get_peft_model(model, config(recipe, task, model))


register_adapter(AdapterFamily(method="ia3", section=IA3Adapter, apply=apply,
                               summary="learned scaling vectors on keys, values and feed-forward inputs (IA3)"))
