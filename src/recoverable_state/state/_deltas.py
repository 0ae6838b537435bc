"""Deltas: what a persist of a big state writes when the change tracking saw where it changed.

A state whose snapshot is big (DELTA_FROM_BYTES or more) has its change tracking
note where each change happens (`ChangeMark.log`, see `_tracking.py`): the keys
of a dict or of a model's fields that were set or deleted, the length a list had
before it grew at its end, or a container changed as a whole. A persist then
builds the delta of those notes and appends it to the record (`RecordAppend`)
instead of writing the whole value again.

Each noted container finds its place by walking up the `_at` links (parent
container, key) that the watch set, each link checked against what the parent
holds now: a container that moved, or was taken out, gives no place, and the
persist writes a snapshot instead. A place inside a list (a model in a list of
models) is written as the whole list.

The delta's values are serialised by pydantic, with the state's own schema: the
edits become a stand-in of the root model holding only what changed (models as
stand-ins holding only their changed fields, dicts holding only their changed
keys, a grown list only its new items), serialised in one call. So each value is
written exactly as a snapshot would write it, and a delta costs what changed.
The format (`[spec, part]`) is `storage._chain`'s: every operation sets a place to
what it holds now, so a delta applied twice, or over a snapshot that already
holds some of it, gives the same value.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel
from pydantic_core import SchemaSerializer

from ._tracking import EVERYTHING, TrackedDict, TrackedList

DELTA_FROM_BYTES = 64 * 1024
"""Snapshots from this size on are followed by deltas; smaller states write snapshots only."""

MAX_DELTAS = 100
"""After this many deltas the next persist writes a snapshot (a load replays at most this many)."""

Edit = list[Any]
"""A node of the edit tree: ["r", value] set, ["d"] delete, ["x", base, list] grown from base,
["m", holder, {key: Edit}] some keys of a model or dict (`holder`) changed."""


class _NoDelta(Exception):
    """The notes cannot be written as a delta: the persist writes a snapshot."""


def build_delta(root: BaseModel, notes: list[tuple[Any, Any]], serializer: SchemaSerializer) -> bytes | None:
    """The delta of `notes` (`ChangeMark.forget_changes`) on the root model; None: write a snapshot."""
    tree: Edit = ["m", root, {}]
    try:
        for container, changes in notes:
            _add_notes(tree, root, container, changes)
        spec, part = _build(tree)
    except (_NoDelta, KeyError, IndexError, TypeError):
        return None
    if not spec:
        return None
    data = serializer.to_json(part, by_alias=True)
    return b"[" + json.dumps(spec, separators=(",", ":")).encode() + b"," + data + b"]"


def _add_notes(tree: Edit, root: BaseModel, container: Any, changes: Any) -> None:
    """Put the edits one container noted into the tree."""
    keys, holders = _place(container, root)
    own = holders[-1]  # the container's value at its place: a model (for its fields) or itself
    for depth in range(1, len(holders)):
        if not isinstance(holders[depth - 1], BaseModel | dict):  # inside a list or a tuple
            _insert(tree, keys[: depth - 1], holders, ["r", holders[depth - 1]])
            return
    if isinstance(container, TrackedDict) and changes is not EVERYTHING:
        for key in changes:
            if key in container:
                _insert(tree, [*keys, key], [*holders], ["r", container[key]])
            elif isinstance(own, BaseModel):
                raise _NoDelta  # a field deleted from a model
            else:
                _insert(tree, [*keys, key], [*holders], ["d"])
        return
    if not keys:
        raise _NoDelta  # the whole root changed
    if isinstance(container, TrackedList) and type(changes) is int and changes <= len(container):
        _insert(tree, keys, holders, ["x", changes, container])
    else:
        _insert(tree, keys, holders, ["r", own])


def _place(container: Any, root: BaseModel) -> tuple[list[Any], list[Any]]:
    """The keys from the root down to `container`, and the value held at each place on the way.

    `holders[d]` is the value at `keys[:d]` (a model, a dict or a list); the last is
    the container's own value (its model, for a model's fields). Raises _NoDelta when a
    link no longer holds what it links.
    """
    keys: list[Any] = []
    holders: list[Any] = []
    node = container
    while (at := node._at) is not None:
        parent, key = at
        held = parent[key]
        if held is not node and not (isinstance(held, BaseModel) and held.__dict__ is node):
            raise _NoDelta  # moved or taken out since it was watched
        keys.append(key)
        holders.append(held)
        node = parent
    if node is not root.__dict__:
        raise _NoDelta
    holders.append(root)
    keys.reverse()
    holders.reverse()
    return keys, holders


def _insert(tree: Edit, keys: list[Any], holders: list[Any], edit: Edit) -> None:
    """Put `edit` at `keys` (a place below a set or a delete is covered by it already)."""
    if not keys:
        raise _NoDelta
    node = tree
    for depth in range(len(keys) - 1):
        children = node[2]
        child = children.get(keys[depth])
        if child is None:
            child = children[keys[depth]] = ["m", holders[depth + 1], {}]
        elif child[0] != "m":
            return
        node = child
    children = node[2]
    old = children.get(keys[-1])
    if old is None or old[0] != "r":
        children[keys[-1]] = edit


def _build(node: Edit) -> tuple[Any, Any]:
    """The spec of an edit tree and the stand-in value that serialises to its part."""
    kind = node[0]
    if kind == "r":
        return 1, node[1]
    if kind == "x":
        return ["x", node[1]], node[2][node[1] :]
    holder, children = node[1], node[2]
    is_model = isinstance(holder, BaseModel)
    names = _json_names(type(holder)) if is_model else None
    spec: dict[str, Any] = {}
    values: dict[Any, Any] = {}
    for key, child in children.items():
        json_key = names.get(key) if names is not None else _json_key(key)
        if json_key is None or json_key in spec:
            raise _NoDelta
        if child[0] == "d":
            spec[json_key] = 0
            continue
        spec[json_key], values[key] = _build(child)
    return spec, _stand_in(type(holder), values) if is_model else values


def _json_key(key: Any) -> str | None:
    """How a dict key is written in JSON, for the keys whose spelling is certain (str, int)."""
    kind = type(key)
    if kind is str:
        return key  # type: ignore[no-any-return]
    if kind is int:
        return str(key)
    return None


_names: dict[type, dict[str, str]] = {}


def _json_names(cls: type[BaseModel]) -> dict[str, str]:
    """Each field's name in the model's JSON (its serialization alias, its alias, or its name)."""
    names = _names.get(cls)
    if names is None:
        names = _names[cls] = {
            name: field.serialization_alias or field.alias or name for name, field in cls.model_fields.items()
        }
    return names


def _stand_in(cls: type[BaseModel], fields: dict[str, Any]) -> BaseModel:
    """An instance of `cls` holding only `fields`: pydantic serialises the fields it holds."""
    model = object.__new__(cls)
    object.__setattr__(model, "__dict__", fields)
    object.__setattr__(model, "__pydantic_fields_set__", set(fields))
    object.__setattr__(model, "__pydantic_extra__", None)
    object.__setattr__(model, "__pydantic_private__", None)
    return model
