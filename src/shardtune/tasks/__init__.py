"""Tasks: each owns its head, preprocessing, collation, metrics and prediction format.

Adding a task touches this folder and recipes/ only: write a module with a class that
satisfies `Task` (base.py) and register it in TASKS.
"""

from __future__ import annotations

from shardtune.tasks.base import Example, Task
from shardtune.tasks.sequence_classification import SequenceClassification

TASKS: dict[str, type] = {
    "sequence_classification": SequenceClassification,
}


def get_task(recipe) -> Task:
    return TASKS[recipe.task.type](recipe)


__all__ = ["Example", "Task", "TASKS", "get_task"]
