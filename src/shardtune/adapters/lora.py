"""LoRA through peft, with its variants: rsLoRA scaling, DoRA, Gaussian or PiSSA
initialisation, and LoRA+ (the B matrices on a larger learning rate). The task's head
trains in full and is saved with the adapter."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from shardtune.adapters.registry import AdapterFamily, RecipeRule, register_adapter
from shardtune.schema import AdapterBase, TargetModules

INIT = {"default": True, "gaussian": "gaussian", "pissa": "pissa"}


class LoraAdapter(AdapterBase):
    method: Literal["lora"] = "lora"
    r: int = Field(8, ge=1, le=1024, description="LoRA rank; higher trains more parameters")
    alpha: float = Field(16, gt=0, description="LoRA scaling numerator (scale = alpha / r, or alpha / sqrt(r))")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the LoRA input")
    target_modules: TargetModules = Field(
        default_factory=lambda: ["query", "value"], description="module names to adapt, or all-linear")
    use_rslora: bool = Field(False, description="rank-stabilised scaling alpha / sqrt(r) (rsLoRA)")
    use_dora: bool = Field(False, description="weight-decomposed LoRA (DoRA): a trained magnitude per output")
    init: Literal["default", "gaussian", "pissa"] = Field(
        "default", description="A/B initialisation: default (B = 0), gaussian, or pissa (principal singular "
                               "vectors of the weight; needs an unquantised backbone)")
    loraplus_lr_ratio: float | None = Field(
        None, ge=1, description="LoRA+: the B matrices learn this many times faster than the A matrices")


def config(recipe, task, model):
    from peft import LoraConfig

    ad = recipe.adapter
    return LoraConfig(
        task_type=task.peft_task_type, r=ad.r, lora_alpha=ad.alpha, lora_dropout=ad.dropout,
        target_modules=ad.target_modules, use_rslora=ad.use_rslora, use_dora=ad.use_dora,
        init_lora_weights=INIT[ad.init],
        modules_to_save=ad.modules_to_save if ad.modules_to_save is not None else task.head_modules(model),
    )


def apply(model, recipe, task):
    from peft import get_peft_model

    return get_peft_model(model, config(recipe, task, model))


def learning_rate_scale(name: str, recipe) -> float:
    """LoRA+ (Hayou et al. 2024): B learns `loraplus_lr_ratio` times faster than A."""
    ratio = recipe.adapter.loraplus_lr_ratio
    is_b = ".lora_B." in name or ".lora_embedding_B." in name
    return ratio if ratio and is_b else 1.0


PISSA_QUANTIZED = RecipeRule(
    "PiSSA+quantised",
    "adapter.init: pissa initialises from a singular value decomposition of full-precision weights, and peft "
    "refuses quantised ones; use init: default or gaussian with a quantised backbone, or quantization.mode: none",
    lambda recipe: recipe.adapter.init == "pissa" and recipe.quantization.mode != "none")
DORA_QUANTIZED_ZERO3 = RecipeRule(
    "DoRA+quantised+ZeRO-3",
    "adapter.use_dora recomputes the norm of the dequantised base weight on every forward pass, which needs the "
    "whole weight, and ZeRO-3 holds only a shard of each quantised weight; use sharding.zero_stage 0-2, plain "
    "LoRA, or quantization.mode: none",
    lambda recipe: (recipe.adapter.use_dora and recipe.quantization.mode != "none"
                    and recipe.sharding.zero_stage == 3))

register_adapter(AdapterFamily(
    method="lora", section=LoraAdapter, apply=apply, summary="low-rank updates of chosen linear layers (LoRA)",
    recipe_rules=(PISSA_QUANTIZED, DORA_QUANTIZED_ZERO3), lr_scale=learning_rate_scale,
    notes=("LoRA's variants (rsLoRA, DoRA, LoRA+, Gaussian or PiSSA init, all-linear) train wherever",
           "  LoRA does, but for the two rules above; each is tested on the classification and causal-LM",
           "  families under ZeRO-2 and ZeRO-3, unquantised and 4-bit.")))
