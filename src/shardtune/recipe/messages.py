"""Pydantic's validation errors turned into messages that name the field path, the value,
the field's meaning and, for unknown keys, the closest valid key."""

from __future__ import annotations

import difflib
import types
import typing
from typing import Annotated, Literal, Union

from pydantic import BaseModel

from shardtune.recipe.sections import ADAPTER_METHODS, ADAPTER_SECTIONS, TASK_TYPES, Recipe, TaskSection


def explain_errors(errors: list[dict], root: type[BaseModel] = Recipe) -> list[str]:
    """One message per problem. A field that takes one of several shapes (a list of module
    names or 'all-linear') fails once per shape in pydantic, under a location that names its
    internal types (`target_modules.list[str]`, `.literal['all-linear']`): those become one
    message that says what the field accepts. `root`: the schema the errors are about (the
    recipe, or a sweep's space)."""
    messages, unions = [], {}
    for err in errors:
        loc, member = _located(err)
        at = next((i for i, p in enumerate(loc) if _is_type_tag(p)), None)
        if at is None:
            messages.append(_explain(err, root))
            continue
        key = tuple(loc[:at])
        if key not in unions:
            unions[key] = {"shapes": [], "input": None, "member": member}
            messages.append(key)  # placeholder: keeps the order of the problems
        union = unions[key]
        shape = _shape(loc[at])
        if shape not in union["shapes"]:
            union["shapes"].append(shape)
        if len(loc) == at + 1 or union["input"] is None:
            union["input"] = err.get("input")
    out = []
    for item in messages:
        if isinstance(item, tuple):
            union, loc = unions[item], list(item)
            dotted, desc = ".".join(loc), _describe(loc, union["member"], root)
            out.append(f"{dotted}: input should be {' or '.join(union['shapes'])} (got {_shown(union['input'])})"
                       + (f"; {dotted} is the {desc}" if desc else ""))
        else:
            out.append(item)
    return out


_SHAPES = {"str": "a string", "int": "a whole number", "float": "a number", "bool": "true or false",
           "none": "null", "list[str]": "a list of strings", "dict[str,str]": "a mapping of strings to strings"}


def _is_type_tag(part: str) -> bool:
    # pydantic names a union member by its type: list[str], literal['all-linear'], str, int ...
    return "[" in part or part in _SHAPES


def _shape(tag: str) -> str:
    if tag.startswith("literal[") and tag.endswith("]"):
        return " or ".join(v.strip() for v in tag[len("literal["):-1].split(","))
    return _SHAPES.get(tag.replace(" ", ""), tag)


def _located(err: dict) -> tuple[list[str], dict]:
    """The error's field path without the discriminated unions' tags, and the members they pick."""
    loc = [str(p) for p in err["loc"]]
    # Discriminated unions put the tag in the location (task.sequence_classification.labels);
    # the tag picks the member class whose fields the message lists.
    tags = {p: i for i, p in enumerate(loc) if p in TASK_TYPES or (p in ADAPTER_METHODS and i == 1)}
    member = {loc[i - 1]: p for p, i in tags.items()}
    return [p for i, p in enumerate(loc) if i not in tags.values()], member


def _explain(err: dict, root: type[BaseModel] = Recipe) -> str:
    loc, member = _located(err)
    dotted = ".".join(loc)
    kind = err["type"]
    if kind == "adapter_method":
        method = err.get("input", {}).get("method") if isinstance(err.get("input"), dict) else None
        return (f"adapter.method: unknown method {method!r}{_did_you_mean(str(method), ADAPTER_METHODS)}; "
                f"one of {ADAPTER_METHODS}")
    if kind == "extra_forbidden":
        parent_fields = _fields_at(loc[:-1], member, root)
        hint = _did_you_mean(loc[-1], parent_fields)
        if not hint and loc[:1] == ["adapter"]:
            owners = [m for m, c in MEMBERS["adapter"].items() if loc[-1] in c.model_fields]
            hint = (f" for adapter.method {member.get('adapter')} (it is a key of {', '.join(owners)}; to switch "
                    f"methods in an override, replace the section: adapter='{{method: {member.get('adapter')}}}')"
                    if owners else "")
        where = ".".join(loc[:-1]) or ("the recipe" if root is Recipe else "the file")
        allowed = f"; keys of {where}: {', '.join(sorted(parent_fields))}" if parent_fields else ""
        return f"{dotted}: unknown key{hint}{allowed}"
    if kind == "missing":
        return f"{dotted}: required; {_describe(loc, member, root) or 'add it'}"
    if kind == "union_tag_invalid":
        return f"{dotted}.type: unknown task type {err.get('input', {}).get('type')!r}; one of {TASK_TYPES}"
    if kind == "union_tag_not_found":
        return f"{dotted}.type: required; one of {TASK_TYPES}"
    got = err.get("input")
    got_text = f" (got {_shown(got)})" if not isinstance(got, dict) else ""
    desc = _describe(loc, member, root)
    msg = err["msg"][0].lower() + err["msg"][1:]
    return f"{dotted}: {msg}{got_text}" + (f"; {dotted} is the {desc}" if desc else "")


def _shown(value, limit: int = 200) -> str:
    """A value as the message quotes it, cut short without building all of it: a refused
    value may be megabytes."""
    import reprlib

    short = reprlib.Repr()
    short.maxlevel, short.maxlist, short.maxtuple, short.maxdict = 3, 8, 8, 8
    short.maxstring = short.maxother = limit
    text = short.repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _did_you_mean(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _model_class(annotation) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _model_class(typing.get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(annotation):
            found = _model_class(arg)
            if found is not None:
                return found
    return None


MEMBERS = {"adapter": ADAPTER_SECTIONS}


def _field_at(loc: list[str], member: dict | None = None, root: type[BaseModel] = Recipe):
    cls: type[BaseModel] | None = root
    field, values_of = None, None  # values_of: the model of a dict[str, Model] field's values
    for part in loc:
        if values_of is not None:  # `part` is a key of that mapping (a sweep's parameter name)
            cls, values_of = values_of, None
            continue
        if cls is None or part not in cls.model_fields:
            return None, None
        field = cls.model_fields[part]
        if typing.get_origin(field.annotation) is dict:
            values_of = _model_class(typing.get_args(field.annotation)[1])
        chosen = (member or {}).get(part)
        cls = MEMBERS.get(part, {}).get(chosen) if chosen in MEMBERS.get(part, {}) else _model_class(field.annotation)
        if chosen in TASK_TYPES:
            cls = _task_class(chosen)
    return field, cls


def _task_class(task_type: str):
    for arg in typing.get_args(typing.get_args(TaskSection)[0]):
        if arg.model_fields["type"].annotation == Literal[task_type]:
            return arg
    return None


def _fields_at(loc: list[str], member: dict | None = None, root: type[BaseModel] = Recipe) -> list[str]:
    if not loc:
        return list(root.model_fields)
    _, cls = _field_at(loc, member, root)
    return list(cls.model_fields) if cls else []


def _describe(loc: list[str], member: dict | None = None, root: type[BaseModel] = Recipe) -> str:
    field, _ = _field_at(loc, member, root)
    return (field.description or "") if field else ""
