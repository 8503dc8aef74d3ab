"""Tasks: each owns its recipe section, column roles, formats, rules, capabilities, head,
preprocessing, collation, metrics and prediction format, and registers itself
(registry.py) as the adapter families do.

Adding a task is a module here (its section, a class satisfying base.Task and a
`register_task` call at its end) and recipes, nothing else: every module of this folder is
imported below, and the recipe's task union, the validator's rules, the compatibility
table and the CLI follow from the registry. No torch at import time: the recipe imports
this package to build its task union.
"""

from __future__ import annotations

import importlib
import pkgutil

# Each module registers its task on import. The built-in order is the docs' and the
# matrix's; modules added later follow in name order.
from shardtune.tasks import (sequence_classification, sequence_regression, token_classification,  # noqa: F401
                             question_answering, causal_lm, prompt_classification)
from shardtune.tasks.base import Example, Task
from shardtune.tasks.registry import Can, TaskKind, task_kind, task_kinds

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_module}")


def get_task(recipe) -> Task:
    return task_kind(recipe.task.type).task(recipe)


def kind_of(recipe) -> TaskKind:
    return task_kind(recipe.task.type)


__all__ = ["Can", "Example", "Task", "TaskKind", "get_task", "kind_of", "task_kind", "task_kinds"]
