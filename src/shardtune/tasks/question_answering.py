"""Extractive QA (SQuAD 1.1 and 2.0): predict the start and end token of the answer.

A row is a question with its context and gold answers ({text, answer_start} in
characters). Contexts longer than max_length are split into overlapping windows
(`doc_stride` tokens shared); each window is one training/eval feature whose target is
the answer's token span, or the first ([CLS]) token when the answer is not inside it
(or the question has none). At prediction time the best span over all windows of a
question wins, mapped back to characters through the tokenizer's offsets; with
unanswerable questions allowed, "" wins when the [CLS] score beats every span.
Metrics: exact match and F1 by the official SQuAD definitions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import Field

from shardtune.data import Row
from shardtune.errors import DataError
from shardtune.metrics import best_no_answer_threshold, cross_entropy, squad_scores
from shardtune.schema import TaskBase
from shardtune.tasks.base import Example, readable
from shardtune.tasks.registry import Can, TaskKind, register_task

if TYPE_CHECKING:
    import torch


TOP_K = 20  # start/end candidates considered per window


# ------------------------------------------------------------------- recipe section
class QuestionAnsweringSection(TaskBase):
    type: Literal["question_answering"]
    doc_stride: int = Field(32, ge=1, description="tokens shared by consecutive windows of a long context")
    max_answer_tokens: int = Field(30, ge=1, description="longest answer span considered, in tokens")
    allow_no_answer: bool | None = Field(
        None, description="SQuAD 2.0: questions may be unanswerable; default: if the training data has any")
    no_answer_threshold: float = Field(
        0.0, description="answer no-answer when its score beats the best span by more than this; "
                         "evaluation reports the best threshold on the validation split")


# ----------------------------------------------------------------------------- task
class QuestionAnswering:
    peft_task_type = "QUESTION_ANS"
    target_keys = ("start_positions", "end_positions")

    def __init__(self, recipe):
        self.options = recipe.task
        self.max_length = recipe.data.max_length
        columns = recipe.data.columns
        self.cols = {role: columns.get(role, role) for role in ("id", "question", "context", "answers")}
        self.allow_no_answer = self.options.allow_no_answer

    def fit_labels(self, train_rows: list[Row]) -> None:
        if self.allow_no_answer is None:
            self.allow_no_answer = any(not answers for answers in readable(train_rows, self._answers))

    def build_model(self, model_path: str, load_kwargs: dict) -> torch.nn.Module:
        from transformers import AutoModelForQuestionAnswering

        return AutoModelForQuestionAnswering.from_pretrained(model_path, **load_kwargs)

    def build_model_from_config(self, config) -> torch.nn.Module:
        from transformers import AutoModelForQuestionAnswering

        return AutoModelForQuestionAnswering.from_config(config)

    def head_modules(self, model: torch.nn.Module) -> list[str]:
        return [n for n in ("qa_outputs",) if hasattr(model, n)]

    # ------------------------------------------------------------------------- data
    def encode(self, rows: list[Row], tokenizer, *, with_targets: bool = True) -> list[Example]:
        questions = [self._text(row, "question").lstrip() for row in rows]
        contexts = [self._text(row, "context") for row in rows]
        golds = [self._answers(row, check=with_targets) for row in rows] if with_targets else [None] * len(rows)
        if self.max_length - 3 <= self.options.doc_stride:
            raise DataError(f"task.doc_stride ({self.options.doc_stride}) must be well below data.max_length "
                            f"({self.max_length})")
        encoded = tokenizer(questions, contexts, truncation="only_second", max_length=self.max_length,
                            stride=self.options.doc_stride, return_overflowing_tokens=True,
                            return_offsets_mapping=True)
        examples = []
        for f, row_index in enumerate(encoded["overflow_to_sample_mapping"]):
            sequence_ids = encoded.sequence_ids(f)
            # Offsets only for context tokens: the rest can never be part of an answer.
            offsets = [tuple(o) if s == 1 else None for o, s in zip(encoded["offset_mapping"][f], sequence_ids)]
            target = None
            if with_targets:
                target = self._token_span(offsets, golds[row_index])
            features = {k: encoded[k][f] for k in encoded.keys()
                        if k not in ("offset_mapping", "overflow_to_sample_mapping")}
            examples.append(Example(index=f, features=features, target=target, extra={
                "row": row_index, "offsets": offsets, "context": contexts[row_index],
                "answers": [a["text"] for a in golds[row_index]] if with_targets else None}))
        return examples

    def _token_span(self, offsets, answers) -> tuple[int, int]:
        """(start, end) token of the first gold answer inside this window, else (0, 0)."""
        if not answers:
            return 0, 0
        start_char = answers[0]["answer_start"]
        end_char = start_char + len(answers[0]["text"])
        context = [i for i, o in enumerate(offsets) if o is not None]
        if offsets[context[0]][0] > start_char or offsets[context[-1]][1] < end_char:
            return 0, 0  # not (wholly) in this window
        start = next(i for i in context if offsets[i][1] > start_char)
        end = next(i for i in reversed(context) if offsets[i][0] < end_char)
        return start, end

    def augment(self, row: Row, augmenter) -> Row:
        """Augment the question, and the context around (never inside) the answer span."""
        values = dict(row.values)
        values[self.cols["question"]] = augmenter.text(self._text(row, "question"))
        context, answers = self._text(row, "context"), self._answers(row)
        if not answers:
            values[self.cols["context"]] = " ".join(augmenter.words(context.split())[0])
            return Row(values, row.where)
        answer = answers[0]
        start, end = answer["answer_start"], answer["answer_start"] + len(answer["text"])
        before, after = context[:start], context[end:]
        left = " ".join(augmenter.words(before.split())[0]) + (" " if before[-1:].isspace() else "")
        right = (" " if after[:1].isspace() else "") + " ".join(augmenter.words(after.split())[0])
        values[self.cols["context"]] = left + answer["text"] + right
        values[self.cols["answers"]] = [{"text": answer["text"], "answer_start": len(left)}]
        return Row(values, row.where)

    def collate(self, examples: list[Example], tokenizer) -> dict[str, torch.Tensor]:
        import torch
        from transformers import DataCollatorWithPadding

        batch = dict(DataCollatorWithPadding(tokenizer, return_tensors="pt")([e.features for e in examples]))
        if examples and examples[0].target is not None:
            batch["start_positions"] = torch.tensor([e.target[0] for e in examples])
            batch["end_positions"] = torch.tensor([e.target[1] for e in examples])
        return batch

    # ---------------------------------------------------------------------- results
    def outputs(self, model_output, batch) -> list[np.ndarray]:
        import torch

        logits = torch.stack([model_output.start_logits, model_output.end_logits], dim=-1).float().cpu().numpy()
        lengths = batch["attention_mask"].sum(dim=1).tolist()
        return [logits[i, :n] for i, n in enumerate(lengths)]

    def answers(self, outputs: list[np.ndarray], examples: list[Example]) -> dict[int, str]:
        """The predicted answer text for each row ("" for no answer)."""
        threshold = self.options.no_answer_threshold
        return {row: "" if self.allow_no_answer and margin > threshold else text
                for row, (text, margin) in self.candidates(outputs, examples).items()}

    def candidates(self, outputs: list[np.ndarray], examples: list[Example]) -> dict[int, tuple[str, float]]:
        """Each row's best span over all of its windows, and how far the no-answer
        ([CLS]) score is above that span's score."""
        best: dict[int, tuple[float, str]] = {}
        null: dict[int, float] = {}
        for output, example in zip(outputs, examples):
            row, offsets = example.extra["row"], example.extra["offsets"]
            start_logits, end_logits = output[:, 0], output[:, 1]
            null[row] = min(null.get(row, np.inf), float(start_logits[0] + end_logits[0]))
            starts = np.argsort(start_logits)[::-1][:TOP_K]
            ends = np.argsort(end_logits)[::-1][:TOP_K]
            for s in starts:
                for e in ends:
                    if (s >= len(offsets) or e >= len(offsets) or offsets[s] is None or offsets[e] is None
                            or e < s or e - s + 1 > self.options.max_answer_tokens):
                        continue
                    score = float(start_logits[s] + end_logits[e])
                    if row not in best or score > best[row][0]:
                        best[row] = (score, example.extra["context"][offsets[s][0]:offsets[e][1]])
        result = {}
        for row in null:
            score, text = best.get(row, (-np.inf, ""))
            result[row] = (text, null[row] - score)
        return result

    def metrics(self, outputs: list[np.ndarray], examples: list[Example]) -> dict[str, float]:
        predicted = self.answers(outputs, examples)
        golds = {e.extra["row"]: e.extra["answers"] for e in examples}
        rows = sorted(golds)
        # Loss as in training: cross-entropy of the start and of the end position, averaged.
        loss = np.mean([cross_entropy(o[None, :, k], np.array([e.target[k]]))
                        for o, e in zip(outputs, examples) for k in (0, 1)])
        metrics = {"loss": float(loss), **squad_scores([predicted[r] for r in rows], [golds[r] for r in rows])}
        if self.allow_no_answer:
            candidates = self.candidates(outputs, examples)
            metrics.update(best_no_answer_threshold([candidates[r] for r in rows], [golds[r] for r in rows]))
        return metrics

    def predictions(self, outputs: list[np.ndarray], examples: list[Example], rows: list[Row]) -> list[dict]:
        predicted = self.answers(outputs, examples)
        records = []
        for index, row in enumerate(rows):
            record = {"id": str(row.get(self.cols["id"]) or index), "question": row.get(self.cols["question"]),
                      "prediction": predicted.get(index, "")}
            if row.get(self.cols["answers"]) is not None:
                record["answers"] = [a.get("text") for a in row.get(self.cols["answers"]) if isinstance(a, dict)]
            records.append(record)
        return records

    def report_tables(self, records: list[dict]) -> list:
        from shardtune.tasks.tables import question_answering

        return question_answering(records)

    def state(self) -> dict:
        return {"allow_no_answer": self.allow_no_answer}

    def load_state(self, state: dict) -> None:
        self.allow_no_answer = state["allow_no_answer"]

    # ---------------------------------------------------------------------- helpers
    def _text(self, row: Row, role: str) -> str:
        value = row.get(self.cols[role])
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"{row.where}: '{self.cols[role]}' is missing or empty "
                            f"(columns: {sorted(row.values)}); map it with data.columns.{role}")
        return value

    def _answers(self, row: Row, check: bool = True) -> list[dict]:
        answers = row.get(self.cols["answers"]) or []
        if row.get("is_impossible"):
            return []
        if not isinstance(answers, list):
            raise DataError(f"{row.where}: answers must be a list of {{text, answer_start}}")
        context = row.get(self.cols["context"]) or ""
        for answer in answers:
            if not (isinstance(answer, dict) and isinstance(answer.get("text"), str)
                    and isinstance(answer.get("answer_start"), int)):
                raise DataError(f"{row.where}: each answer needs text and an integer answer_start, got {answer!r}")
            start = answer["answer_start"]
            if check and context[start:start + len(answer["text"])] != answer["text"]:
                raise DataError(f"{row.where}: answer {answer['text']!r} is not in its context at character "
                                f"{start} (found {context[start:start + len(answer['text'])]!r})")
        return answers


register_task(TaskKind(
    "question_answering", QuestionAnsweringSection, QuestionAnswering,
    "extractive QA (SQuAD 1.1/2.0): start/end logits over windows of the context, exact match and F1",
    family="qa", roles=frozenset({"id", "question", "context", "answers"}), formats=frozenset({"squad"}),
    capabilities=frozenset({Can.AUGMENT, Can.REPORT})))
