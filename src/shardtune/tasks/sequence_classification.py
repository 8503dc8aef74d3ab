"""Single-text (and text-pair) classification with a linear head on the encoder.

Columns (data.columns maps these roles to the file's columns):
  text   the input text                         (default column: text)
  text_b an optional second text for pair tasks (paraphrase, NLI); encoded as a pair
  label  the class label                        (default column: label)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import Field, field_validator

from shardtune.data import Row
from shardtune.errors import DataError
from shardtune.metrics import classification_metrics, softmax
from shardtune.schema import TaskBase
from shardtune.tasks.base import Example, class_labels, label_head_config, read_label
from shardtune.tasks.registry import Can, TaskKind, register_task
from shardtune.tasks.text_inputs import TextInputs

if TYPE_CHECKING:
    import torch


def encoder_head_modules(model: torch.nn.Module, train_pooler: bool) -> list[str]:
    """The sequence head, plus BERT's pooler when asked: sentence encoders (all-MiniLM)
    ship a pooler never trained for classification; frozen, it costs ~0.4 STS-B Pearson."""
    names = [n for n in ("classifier", "score") if hasattr(model, n)]
    base = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if train_pooler and getattr(getattr(base, "pooler", None), "dense", None) is not None:
        # The pooler's weights are its dense layer; naming the layer (not the pooler) keeps
        # peft's merge working for IA3, which expects a weight on every module it saves.
        names.append("pooler.dense")
    return names


# ------------------------------------------------------------------- recipe section
class SequenceClassificationSection(TaskBase):
    type: Literal["sequence_classification"] = "sequence_classification"
    labels: list[str] | None = Field(
        None, description="label names in order; default: the sorted distinct labels of the training data")
    train_pooler: bool = Field(
        True, description="train the encoder's pooler with the head (BERT-style models); "
                          "sentence encoders ship an untrained pooler")

    @field_validator("labels")
    @classmethod
    def _labels_distinct(cls, value):
        if value is not None:
            if len(value) < 2:
                raise ValueError("needs at least two labels")
            if len(set(value)) != len(value):
                raise ValueError("labels must be distinct")
        return value


# ----------------------------------------------------------------------------- task
class SequenceClassification:
    peft_task_type = "SEQ_CLS"
    target_keys = ("labels",)

    def __init__(self, recipe):
        self.options = recipe.task
        self.inputs = TextInputs(recipe.data.columns, recipe.data.max_length)
        self.label_col = recipe.data.columns.get("label", "label")
        self.labels: list[str] | None = list(self.options.labels) if self.options.labels else None

    # ----------------------------------------------------------------- labels & model
    def fit_labels(self, train_rows: list[Row]) -> None:
        if self.labels is not None:
            return
        self.labels = class_labels(train_rows, self.row_label, self.label_col)

    def build_model(self, model_path: str, load_kwargs: dict) -> torch.nn.Module:
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification.from_pretrained(model_path, **self._head_config(), **load_kwargs)

    def build_model_from_config(self, config) -> torch.nn.Module:
        from transformers import AutoModelForSequenceClassification

        for key, value in self._head_config().items():
            setattr(config, key, value)
        return AutoModelForSequenceClassification.from_config(config)

    def head_modules(self, model: torch.nn.Module) -> list[str]:
        return encoder_head_modules(model, self.options.train_pooler)

    def _head_config(self) -> dict:
        return label_head_config(self.labels or ["0", "1"])  # placeholder labels: meta-device checks

    # ------------------------------------------------------------------------- data
    def encode(self, rows: list[Row], tokenizer, *, with_targets: bool = True) -> list[Example]:
        label_ids = {name: i for i, name in enumerate(self.labels or [])}
        targets = []
        if with_targets:
            for row in rows:
                label = self.row_label(row)
                if label not in label_ids:
                    raise DataError(f"{row.where}: label '{label}' is not one of the task's labels "
                                    f"{self.labels}; fix the row or list it in task.labels")
                targets.append(label_ids[label])
        features = self.inputs.encode(rows, tokenizer)
        return [Example(index=i, features=f, target=targets[i] if with_targets else None)
                for i, f in enumerate(features)]

    def collate(self, examples: list[Example], tokenizer) -> dict[str, torch.Tensor]:
        import torch

        return self.inputs.collate(examples, tokenizer, torch.long)

    def augment(self, row: Row, augmenter) -> Row:
        return self.inputs.augment(row, augmenter)

    # ---------------------------------------------------------------------- results
    def outputs(self, model_output, batch) -> list[np.ndarray]:
        return list(model_output.logits.float().cpu().numpy())

    def metrics(self, outputs: list[np.ndarray], examples: list[Example]) -> dict[str, float]:
        return classification_metrics(np.stack(outputs), np.array([e.target for e in examples]))

    def predictions(self, outputs: list[np.ndarray], examples: list[Example], rows: list[Row]) -> list[dict]:
        records = []
        for row, probs in zip(rows, softmax(np.stack(outputs).astype(np.float64))):
            record = self.inputs.record(row)
            if row.get(self.label_col) is not None:
                record["label"] = self.row_label(row)
            record["prediction"] = self.labels[int(probs.argmax())]
            record["probabilities"] = {l: round(float(p), 6) for l, p in zip(self.labels, probs)}
            records.append(record)
        return records

    def report_tables(self, records: list[dict]) -> list:
        from shardtune.tasks.tables import classification

        return classification(self.labels, records)

    def state(self) -> dict:
        return {"labels": self.labels}

    def load_state(self, state: dict) -> None:
        self.labels = list(state["labels"])

    def row_label(self, row: Row) -> str:
        return read_label(row, self.label_col)


register_task(TaskKind(
    "sequence_classification", SequenceClassificationSection, SequenceClassification,
    "single-text or text-pair classification with a linear head on the encoder (SST-2, CoLA, MRPC, NLI)",
    family="classification", roles=frozenset({"text", "text_b", "label"}), formats=frozenset({"textdir"}),
    capabilities=frozenset({Can.CLASS_LABELS, Can.AUGMENT, Can.REPORT})))
