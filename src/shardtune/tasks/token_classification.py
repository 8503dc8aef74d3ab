"""Token tagging (NER, POS): a tag per word, predicted at the word's first sub-token.

Rows carry `tokens` (a list of words) and `tags` (one tag per word, BIO for entities),
as the conll and wordtag readers produce, or as jsonl lists mapped with data.columns.
Sub-tokens after the first are ignored by the loss (-100) unless label_all_subtokens.
Metrics: entity-level precision/recall/F1 (seqeval, CoNLL's definition) and word accuracy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import Field, field_validator

from shardtune.data import Row
from shardtune.errors import DataError
from shardtune.metrics import tagging_metrics
from shardtune.schema import TaskBase
from shardtune.tasks.base import Example, label_head_config, readable
from shardtune.tasks.registry import Can, TaskKind, register_task

if TYPE_CHECKING:
    import torch


IGNORE = -100  # positions the loss skips (special tokens, non-first sub-tokens)


# ------------------------------------------------------------------- recipe section
class TokenClassificationSection(TaskBase):
    type: Literal["token_classification"]
    labels: list[str] | None = Field(
        None, description="tag names; default: the training data's tags (O first, then sorted)")
    label_all_subtokens: bool = Field(
        False, description="label every sub-token of a word (default: the first only, others ignored)")

    @field_validator("labels")
    @classmethod
    def _labels_distinct(cls, value):
        if value is not None and len(set(value)) != len(value):
            raise ValueError("labels must be distinct")
        return value


# ----------------------------------------------------------------------------- task
class TokenClassification:
    peft_task_type = "TOKEN_CLS"
    target_keys = ("labels",)

    def __init__(self, recipe):
        self.options = recipe.task
        self.max_length = recipe.data.max_length
        self.tokens_col = recipe.data.columns.get("tokens", "tokens")
        self.tags_col = recipe.data.columns.get("tags", "tags")
        self.labels: list[str] | None = list(self.options.labels) if self.options.labels else None

    # ----------------------------------------------------------------- labels & model
    def fit_labels(self, train_rows: list[Row]) -> None:
        if self.labels is not None:
            return
        found = {tag for _, tags in readable(train_rows, self._words_and_tags) for tag in tags}
        self.labels = (["O"] if "O" in found else []) + sorted(found - {"O"})
        if len(self.labels) < 2:
            raise DataError(f"the training data has only the tag(s) {self.labels}; tagging needs two or more")

    def build_model(self, model_path: str, load_kwargs: dict) -> torch.nn.Module:
        from transformers import AutoModelForTokenClassification

        return AutoModelForTokenClassification.from_pretrained(model_path, **self._head_config(), **load_kwargs)

    def build_model_from_config(self, config) -> torch.nn.Module:
        from transformers import AutoModelForTokenClassification

        for key, value in self._head_config().items():
            setattr(config, key, value)
        return AutoModelForTokenClassification.from_config(config)

    def head_modules(self, model: torch.nn.Module) -> list[str]:
        return [n for n in ("classifier", "score") if hasattr(model, n)]

    def _head_config(self) -> dict:
        return label_head_config(self.labels or ["O", "B"])  # placeholder labels: meta-device checks

    # ------------------------------------------------------------------------- data
    def encode(self, rows: list[Row], tokenizer, *, with_targets: bool = True) -> list[Example]:
        if not getattr(tokenizer, "is_fast", False):
            raise DataError("token tagging needs a fast (Rust) tokenizer to map sub-tokens to words")
        label_ids = {name: i for i, name in enumerate(self.labels or [])}
        words, tags = zip(*(self._words_and_tags(row, with_targets) for row in rows))
        encoded = tokenizer(list(words), is_split_into_words=True, truncation=True, max_length=self.max_length)
        examples = []
        for i, row in enumerate(rows):
            word_ids = encoded.word_ids(i)
            target = None
            if with_targets:
                for tag in tags[i]:
                    if tag not in label_ids:
                        raise DataError(f"{row.where}: tag '{tag}' is not one of the task's tags {self.labels}; "
                                        "fix the row or list it in task.labels")
                target, previous = [], None
                for word in word_ids:
                    first = word is not None and word != previous
                    keep = first or (word is not None and self.options.label_all_subtokens)
                    target.append(label_ids[tags[i][word]] if keep else IGNORE)
                    previous = word
            features = {k: encoded[k][i] for k in encoded.keys()}
            examples.append(Example(index=i, features=features, target=target,
                                    extra={"word_ids": word_ids, "n_words": len(words[i]),
                                           "tags": list(tags[i]) if with_targets else None}))
        return examples

    def augment(self, row: Row, augmenter) -> Row:
        """Entity words are never changed, moved or split; new words are tagged O."""
        words, tags = self._words_and_tags(row)
        protected = {i for i, tag in enumerate(tags) if tag != "O"}
        inside = {i for i, tag in enumerate(tags) if tag.startswith("I-")}
        new_words, sources = augmenter.words(words, protected, no_insert_before=inside)
        new_tags = [tags[s] if s is not None else "O" for s in sources]
        return Row({**row.values, self.tokens_col: new_words, self.tags_col: new_tags}, row.where)

    def collate(self, examples: list[Example], tokenizer) -> dict[str, torch.Tensor]:
        from transformers import DataCollatorForTokenClassification

        features = [dict(e.features) for e in examples]
        if examples and examples[0].target is not None:
            for feature, example in zip(features, examples):
                feature["labels"] = example.target
        return dict(DataCollatorForTokenClassification(tokenizer, return_tensors="pt")(features))

    # ---------------------------------------------------------------------- results
    def outputs(self, model_output, batch) -> list[np.ndarray]:
        logits = model_output.logits.float().cpu().numpy()
        lengths = batch["attention_mask"].sum(dim=1).tolist()  # right padding
        return [logits[i, :n] for i, n in enumerate(lengths)]

    def word_predictions(self, output: np.ndarray, example: Example) -> list[str]:
        """A tag per word: the argmax at its first sub-token; words cut off by max_length get O."""
        tags = ["O"] * example.extra["n_words"]
        previous = None
        for position, word in enumerate(example.extra["word_ids"]):
            if word is not None and word != previous:
                tags[word] = self.labels[int(output[position].argmax())]
            previous = word
        return tags

    def metrics(self, outputs: list[np.ndarray], examples: list[Example]) -> dict[str, float]:
        gold = [e.extra["tags"] for e in examples]
        predicted = [self.word_predictions(o, e) for o, e in zip(outputs, examples)]
        # Loss over the positions the training loss uses.
        logits = np.concatenate(outputs)
        targets = np.concatenate([np.array(e.target[: len(o)]) for o, e in zip(outputs, examples)])
        keep = targets != IGNORE
        return tagging_metrics(gold, predicted, logits[keep], targets[keep])

    def predictions(self, outputs: list[np.ndarray], examples: list[Example], rows: list[Row]) -> list[dict]:
        records = []
        for row, output, example in zip(rows, outputs, examples):
            words, tags = self._words_and_tags(row, False)
            record = {"tokens": words, "prediction": self.word_predictions(output, example)}
            if tags:
                record["tags"] = tags
            records.append(record)
        return records

    def report_tables(self, records: list[dict]) -> list:
        from shardtune.tasks.tables import tagging

        return tagging(records)

    def state(self) -> dict:
        return {"labels": self.labels}

    def load_state(self, state: dict) -> None:
        self.labels = list(state["labels"])

    def _words_and_tags(self, row: Row, need_tags: bool = True) -> tuple[list[str], list[str]]:
        words, tags = row.get(self.tokens_col), row.get(self.tags_col)
        if not isinstance(words, list) or not words or not all(isinstance(w, str) and w for w in words):
            raise DataError(f"{row.where}: '{self.tokens_col}' must be a non-empty list of words "
                            f"(columns: {sorted(row.values)}); map it with data.columns.tokens")
        if tags is None and not need_tags:
            return words, []
        if not isinstance(tags, list):
            raise DataError(f"{row.where}: no tag list in '{self.tags_col}'; map it with data.columns.tags")
        if len(tags) != len(words):
            raise DataError(f"{row.where}: {len(words)} words but {len(tags)} tags; tags must align one per word")
        return words, [str(t) for t in tags]


register_task(TaskKind(
    "token_classification", TokenClassificationSection, TokenClassification,
    "a tag per word (NER, POS): a linear head on each first sub-token, seqeval's entity F1",
    family="tagging", roles=frozenset({"tokens", "tags"}), formats=frozenset({"conll", "wordtag"}),
    capabilities=frozenset({Can.AUGMENT, Can.REPORT})))
