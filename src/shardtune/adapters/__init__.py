"""Adapter families, one module each, each registering itself (registry.py) with its recipe
section, rules and capabilities, as peft's methods do. A new family is a new module here
and its import below; the recipe's union, the compatibility table and the docs follow.

`apply_adapter` and `optimizer_groups` are what the engine uses. No torch at import time:
the recipe imports this package to build its adapter union.
"""

from __future__ import annotations

# Each module registers its family on import; this order is the docs' and the matrix's.
from shardtune.adapters import lora, ia3, prompt_tuning, prefix_tuning, p_tuning, frozen, full  # noqa: F401
from shardtune.adapters.registry import AdapterFamily, adapter_families, adapter_family  # noqa: F401
from shardtune.errors import RecipeError


def apply_adapter(model, recipe, task):
    return adapter_family(recipe.adapter.method).apply(model, recipe, task)


def is_peft(recipe) -> bool:
    """Whether the run saves only what trained (adapter/) rather than the whole model (model/)."""
    return adapter_family(recipe.adapter.method).saves == "adapter"


def optimizer_groups(model, recipe) -> list[dict]:
    """AdamW parameter groups: no weight decay on biases and norms (as in BERT and the HF
    Trainer), and LoRA+'s larger learning rate on the B matrices. Empty groups are left
    out: ZeRO-3 drops them, which would leave the scheduler with more groups than the
    optimizer."""
    tr = recipe.train
    lr_scale = adapter_family(recipe.adapter.method).lr_scale
    groups: dict[tuple[bool, float], list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        # Soft tokens are embeddings: decaying them pulls them away from the vocabulary's scale.
        decays = not (param.ndim < 2 or "norm" in name.lower() or name == "soft_tokens")
        scale = lr_scale(name, recipe) if lr_scale is not None else 1.0
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
    import torch

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
