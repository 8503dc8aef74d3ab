"""A frozen backbone with no adapter: only a prompt template's {soft} tokens train (they
belong to the prompt model, prompting/model.py). The soft-prompt training mode with a
hand-written or learned template and nothing else trained."""

from __future__ import annotations

import torch


def apply(model: torch.nn.Module, recipe, task) -> torch.nn.Module:
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model
