"""The task registry: every task registers its section, roles, formats, rules and
capabilities from its own module; the recipe's union, the validator, the matrix and the CLI
ask it; no other module decides anything by comparing task.type with a name; and
validating a recipe imports neither torch nor transformers."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from typing import Literal

import pytest
from pydantic import TypeAdapter

from shardtune import compat
from shardtune.recipe.sections import TASK_TYPES, TaskSection
from shardtune.schema import TaskBase
from shardtune.tasks import Can, task_kind, task_kinds
from shardtune.tasks import base
from shardtune.tasks.base import protocol_methods
from shardtune.tasks.registry import TaskKind, register_task

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src" / "shardtune"
KINDS = task_kinds()


def test_the_built_in_tasks_are_registered_in_the_docs_order():
    assert TASK_TYPES == [k.type for k in KINDS]
    assert TASK_TYPES[:6] == ["sequence_classification", "sequence_regression", "token_classification",
                              "question_answering", "causal_lm", "prompt_classification"]
    assert list(compat.FAMILIES) == list(dict.fromkeys(k.family for k in KINDS))


@pytest.mark.parametrize("kind", KINDS, ids=[k.type for k in KINDS])
def test_each_task_owns_its_section_and_capabilities(kind):
    assert kind.section.__module__ == kind.task.__module__ == f"shardtune.tasks.{kind.type}"
    required = {name: value for name, value in {"templates": ["{text} {mask}"], "verbalizer": "auto"}.items()
                if name in kind.section.model_fields and kind.section.model_fields[name].is_required()}
    section = TypeAdapter(TaskSection).validate_python({"type": kind.type, **required})
    assert type(section) is kind.section
    for capability in kind.capabilities:  # each names a protocol of base.py that the class implements
        assert all(callable(getattr(kind.task, m)) for m in protocol_methods(getattr(base, capability.value)))
    assert f"`{kind.type}`, {kind.summary}" in compat.matrix_markdown()
    assert kind.roles, "a task reads at least one column role"


def test_a_task_with_a_taken_name_a_wrong_tag_or_a_missing_capability_is_refused():
    with pytest.raises(ValueError, match="registered twice"):
        register_task(task_kind("causal_lm"))

    class Mislabelled(TaskBase):
        type: Literal["other"]

    class Plain:
        pass

    with pytest.raises(ValueError, match="must have type: Literal\\['summarise'\\]"):
        register_task(TaskKind("summarise", Mislabelled, Plain, "x", family="x", roles=frozenset({"text"})))

    class Summarise(TaskBase):
        type: Literal["summarise"]

    with pytest.raises(ValueError, match="GENERATE \\(prompt_row\\), GENERATE \\(generate\\)"):
        register_task(TaskKind("summarise", Summarise, Plain, "x", family="x", roles=frozenset({"text"}),
                               capabilities=frozenset({Can.GENERATE})))
    assert "summarise" not in [k.type for k in task_kinds()]


def _task_type_comparisons(tree: ast.AST) -> list[int]:
    """Lines that compare a `.task.type` (or a raw recipe's task "type") with a string."""
    lines = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Compare):
            continue
        left = node.left
        is_type = (isinstance(left, ast.Attribute) and left.attr == "type" and isinstance(left.value, ast.Attribute)
                   and left.value.attr == "task")
        is_raw = (isinstance(left, ast.Call) and isinstance(left.func, ast.Attribute) and left.func.attr == "get"
                  and left.args and isinstance(left.args[0], ast.Constant) and left.args[0].value == "type")
        if is_type or is_raw:
            for right in node.comparators:
                values = right.elts if isinstance(right, (ast.Tuple, ast.List, ast.Set)) else [right]
                if any(isinstance(v, ast.Constant) and v.value in TASK_TYPES for v in values):
                    lines.append(node.lineno)
    return lines


def test_no_module_outside_the_tasks_decides_by_a_task_type():
    sample = 'a = recipe.task.type == "causal_lm"\nb = (raw.get("task") or {}).get("type") in ("causal_lm",)'
    assert _task_type_comparisons(ast.parse(sample)) == [1, 2]  # it can see them
    found = {}
    for file in SRC.rglob("*.py"):
        if file.parent.name == "tasks" and file.name != "__init__.py":
            continue  # a task's own rules may name its options
        if lines := _task_type_comparisons(ast.parse(file.read_text())):
            found[str(file.relative_to(SRC))] = lines
    assert found == {}, f"ask shardtune.tasks.task_kind(type) for the capability instead: {found}"


def test_no_module_looks_for_task_hooks_with_hasattr():
    found = {}
    for file in SRC.rglob("*.py"):
        if file == SRC / "tasks" / "registry.py":
            continue  # registration checks a class against the capabilities it declares
        for node in ast.walk(ast.parse(file.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("hasattr", "getattr")
                    and node.args and isinstance(node.args[0], ast.Name) and node.args[0].id == "task"):
                found.setdefault(str(file.relative_to(SRC)), []).append(node.lineno)
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("hasattr", "getattr")
                    and node.args and isinstance(node.args[0], ast.Attribute) and node.args[0].attr == "task"):
                found.setdefault(str(file.relative_to(SRC)), []).append(node.lineno)
    assert found == {}, f"declare a capability (registry.Can) and ask the task's kind: {found}"


def test_validating_every_shipped_recipe_imports_neither_torch_nor_transformers():
    code = ("import sys, pathlib\nfrom shardtune.recipe import load_recipe\n"
            "for p in sorted(pathlib.Path('recipes').glob('*.yaml')):\n    load_recipe(p, check_files=False)\n"
            "heavy = [m for m in ('torch', 'transformers', 'sklearn', 'peft', 'deepspeed') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
