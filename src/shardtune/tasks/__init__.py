"""Tasks: each owns its head, preprocessing, collation, metrics and prediction format.

Adding a task touches this folder and recipes/ only: write a module with a class that
satisfies `Task` (base.py) and register it in TASKS.
"""

from __future__ import annotations

from shardtune.tasks.base import Example, Task
from shardtune.tasks.causal_lm import CausalLM
from shardtune.tasks.prompt_classification import PromptClassification
from shardtune.tasks.question_answering import QuestionAnswering
from shardtune.tasks.sequence_classification import SequenceClassification
from shardtune.tasks.sequence_regression import SequenceRegression
from shardtune.tasks.token_classification import TokenClassification

TASKS: dict[str, type] = {
    "sequence_classification": SequenceClassification,
    "sequence_regression": SequenceRegression,
    "token_classification": TokenClassification,
    "question_answering": QuestionAnswering,
    "causal_lm": CausalLM,
    "prompt_classification": PromptClassification,
}


def get_task(recipe) -> Task:
    return TASKS[recipe.task.type](recipe)


__all__ = ["Example", "Task", "TASKS", "get_task"]
