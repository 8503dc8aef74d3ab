"""Reading one text (or a text pair) per row, shared by the sequence-level tasks."""

from __future__ import annotations

from typing import TYPE_CHECKING

from shardtune.data import Row
from shardtune.errors import DataError

if TYPE_CHECKING:
    import torch


class TextInputs:
    """The `text` and optional `text_b` columns of a row, validated and tokenised."""

    def __init__(self, columns: dict[str, str], max_length: int):
        self.text_col = columns.get("text", "text")
        self.text_b_col = columns.get("text_b")
        self.max_length = max_length

    def encode(self, rows: list[Row], tokenizer) -> list[dict[str, list[int]]]:
        texts = [self.text(row, self.text_col) for row in rows]
        texts_b = [self.text(row, self.text_b_col) for row in rows] if self.text_b_col else None
        # A pair goes through the tokenizer's pair encoding ([CLS] a [SEP] b [SEP] for BERT).
        encoded = tokenizer(texts, texts_b, truncation=True, max_length=self.max_length)
        return [{k: encoded[k][i] for k in encoded.keys()} for i in range(len(rows))]

    @staticmethod
    def collate(examples, tokenizer, target_dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Pad to the longest example; targets (class ids or scores) become `labels`."""
        import torch
        from transformers import DataCollatorWithPadding

        batch = DataCollatorWithPadding(tokenizer, return_tensors="pt")([e.features for e in examples])
        if examples and examples[0].target is not None:
            batch["labels"] = torch.tensor([e.target for e in examples], dtype=target_dtype)
        return dict(batch)

    def augment(self, row: Row, augmenter) -> Row:
        values = dict(row.values)
        for column in filter(None, (self.text_col, self.text_b_col)):
            if isinstance(values.get(column), str) and values[column].strip():
                values[column] = augmenter.text(values[column])
        return Row(values, row.where)

    def record(self, row: Row) -> dict:
        """The inputs as they appear in a prediction record."""
        record = {"text": row.get(self.text_col)}
        if self.text_b_col:
            record["text_b"] = row.get(self.text_b_col)
        return record

    @staticmethod
    def text(row: Row, column: str) -> str:
        value = row.get(column)
        if value is None:
            raise DataError(f"{row.where}: no column '{column}' (columns: {sorted(row.values)}); "
                            f"map it with data.columns")
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"{row.where}: column '{column}' is empty or not text")
        return value
