"""The shipped recipes: `shardtune recipes` lists them, `shardtune recipes cp NAME DEST`
copies one to edit (as torchtune's `tune ls` / `tune cp`). Read as plain YAML, not
validated: listing must not need the models or data the recipes name.
"""

from __future__ import annotations

import difflib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from shardtune.errors import RecipeError


@dataclass(frozen=True)
class Entry:
    name: str
    path: Path
    task: str
    model: str
    adapter: str
    data: str
    about: str  # the recipe's first comment line


def recipes_dir() -> Path:
    """$SHARDTUNE_RECIPES, else the checkout's recipes/ (shardtune installs editable from it)."""
    folder = Path(os.environ.get("SHARDTUNE_RECIPES") or Path(__file__).resolve().parents[2] / "recipes")
    if not folder.is_dir():
        raise RecipeError(f"the recipe catalogue '{folder}' is not there; set SHARDTUNE_RECIPES to the folder "
                          "that holds shardtune's recipes/")
    return folder


def entries() -> list[Entry]:
    from shardtune.recipe import load_raw

    found = []
    for path in sorted(recipes_dir().glob("*.yaml")):
        raw = load_raw(path)
        adapter = (raw.get("adapter") or {}).get("method", "lora")
        quantized = (raw.get("quantization") or {}).get("mode", "none")
        train = (raw.get("data") or {}).get("train", "?")
        found.append(Entry(path.stem, path, (raw.get("task") or {}).get("type", "sequence_classification"),
                           str((raw.get("model") or {}).get("path", "?")).removeprefix("package:"),
                           adapter + ("" if quantized == "none" else f" on {quantized}"),
                           str(train.get("path", "?") if isinstance(train, dict) else train).removeprefix("package:"),
                           _about(path)))
    return found


def find(name: str) -> Entry:
    known = {e.name: e for e in entries()}
    stem = Path(name).stem if name.endswith((".yaml", ".yml")) else name
    if stem not in known:
        close = difflib.get_close_matches(stem, known, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise RecipeError(f"no shipped recipe is named '{name}'; {hint}`shardtune recipes` lists them")
    return known[stem]


def copy(name: str, destination: Path) -> Path:
    """Copy a shipped recipe to a new file (or into an existing folder); never overwrite."""
    entry = find(name)
    target = destination / entry.path.name if destination.is_dir() else destination
    if target.suffix not in (".yaml", ".yml"):
        raise RecipeError(f"'{destination}': a recipe is a .yaml file; give a file name ending in .yaml or a folder")
    if target.exists():
        raise RecipeError(f"'{target}' already exists; choose another name (shardtune never overwrites it)")
    if not target.parent.is_dir():
        raise RecipeError(f"'{target.parent}' is not a folder; create it first or choose another destination")
    partial = target.with_name(target.name + ".partial")
    shutil.copyfile(entry.path, partial)
    partial.replace(target)
    return target


def _about(path: Path) -> str:
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
        if line.strip():
            break
    return ""
