"""The recipe's data section: where the rows come from and how they are read. Beside the
readers that use it (and outside the recipe package), so that the task plug-ins, which
read rows, never import the recipe that imports them."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from shardtune.schema import Section


DATA_FORMATS = ("jsonl", "json", "csv", "tsv", "parquet", "textdir", "conll", "wordtag", "squad")
_SUFFIX_FORMATS = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet"}


class DataSource(Section):
    path: str = Field(description="file (or folder, for textdir) path or package:NAME/PATH")
    format: Literal["jsonl", "json", "csv", "tsv", "parquet", "textdir", "conll", "wordtag", "squad"] | None = Field(
        None, description="file format; default: from the file suffix. parquet: a column per field (as `datasets` "
                          "and the hub store data sets); textdir: one sub-folder per label, "
                          "one text file per example; conll: token<TAB>...<TAB>tag lines, blank line between "
                          "sentences; wordtag: a sentence a line of word###TAG; squad: SQuAD 1.1/2.0 json")
    header: bool = Field(True, description="csv/tsv: the first row names the columns")
    column_names: list[str] | None = Field(None, description="csv/tsv without header: the column names")
    token_prefix: str | None = Field(None, description="conll: strip this prefix from tokens (WikiANN's 'en:')")

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value):
        return {"path": value} if isinstance(value, str) else value

    @property
    def resolved_format(self) -> str:
        if self.format:
            return self.format
        return _SUFFIX_FORMATS.get(Path(self.path).suffix.lower(), "")


class AugmentSection(Section):
    probability: float = Field(0.5, gt=0, le=1, description="share of training examples augmented, drawn anew each epoch")
    synonym_replace: float = Field(0.1, ge=0, le=1, description="chance that each word becomes a WordNet synonym")
    random_insert: float = Field(0.0, ge=0, le=1, description="insert rate x words synonyms of words at random places")
    random_swap: float = Field(0.0, ge=0, le=1, description="swap rate x words pairs of words")
    random_delete: float = Field(0.0, ge=0, lt=1, description="chance that each word is dropped")
    sentence_shuffle: float = Field(0.0, ge=0, le=1, description="chance that a text's sentences are reordered")


class DataSection(Section):
    train: DataSource = Field(description="training data")
    validation: DataSource | None = Field(None, description="validation data; default: split from train")
    validation_split: float = Field(0.1, gt=0, lt=1, description="fraction of train held out when no validation file")
    columns: dict[str, str] = Field(
        default_factory=dict, description="task role -> column name, e.g. {text: sentence, label: label}")
    max_length: int = Field(128, ge=8, le=32768, description="tokens per example after truncation")
    max_chars: int = Field(1_000_000, ge=1, description="a text field longer than this is a bad row (it would be "
                                                        "tokenised for minutes only to be truncated)")
    max_train_examples: int | None = Field(None, ge=1, description="use a seeded sample of this many training rows")
    max_eval_examples: int | None = Field(None, ge=1, description="use a seeded sample of this many validation rows")
    few_shot_per_class: int | None = Field(
        None, ge=1, description="few-shot: train on a seeded draw of this many rows per label (classification)")
    augment: AugmentSection | None = Field(
        None, description="augment training examples on the fly (label-preserving for tagging and QA)")
    cache: bool = Field(True, description="cache the encoded examples in Arrow (SHARDTUNE_CACHE/data): the "
                        "driver tokenises once, workers memory-map it, a second run on the same data reuses it")
    on_bad_row: Literal["error", "skip"] = Field(
        "error", description="a row that does not fit the task: stop with its file and line (error), "
        "or leave it out and report the count (skip)")
