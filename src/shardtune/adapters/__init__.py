"""Adapter families. Each module turns a backbone + task into the model that trains.

`apply_adapter` is the only entry point the engine uses; adding a family means a new
module here and a new `adapter.method` value in the recipe schema.
"""

from __future__ import annotations

import torch

from shardtune.adapters import full, lora
from shardtune.errors import RecipeError

METHODS = {"lora": lora, "none": full}


def apply_adapter(model: torch.nn.Module, recipe, task) -> torch.nn.Module:
    return METHODS[recipe.adapter.method].apply(model, recipe, task)


def is_peft(recipe) -> bool:
    return recipe.adapter.method != "none"


def check_module_names(recipe, task) -> None:
    """Refuse target_modules / modules_to_save that name no module of the backbone.

    The model is built on the meta device from its config: no weights are read, so this
    costs the same for a 22 M and an 8 B model.
    """
    if recipe.adapter.method == "none":
        return
    from shardtune.backbone import meta_model

    model = meta_model(recipe, task)
    names = [name for name, _ in model.named_modules() if name]
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
    ad = recipe.adapter
    wanted = [("adapter.target_modules", t) for t in (ad.target_modules if isinstance(ad.target_modules, list) else [])]
    wanted += [("adapter.modules_to_save", t) for t in (ad.modules_to_save or [])]
    problems = [f"{field}: no module named '{target}' in {recipe.model.path}; linear layers there: "
                f"{', '.join(linear)}"
                for field, target in wanted
                if not any(n == target or n.endswith("." + target) for n in names)]
    if problems:
        raise RecipeError(problems)
