"""Full fine-tuning: no adapter, every weight trains. The baseline adapters are judged by."""

from __future__ import annotations

import torch


def apply(model: torch.nn.Module, recipe, task) -> torch.nn.Module:
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    return model
