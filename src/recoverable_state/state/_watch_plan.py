"""Watching a freshly loaded value fast: a plan per model class, read once from its core schema.

A value pydantic just validated holds exactly the types its schema declares,
and nothing but the value holds its containers. So the walk of `_tracking`
(which must check every item's type and every container's other holders) can
be replaced by a plan: for each field that holds something mutable, what to
put under watch there. A model whose schema the plan cannot read fully (a
union, `Any`, a validator, a recursive type) has no plan and takes the walk.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from ._tracking import ChangeMark, TrackedDict, TrackedList, TrackedSet
from ._watching import model_trackable

_LEAF_SCHEMAS = {"int", "bool", "str", "bytes", "none", "date", "datetime", "time", "timedelta", "uuid"}
_LEAF_SCHEMAS.add("float")
_WRAPPERS = {"default", "model-field", "nullable"}

LIST, DICT, SET, MODEL, LIST_OF_MODELS, DICT_OF_MODELS = range(6)

Plan = tuple[tuple[str, int, Any], ...]
"""For each field that holds something mutable: (name, what it holds, the plan of its models)."""

_plans: dict[type, Plan | None] = {}


def plan_for(cls: type[BaseModel]) -> Plan | None:
    """The plan of a model class (None: take the walk), read once."""
    if cls in _plans:
        return _plans[cls]
    _plans[cls] = None  # a recursive model meets itself: no plan
    plan = _read_model(cls) if model_trackable(cls) else None
    _plans[cls] = plan
    return plan


def apply(model: BaseModel, plan: Plan, mark: ChangeMark, at: tuple[Any, Any] | None = None) -> None:
    """Put a freshly validated model under `mark`'s watch, as its plan says (`at`: where it is held).

    The tracked containers are made inline, not by `new_tracked`: a cold start of 100,000
    states makes several each. Links to where each is held only with the mark's log on.
    """
    links = mark.log
    tracked = TrackedDict(model.__dict__)
    tracked._mark, tracked._at, tracked._changes = mark, at, None
    object.__setattr__(model, "__dict__", tracked)
    for name, kind, sub in plan:
        value = tracked[name]
        if value is None:
            continue
        here = (tracked, name) if links else None
        if kind == MODEL:
            apply(value, sub, mark, here)
            continue
        items: TrackedDict | TrackedList | TrackedSet
        if kind in (DICT, DICT_OF_MODELS):
            items = TrackedDict(value)
        else:
            items = TrackedSet(value) if kind == SET else TrackedList(value)
        items._mark, items._at, items._changes = mark, here, None
        dict.__setitem__(tracked, name, items)
        if isinstance(items, TrackedDict) and kind == DICT_OF_MODELS:
            for key, item in items.items():
                apply(item, sub, mark, (items, key) if links else None)
        elif kind == LIST_OF_MODELS:
            for i, item in enumerate(items):
                apply(item, sub, mark, (items, i) if links else None)


def _read_model(cls: type[BaseModel]) -> Plan | None:
    schema = cls.__pydantic_core_schema__
    defs: dict[str, Any] = {}
    if schema.get("type") == "definitions":  # a model used in several places is defined once
        defs = {d["ref"]: d for d in schema.get("definitions", []) if "ref" in d}
        schema = schema["schema"]
    if schema.get("type") != "model" or schema.get("custom_init") or schema.get("root_model"):
        return None
    fields = schema.get("schema", {})
    if fields.get("type") != "model-fields" or fields.get("extras_schema") or fields.get("computed_fields"):
        return None
    plan: list[tuple[str, int, Any]] = []
    for name, field in fields["fields"].items():
        step = _read_field(_unwrapped(field, defs), defs)
        if step is False:
            return None
        if isinstance(step, tuple):
            plan.append((name, step[0], step[1]))
    return tuple(plan)


def _unwrapped(node: Any, defs: dict[str, Any]) -> Any:
    while True:
        kind = node.get("type")
        if kind in _WRAPPERS:
            node = node["schema"]
        elif kind == "definition-ref" and node.get("schema_ref") in defs:
            node = defs[node["schema_ref"]]
        else:
            return node


def _read_field(node: Any, defs: dict[str, Any]) -> tuple[int, Any] | bool | None:
    """What a field's schema asks to watch: a step, None (a leaf), or False (no plan)."""
    kind = node.get("type")
    if kind in _LEAF_SCHEMAS and set(node) <= {"type", "metadata", "strict"}:
        return None
    if kind == "model":
        sub = plan_for(node["cls"])
        return (MODEL, sub) if sub is not None else False
    if set(node) - {"type", "items_schema", "keys_schema", "values_schema", "metadata", "strict", "ref"}:
        return False  # constraints (min_length, ...) or anything else: take the walk
    if kind in ("list", "set"):
        items = _unwrapped(node.get("items_schema", {"type": "any"}), defs)
        if _read_field(items, defs) is None:
            return (LIST if kind == "list" else SET, None)
        if kind == "list" and items.get("type") == "model":
            step = _read_field(items, defs)
            return (LIST_OF_MODELS, step[1]) if isinstance(step, tuple) else False
        return False
    if kind == "dict":
        keys = _unwrapped(node.get("keys_schema", {"type": "any"}), defs)
        values = _unwrapped(node.get("values_schema", {"type": "any"}), defs)
        if _read_field(keys, defs) is not None:
            return False
        if _read_field(values, defs) is None:
            return (DICT, None)
        if values.get("type") == "model":
            step = _read_field(values, defs)
            return (DICT_OF_MODELS, step[1]) if isinstance(step, tuple) else False
    return False
