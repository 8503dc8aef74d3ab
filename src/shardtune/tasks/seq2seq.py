"""Text-to-text tuning of an encoder-decoder (T5-style): a source text in, a target text out.

Columns (data.columns maps these roles to the file's columns):
  source  the input text; task.source_prefix is put before it (T5's "sst2 sentence: ")
  target  the text to produce; task.target_map turns a label column into words
Training is teacher-forced (the decoder reads the target shifted right; cross-entropy on
every target token). Evaluation generates from the source and compares texts: exact match,
ROUGE-L (Google's rouge-score) and corpus BLEU (sacreBLEU), with the teacher-forced loss.
`predict` and `generate` generate.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import Field

from shardtune.data import Row
from shardtune.errors import DataError
from shardtune.schema import TaskBase
from shardtune.tasks.base import Example, mapped_text, no_grad, token_nll
from shardtune.tasks.registry import Can, TaskKind, register_task

if TYPE_CHECKING:
    import torch

IGNORE = -100


# ------------------------------------------------------------------- recipe section
class Seq2SeqSection(TaskBase):
    type: Literal["seq2seq"]
    source_prefix: str = Field("", description="text put before every source, T5-style (e.g. 'summarize: ')")
    target_map: dict[str, str] | None = Field(
        None, description="target column value -> target text, e.g. {'0': negative, '1': positive}: "
                          "turns a labelled data set into text-to-text data")
    max_target_length: int = Field(64, ge=1, le=32768, description="target tokens kept for training")
    max_new_tokens: int = Field(64, ge=1, description="tokens generated at evaluation and by predict/generate")
    num_beams: int = Field(1, ge=1, le=64, description="beam search width when generating (1: greedy)")


# ----------------------------------------------------------------------------- task
class Seq2Seq:
    peft_task_type = "SEQ_2_SEQ_LM"
    target_keys = ("labels",)

    def __init__(self, recipe):
        self.options = recipe.task
        self.max_length = recipe.data.max_length
        self.source_col = recipe.data.columns.get("source", "source")
        self.target_col = recipe.data.columns.get("target", "target")

    def fit_labels(self, train_rows: list[Row]) -> None:
        pass  # free text: no label set

    def build_model(self, model_path: str, load_kwargs: dict) -> torch.nn.Module:
        from transformers import AutoModelForSeq2SeqLM

        return AutoModelForSeq2SeqLM.from_pretrained(model_path, **load_kwargs)

    def build_model_from_config(self, config) -> torch.nn.Module:
        from transformers import AutoModelForSeq2SeqLM

        return AutoModelForSeq2SeqLM.from_config(config)

    def head_modules(self, model: torch.nn.Module) -> list[str]:
        return []  # the LM head is pretrained

    # ------------------------------------------------------------------------- data
    def encode(self, rows: list[Row], tokenizer, *, with_targets: bool = True) -> list[Example]:
        sources = [self.options.source_prefix + self._text(row, self.source_col, "source") for row in rows]
        encoded = tokenizer(sources, truncation=True, max_length=self.max_length)
        examples = []
        for i, row in enumerate(rows):
            features = {"input_ids": encoded["input_ids"][i], "attention_mask": encoded["attention_mask"][i]}
            target = None
            if with_targets:
                target = self.target_text(row)
                labels = tokenizer(text_target=target, truncation=True,
                                   max_length=self.options.max_target_length)["input_ids"]
                if tokenizer.eos_token_id is not None and labels[-1:] != [tokenizer.eos_token_id]:
                    # Generation stops at EOS only if training taught it to end there.
                    labels = labels[: self.options.max_target_length - 1] + [tokenizer.eos_token_id]
                features["labels"] = labels
            examples.append(Example(index=i, features=features, target=target))
        return examples

    def target_text(self, row: Row) -> str:
        if self.options.target_map is None:
            return self._text(row, self.target_col, "target")
        return mapped_text(row, self.target_col, self.options.target_map, "target_map", "target")

    def collate(self, examples: list[Example], tokenizer) -> dict[str, torch.Tensor]:
        import torch

        longest = max(len(e.features["input_ids"]) for e in examples)
        batch = {"input_ids": [e.features["input_ids"] + [tokenizer.pad_token_id] * (longest - len(e.features["input_ids"]))
                               for e in examples],
                 "attention_mask": [[1] * len(e.features["input_ids"]) + [0] * (longest - len(e.features["input_ids"]))
                                    for e in examples]}
        if "labels" in examples[0].features:
            longest_target = max(len(e.features["labels"]) for e in examples)
            batch["labels"] = [e.features["labels"] + [IGNORE] * (longest_target - len(e.features["labels"]))
                               for e in examples]
        return {key: torch.tensor(value) for key, value in batch.items()}

    # ---------------------------------------------------------------------- results
    def outputs(self, model_output, batch) -> list[dict]:
        """Per example: the summed negative log-likelihood of its target tokens and their count."""
        labels = batch["labels"].to(model_output.logits.device)
        nll = token_nll(model_output.logits, labels, IGNORE)
        counted = (labels != IGNORE).sum(dim=1)
        return [{"nll": float(n), "tokens": int(c)} for n, c in zip(nll.sum(dim=1).cpu(), counted.cpu())]

    @no_grad
    def eval_outputs(self, model, batch: dict, tokenizer) -> list[dict]:
        """The teacher-forced loss and the generated text of every example in the batch."""
        outputs = self.outputs(model(**batch), batch) if "labels" in batch else [{} for _ in batch["input_ids"]]
        for output, text in zip(outputs, self._generate(model, tokenizer, batch["input_ids"], batch["attention_mask"])):
            output["text"] = text
        return outputs

    def _generate(self, model, tokenizer, input_ids, attention_mask, max_new_tokens: int | None = None) -> list[str]:
        import torch.distributed as dist

        # Every rank must run the same number of forwards under ZeRO-3 (each gathers the
        # partitioned weights with the others): synced_gpus keeps a finished rank stepping.
        synced = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        generated = model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                   max_new_tokens=max_new_tokens or self.options.max_new_tokens,
                                   num_beams=self.options.num_beams, do_sample=False, synced_gpus=synced,
                                   pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        return [text.strip() for text in tokenizer.batch_decode(generated, skip_special_tokens=True)]

    def metrics(self, outputs: list[dict], examples: list[Example]) -> dict[str, float]:
        import sacrebleu
        from rouge_score import rouge_scorer

        predictions, targets = [o["text"] for o in outputs], [e.target for e in examples]
        tokens = sum(o["tokens"] for o in outputs)
        loss = sum(o["nll"] for o in outputs) / max(tokens, 1)
        scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
        rouge = [scorer.score(t, p)["rougeL"].fmeasure for t, p in zip(targets, predictions)]
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)),
                "exact_match": float(np.mean([_normal(p) == _normal(t) for p, t in zip(predictions, targets)])),
                "rougeL": float(np.mean(rouge)),
                # Effective order: n-gram orders that no text is long enough for are left out,
                # so one-word targets (labels as words) score 100 when right, not 0.
                "sacrebleu": float(sacrebleu.corpus_bleu(predictions, [targets], use_effective_order=True).score)}

    def predictions(self, outputs: list[dict], examples: list[Example], rows: list[Row]) -> list[dict]:
        records = []
        for row, output in zip(rows, outputs):
            record = {"source": row.get(self.source_col), "prediction": output["text"]}
            if row.get(self.target_col) is not None:
                record["target"] = self.target_text(row)
            records.append(record)
        return records

    # -------------------------------------------------------------------- generation
    def prompt_row(self, text: str, where: str) -> Row:
        return Row({self.source_col: text}, where)

    @no_grad
    def generate(self, model, tokenizer, rows: list[Row], *, batch_size: int = 8,
                 max_new_tokens: int | None = None) -> list[dict]:
        model.eval()
        records = []
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            batch = self.collate(self.encode(chunk, tokenizer, with_targets=False), tokenizer)
            device = next(model.parameters()).device
            texts = self._generate(model, tokenizer, batch["input_ids"].to(device), batch["attention_mask"].to(device),
                                   max_new_tokens)
            for row, text in zip(chunk, texts):
                record = {"prompt": self.options.source_prefix + str(row.get(self.source_col)), "prediction": text}
                if row.get(self.target_col) is not None:
                    record["target"] = self.target_text(row)
                records.append(record)
        return records

    def report_tables(self, records: list[dict]) -> list:
        from shardtune.tasks.tables import samples

        return samples(records, ["prompt", "target", "prediction"], title="sample generations")

    def state(self) -> dict:
        return {}

    def load_state(self, state: dict) -> None:
        pass

    @staticmethod
    def _text(row: Row, column: str, role: str) -> str:
        value = row.get(column)
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"{row.where}: '{column}' is missing, empty or not text (columns: {sorted(row.values)}); "
                            f"map it with data.columns.{role}")
        return value


def _normal(text: str) -> str:
    """Exact match ignores case, punctuation and spacing (as SQuAD's scorer does)."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


register_task(TaskKind(
    "seq2seq", Seq2SeqSection, Seq2Seq,
    "text-to-text tuning of an encoder-decoder (T5): teacher-forced loss, generation scored by exact match, "
    "ROUGE-L and sacreBLEU",
    family="seq2seq", roles=frozenset({"source", "target"}),
    capabilities=frozenset({Can.GENERATE, Can.GENERATE_AT_EVAL, Can.REPORT})))
