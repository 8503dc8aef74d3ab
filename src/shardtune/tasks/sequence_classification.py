"""Single-text (and text-pair) classification with a linear head on the encoder.

Columns (data.columns maps these roles to the file's columns):
  text   the input text                         (default column: text)
  text_b an optional second text for pair tasks (paraphrase, NLI); encoded as a pair
  label  the class label                        (default column: label)
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding

from shardtune.data import Row
from shardtune.errors import DataError
from shardtune.metrics import classification_metrics, softmax
from shardtune.tasks.base import Example


class SequenceClassification:
    peft_task_type = "SEQ_CLS"

    def __init__(self, recipe):
        self.options = recipe.task
        self.max_length = recipe.data.max_length
        columns = recipe.data.columns
        self.text_col = columns.get("text", "text")
        self.text_b_col = columns.get("text_b")
        self.label_col = columns.get("label", "label")
        self.labels: list[str] | None = list(self.options.labels) if self.options.labels else None

    # ----------------------------------------------------------------- labels & model
    def fit_labels(self, train_rows: list[Row]) -> None:
        if self.labels is not None:
            return
        found = {self._raw_label(row) for row in train_rows}
        if len(found) < 2:
            raise DataError(f"the training data has {len(found)} distinct label(s) in column "
                            f"'{self.label_col}'; classification needs at least two")
        self.labels = sorted(found, key=_natural_key)

    def build_model(self, model_path: str, load_kwargs: dict) -> torch.nn.Module:
        return AutoModelForSequenceClassification.from_pretrained(
            model_path, num_labels=len(self.labels),
            id2label=dict(enumerate(self.labels)), label2id={l: i for i, l in enumerate(self.labels)},
            **load_kwargs)

    def build_model_from_config(self, config) -> torch.nn.Module:
        config.num_labels = len(self.labels) if self.labels else 2
        return AutoModelForSequenceClassification.from_config(config)

    def head_modules(self, model: torch.nn.Module) -> list[str]:
        names = [n for n in ("classifier", "score") if hasattr(model, n)]
        base = getattr(model, getattr(model, "base_model_prefix", ""), None)
        if self.options.train_pooler and getattr(base, "pooler", None) is not None:
            # Sentence encoders (e.g. all-MiniLM) ship a pooler that was never trained for
            # classification; leaving it frozen costs ~0.4 Pearson on STS-B.
            names.append("pooler")
        return names

    # ------------------------------------------------------------------------- data
    def encode(self, rows: list[Row], tokenizer, *, with_targets: bool = True) -> list[Example]:
        label_ids = {name: i for i, name in enumerate(self.labels or [])}
        texts, texts_b, targets = [], [], []
        for row in rows:
            texts.append(self._text(row, self.text_col))
            if self.text_b_col:
                texts_b.append(self._text(row, self.text_b_col))
            if with_targets:
                label = self._raw_label(row)
                if label not in label_ids:
                    raise DataError(f"{row.where}: label '{label}' is not one of the task's labels "
                                    f"{self.labels}; fix the row or list it in task.labels")
                targets.append(label_ids[label])
        encoded = tokenizer(texts, texts_b if self.text_b_col else None,
                            truncation=True, max_length=self.max_length)
        return [
            Example(index=i, features={k: encoded[k][i] for k in encoded.keys()},
                    target=targets[i] if with_targets else None)
            for i in range(len(rows))
        ]

    def collate(self, examples: list[Example], tokenizer) -> dict[str, torch.Tensor]:
        batch = DataCollatorWithPadding(tokenizer, return_tensors="pt")([e.features for e in examples])
        if examples and examples[0].target is not None:
            batch["labels"] = torch.tensor([e.target for e in examples], dtype=torch.long)
        return dict(batch)

    # ---------------------------------------------------------------------- results
    def metrics(self, outputs: np.ndarray, examples: list[Example]) -> dict[str, float]:
        return classification_metrics(outputs, np.array([e.target for e in examples]))

    def predictions(self, outputs: np.ndarray, examples: list[Example], rows: list[Row]) -> list[dict]:
        probabilities = softmax(outputs.astype(np.float64))
        records = []
        for row, probs in zip(rows, probabilities):
            record = {"text": row.get(self.text_col)}
            if self.text_b_col:
                record["text_b"] = row.get(self.text_b_col)
            if row.get(self.label_col) is not None:
                record["label"] = self._raw_label(row)
            record["prediction"] = self.labels[int(probs.argmax())]
            record["probabilities"] = {l: round(float(p), 6) for l, p in zip(self.labels, probs)}
            records.append(record)
        return records

    def state(self) -> dict:
        return {"labels": self.labels}

    def load_state(self, state: dict) -> None:
        self.labels = list(state["labels"])

    # ---------------------------------------------------------------------- helpers
    def _text(self, row: Row, column: str) -> str:
        value = row.get(column)
        if value is None:
            raise DataError(f"{row.where}: no column '{column}' (columns: {sorted(row.values)}); "
                            f"map it with data.columns")
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"{row.where}: column '{column}' is empty or not text")
        return value

    def _raw_label(self, row: Row) -> str:
        value = row.get(self.label_col)
        if value is None or (isinstance(value, str) and not value.strip()):
            raise DataError(f"{row.where}: no label in column '{self.label_col}' "
                            f"(columns: {sorted(row.values)}); map it with data.columns.label")
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        return str(value).strip()


def _natural_key(label: str):
    """Numeric labels sort as numbers ("2" < "10"), others alphabetically."""
    return (0, float(label), "") if label.lstrip("-").replace(".", "", 1).isdigit() else (1, 0.0, label)
