"""Small helpers shared by tests."""

from __future__ import annotations

from pathlib import Path

import yaml


def write_recipe(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def make_tiny_recipe(tiny_bert, sentiment_data, output_dir) -> dict:
    """The tiny model and data, 2 ZeRO-2 workers; the `tiny_recipe` fixture, for module fixtures."""
    return {
        "model": {"path": str(tiny_bert)},
        "adapter": {"method": "lora", "r": 8, "alpha": 16, "target_modules": ["query", "value"]},
        "task": {"type": "sequence_classification"},
        "data": {"train": str(sentiment_data["train"]), "validation_split": 0.2, "max_length": 32},
        "train": {"epochs": 3, "micro_batch_size": 8, "learning_rate": 2e-2, "warmup_ratio": 0.0,
                  "log_every_steps": 10},
        "sharding": {"zero_stage": 2},
        "cluster": {"workers": 2},
        "output": {"dir": str(output_dir)},
    }
