"""Adapter families, one module each (as in peft): each turns a backbone + task into the
model that trains.

`apply_adapter` and `optimizer_groups` are what the engine uses; adding a family means a
module here, a member of the recipe's adapter union, and its rules in compat.py.
"""

from __future__ import annotations

import torch

from shardtune.adapters import frozen, full, ia3, lora, p_tuning, prefix_tuning, prompt_tuning
from shardtune.errors import RecipeError

METHODS = {"lora": lora, "ia3": ia3, "prompt_tuning": prompt_tuning, "prefix_tuning": prefix_tuning,
           "p_tuning": p_tuning, "frozen": frozen, "none": full}
SOFT_PROMPT_METHODS = ("prompt_tuning", "prefix_tuning", "p_tuning")


def apply_adapter(model: torch.nn.Module, recipe, task) -> torch.nn.Module:
    return METHODS[recipe.adapter.method].apply(model, recipe, task)


def is_peft(recipe) -> bool:
    """Whether the run saves only what trained (adapter/) rather than the whole model (model/)."""
    return recipe.adapter.method != "none"


def optimizer_groups(model: torch.nn.Module, recipe) -> list[dict]:
    """AdamW parameter groups: no weight decay on biases and norms (as in BERT and the HF
    Trainer), and LoRA+'s larger learning rate on the B matrices. Empty groups are left
    out: ZeRO-3 drops them, which would leave the scheduler with more groups than the
    optimizer."""
    tr = recipe.train
    groups: dict[tuple[bool, float], list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        # Soft tokens are embeddings: decaying them pulls them away from the vocabulary's scale.
        decays = not (param.ndim < 2 or "norm" in name.lower() or name == "soft_tokens")
        scale = lora.learning_rate_scale(name, recipe) if recipe.adapter.method == "lora" else 1.0
        groups.setdefault((decays, scale), []).append(param)
    return [{"params": params, "weight_decay": tr.weight_decay if decays else 0.0, "lr": tr.learning_rate * scale}
            for (decays, scale), params in sorted(groups.items(), key=lambda g: (not g[0][0], g[0][1]))]


def check_module_names(recipe, task) -> None:
    """Refuse module names (target_modules, feedforward_modules, modules_to_save) that name
    no module of the backbone.

    The model is built on the meta device from its config: no weights are read, so this
    costs the same for a 22 M and an 8 B model.
    """
    ad = recipe.adapter
    wanted = [(f"adapter.{field}", name) for field in ("target_modules", "feedforward_modules", "modules_to_save")
              for name in (getattr(ad, field, None) if isinstance(getattr(ad, field, None), list) else [])]
    if not wanted:
        return
    from shardtune.backbone import meta_model

    model = meta_model(recipe, task)
    names = [name for name, _ in model.named_modules() if name]
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
    problems = [f"{field}: no module named '{target}' in {recipe.model.path}; linear layers there: "
                f"{', '.join(linear)}"
                for field, target in wanted
                if not any(n == target or n.endswith("." + target) for n in names)]
    if problems:
        raise RecipeError(problems)
