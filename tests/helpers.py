"""Small helpers shared by tests."""

from __future__ import annotations

from pathlib import Path

import yaml


def write_recipe(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path
