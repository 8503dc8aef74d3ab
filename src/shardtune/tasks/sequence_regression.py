"""Text (or text-pair) regression: one output, mean-squared error (STS-B similarity 0-5).

Columns: text, optional text_b, label (a number).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import Field

from shardtune.data import Row
from shardtune.errors import DataError
from shardtune.metrics import regression_metrics
from shardtune.schema import TaskBase
from shardtune.tasks.base import Example
from shardtune.tasks.registry import Can, TaskKind, register_task
from shardtune.tasks.sequence_classification import encoder_head_modules
from shardtune.tasks.text_inputs import TextInputs

if TYPE_CHECKING:
    import torch


# ------------------------------------------------------------------- recipe section
class SequenceRegressionSection(TaskBase):
    type: Literal["sequence_regression"]
    train_pooler: bool = Field(True, description="train the encoder's pooler with the head")


# ----------------------------------------------------------------------------- task
class SequenceRegression:
    peft_task_type = "SEQ_CLS"
    target_keys = ("labels",)

    def __init__(self, recipe):
        self.options = recipe.task
        self.inputs = TextInputs(recipe.data.columns, recipe.data.max_length)
        self.label_col = recipe.data.columns.get("label", "label")

    def fit_labels(self, train_rows: list[Row]) -> None:
        pass  # a regression target has no label set

    def build_model(self, model_path: str, load_kwargs: dict) -> torch.nn.Module:
        # problem_type=regression makes the HF head compute MSE on a single output.
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification.from_pretrained(
            model_path, num_labels=1, problem_type="regression", **load_kwargs)

    def build_model_from_config(self, config) -> torch.nn.Module:
        from transformers import AutoModelForSequenceClassification

        config.num_labels, config.problem_type = 1, "regression"
        return AutoModelForSequenceClassification.from_config(config)

    def head_modules(self, model: torch.nn.Module) -> list[str]:
        return encoder_head_modules(model, self.options.train_pooler)

    def encode(self, rows: list[Row], tokenizer, *, with_targets: bool = True) -> list[Example]:
        targets = [self._target(row) for row in rows] if with_targets else [None] * len(rows)
        return [Example(index=i, features=f, target=t)
                for i, (f, t) in enumerate(zip(self.inputs.encode(rows, tokenizer), targets))]

    def collate(self, examples: list[Example], tokenizer) -> dict[str, torch.Tensor]:
        import torch

        return self.inputs.collate(examples, tokenizer, torch.float32)

    def augment(self, row: Row, augmenter) -> Row:
        return self.inputs.augment(row, augmenter)

    def outputs(self, model_output, batch) -> list[np.ndarray]:
        return list(model_output.logits.float().cpu().numpy())

    def metrics(self, outputs: list[np.ndarray], examples: list[Example]) -> dict[str, float]:
        return regression_metrics(np.stack(outputs)[:, 0], np.array([e.target for e in examples]))

    def predictions(self, outputs: list[np.ndarray], examples: list[Example], rows: list[Row]) -> list[dict]:
        records = []
        for row, out in zip(rows, outputs):
            record = self.inputs.record(row)
            if row.get(self.label_col) not in (None, ""):
                record["label"] = self._target(row)
            record["prediction"] = round(float(out[0]), 6)
            records.append(record)
        return records

    def state(self) -> dict:
        return {}

    def load_state(self, state: dict) -> None:
        pass

    def _target(self, row: Row) -> float:
        value = row.get(self.label_col)
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise DataError(f"{row.where}: label {value!r} in column '{self.label_col}' is not a number; "
                            "regression needs a numeric target") from None
        if not math.isfinite(number):
            raise DataError(f"{row.where}: label {value!r} is not a finite number")
        return number


register_task(TaskKind(
    "sequence_regression", SequenceRegressionSection, SequenceRegression,
    "text or text-pair regression: one output, mean-squared error (STS-B)",
    family="classification", roles=frozenset({"text", "text_b", "label"}), capabilities=frozenset({Can.AUGMENT})))
