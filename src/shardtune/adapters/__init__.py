"""Adapter families. Each module turns a backbone + task into the model that trains.

`apply_adapter` is the only entry point the engine uses; adding a family means a new
module here and a new `adapter.method` value in the recipe schema.
"""

from __future__ import annotations

import torch

from shardtune.adapters import full, lora

METHODS = {"lora": lora, "none": full}


def apply_adapter(model: torch.nn.Module, recipe, task) -> torch.nn.Module:
    return METHODS[recipe.adapter.method].apply(model, recipe, task)


def is_peft(recipe) -> bool:
    return recipe.adapter.method != "none"
