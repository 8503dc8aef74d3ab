"""The tasks, each registered from its own module (as the adapter families are, and as
peft's methods register with `register_peft_method`).

A task kind owns its recipe section, the column roles and file formats it reads, its
rules (with their messages), its place in the compatibility matrix and its
capabilities. The recipe's task union, the validator's column and format rules, the
matrix and the CLI ask this registry; no other module names a task type. Like the
adapters' registry, nothing here (nor any task module's top level) imports torch or
transformers, so that validating a recipe stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Callable, Literal

import shardtune.tasks.base as base


class Can(Enum):
    """What a task does beyond the core protocol (base.Task). Each capability names a typed
    protocol in base.py; registering a task checks that its class implements the ones it
    declares, and the engine and CLI ask the kind, never the object."""
    CHECK_TOKENIZER = "ChecksTokenizer"  # rules that need the tokenizer, run before any worker starts
    FIT_ON_MODEL = "FitsOnModel"  # fits something on the untrained model before the adapter (label words)
    WRAP_MODEL = "WrapsModel"  # puts a module around the adapted model (prompt tasks)
    PREPARE_FORWARD = "PreparesForward"  # once before each evaluation pass (calibration)
    GENERATE = "Generates"  # predict/generate write generated text
    GENERATE_AT_EVAL = "GeneratesAtEval"  # evaluation generates (its metrics compare texts)
    CLASS_LABELS = "HasClassLabels"  # rows carry a class label: few-shot draws per label
    AUGMENT = "Augments"  # label-preserving augmentation of training rows (data.augment)
    ZERO_SHOT = "ZeroShot"  # `shardtune eval RECIPE` scores the untrained model
    REPORT = "Reports"  # tables for the run report (per-class scores, samples...)
    CHAT = "Chats"  # `shardtune chat`: answers a conversation, a message at a time


@dataclass(frozen=True)
class TaskRule:
    """A refusal of a recipe this task cannot train (off the compatibility matrix's axes)."""
    key: str
    message: Callable[[object], str | None]  # recipe -> the validation message (field, why, fix), or None


@dataclass(frozen=True)
class TaskKind:
    type: str  # task.type
    section: type  # its recipe section (a schema.TaskSectionBase with type: Literal[...])
    task: type  # the class; built per recipe with task(recipe)
    summary: str  # one line for the docs
    family: str  # its column of the compatibility matrix (tasks of one family share its rules)
    roles: frozenset[str]  # the data.columns roles it reads
    formats: frozenset[str] = frozenset()  # the project's task-specific formats it reads (conll, squad, ...)
    capabilities: frozenset[Can] = frozenset()
    causal_backbone: bool = False  # trains a causal LM: may load a GGUF file (model.gguf_file)
    rules: tuple[TaskRule, ...] = ()
    extra_roles: Callable[[object], set[str]] | None = None  # task section -> roles it adds (template fields)
    notes: tuple[str, ...] = field(default=())

    def can(self, capability: Can) -> bool:
        return capability in self.capabilities

    def roles_of(self, section) -> set[str]:
        return set(self.roles) | (self.extra_roles(section) if self.extra_roles else set())


_KINDS: dict[str, TaskKind] = {}


def register_task(kind: TaskKind) -> TaskKind:
    if kind.type in _KINDS:
        raise ValueError(f"task type {kind.type!r} is registered twice")
    if kind.section.model_fields["type"].annotation != Literal[kind.type]:
        raise ValueError(f"the section of task type {kind.type!r} must have type: Literal[{kind.type!r}]")
    missing = [f"{capability.name} ({name})" for capability in kind.capabilities
               for name in base.protocol_methods(getattr(base, capability.value)) if not callable(getattr(kind.task, name, None))]
    if missing:
        raise ValueError(f"task {kind.type!r} declares capabilities its class lacks: {', '.join(missing)}")
    _KINDS[kind.type] = kind
    return kind


def task_kind(task_type: str) -> TaskKind:
    return _KINDS[task_type]


def kind_of_task(task) -> TaskKind:
    """The kind a task object was built from."""
    return next(kind for kind in _KINDS.values() if isinstance(task, kind.task))


def task_kinds() -> list[TaskKind]:
    """In registration order: the order of the docs, the union and the matrix."""
    return list(_KINDS.values())


def formats_for() -> dict[str, set[str]]:
    """Task-specific format -> the task types that read it (other formats hold any task's rows)."""
    found: dict[str, set[str]] = {}
    for kind in _KINDS.values():
        for fmt in kind.formats:
            found.setdefault(fmt, set()).add(kind.type)
    return found
