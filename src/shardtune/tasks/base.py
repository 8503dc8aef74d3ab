"""The interface every task implements. Structural (a Protocol), not a base class."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from shardtune.data import Row


@dataclass
class Example:
    """One tokenised example. `index` identifies it across ranks when predictions are gathered."""

    index: int
    features: dict[str, list[int]]
    target: Any = None  # what the metrics compare with (a label id, a score, spans...)
    extra: dict = field(default_factory=dict)


def readable(rows: list[Row], read) -> list:
    """`read(row)` for the rows it can read. Label fitting uses this: a row whose label is
    unreadable is reported (or skipped) by `encode`, which names the row."""
    from shardtune.errors import DataError

    values = []
    for row in rows:
        try:
            values.append(read(row))
        except DataError:
            pass
    return values


def read_label(row: Row, column: str) -> str:
    """A row's class label as text (a float like 1.0 read as "1"); DataError naming the row."""
    from shardtune.errors import DataError

    value = row.get(column)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise DataError(f"{row.where}: no label in column '{column}' (columns: {sorted(row.values)}); "
                        "map it with data.columns.label")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


def class_labels(rows: list[Row], read, column: str) -> list[str]:
    """The distinct labels of the training rows, numbers in numeric order ("2" < "10")."""
    from shardtune.errors import DataError

    found = set(readable(rows, read))
    if len(found) < 2:
        raise DataError(f"the training data has {len(found)} distinct label(s) in column '{column}'; "
                        "classification needs at least two")
    return sorted(found, key=lambda label: (0, float(label), "") if label.lstrip("-").replace(".", "", 1).isdigit()
                  else (1, 0.0, label))


def label_head_config(labels: list[str]) -> dict:
    """The from_pretrained/config arguments of a head with one output per label."""
    return {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
            "label2id": {label: i for i, label in enumerate(labels)}}


class Task(Protocol):
    """What every task has. Optional hooks, looked up with hasattr where they are used:
    row_label(row) (few-shot draws; classification tasks), check(tokenizer) (rules that need
    the tokenizer, run in preflight), fit_verbalizer(...) (before the adapter is applied),
    wrap(model, tokenizer, saved=None) (a module around the adapted model: prompt tasks),
    before_forward(model, tokenizer, device) (once before each evaluation pass)."""

    #: peft TaskType name: decides which wrapper peft puts around the backbone
    peft_task_type: str

    def __init__(self, recipe) -> None: ...

    def fit_labels(self, train_rows: list[Row]) -> None:
        """Fix the label set (from the recipe, else from the training rows)."""

    def build_model(self, model_path: str, load_kwargs: dict) -> torch.nn.Module:
        """The backbone with this task's head, freshly initialised where new."""

    def build_model_from_config(self, config) -> torch.nn.Module:
        """The same architecture from a config alone (used on the meta device for checks)."""

    def head_modules(self, model: torch.nn.Module) -> list[str]:
        """Module names that train in full and are saved with an adapter."""

    def encode(self, rows: list[Row], tokenizer, *, with_targets: bool = True) -> list[Example]:
        """Validate and tokenise rows; raise DataError naming the row on bad input."""

    def augment(self, row: Row, augmenter) -> Row:
        """A label-preserving variant of a training row (data.augment); optional."""

    def collate(self, examples: list[Example], tokenizer) -> dict[str, torch.Tensor]:
        """A padded batch the model's forward accepts (with `labels` when targets exist)."""

    def metrics(self, outputs: np.ndarray, examples: list[Example]) -> dict[str, float]:
        """Validation loss and task metrics from the gathered outputs (one row per example)."""

    def predictions(self, outputs: np.ndarray, examples: list[Example], rows: list[Row]) -> list[dict]:
        """One JSON-serialisable record per input row."""

    def state(self) -> dict:
        """What must be saved with a run to rebuild the task (label names, ...)."""

    def load_state(self, state: dict) -> None: ...
