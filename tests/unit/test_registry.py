"""The adapter registry: every family registers its section, rules and capabilities from its
own module, the recipe's union and the docs are built from it, and no other module decides
anything by comparing adapter.method with a name."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Literal

import pytest
from pydantic import BaseModel, TypeAdapter

from shardtune import compat
from shardtune.adapters import adapter_families, adapter_family
from shardtune.adapters.registry import AdapterFamily, register_adapter
from shardtune.recipe.sections import ADAPTER_METHODS, AdapterSection

SRC = Path(__file__).resolve().parents[2] / "src" / "shardtune"
FAMILIES = adapter_families()


def test_the_built_in_families_are_registered_in_the_docs_order():
    assert ADAPTER_METHODS == [f.method for f in FAMILIES] == compat.METHODS
    assert ADAPTER_METHODS == ["lora", "ia3", "prompt_tuning", "prefix_tuning", "p_tuning", "frozen", "none"]


@pytest.mark.parametrize("family", FAMILIES, ids=[f.method for f in FAMILIES])
def test_each_family_owns_its_section_and_the_union_chooses_it(family):
    section = TypeAdapter(AdapterSection).validate_python({"method": family.method})
    assert type(section) is family.section and section.method == family.method
    assert family.section.__module__ == f"shardtune.adapters.{family.apply.__module__.rsplit('.', 1)[-1]}"
    assert family.summary and family.saves in ("adapter", "model")
    assert f"`{family.method}`: {family.summary}." in compat.matrix_markdown()
    for rule in family.rules:  # each rule's reason reaches the docs' footnotes
        assert rule.reason in compat.matrix_markdown()


def test_a_family_with_a_taken_name_or_a_wrong_tag_is_refused():
    with pytest.raises(ValueError, match="registered twice"):
        register_adapter(adapter_family("lora"))

    class Mislabelled(BaseModel):
        method: Literal["other"]

    with pytest.raises(ValueError, match="must have method: Literal\\['bitfit'\\]"):
        register_adapter(AdapterFamily(method="bitfit", section=Mislabelled, apply=lambda *a: None, summary="x"))
    assert "bitfit" not in [f.method for f in adapter_families()]


def _method_comparisons(tree: ast.AST) -> list[int]:
    """Lines that compare something's .method with a string: deciding by the family's name."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and isinstance(node.left, ast.Attribute) and node.left.attr == "method":
            for right in node.comparators:
                values = right.elts if isinstance(right, (ast.Tuple, ast.List, ast.Set)) else [right]
                if any(isinstance(v, ast.Constant) and isinstance(v.value, str) for v in values):
                    lines.append(node.lineno)
    return lines


def test_no_module_outside_the_families_decides_by_a_method_name():
    assert _method_comparisons(ast.parse('x = recipe.adapter.method in ("lora", "ia3")')) == [1]  # it can see one
    found = {}
    for file in SRC.rglob("*.py"):
        if file.parent.name == "adapters" and file.name != "__init__.py":
            continue  # a family's own rules may name its options
        if lines := _method_comparisons(ast.parse(file.read_text())):
            found[str(file.relative_to(SRC))] = lines
    assert found == {}, f"ask shardtune.adapters.adapter_family(method) for the capability instead: {found}"
