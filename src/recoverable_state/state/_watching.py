"""Putting a value under watch: its lists, dicts, sets and models become tracked (see `_tracking.py`).

One walk over the value (`watch`) replaces each plain container that nothing
else holds by a tracked copy, gives each model a tracked `__dict__`, and links
each tracked part to where it is held (for deltas). Anything that cannot be
watched leaves the state untracked; `_tracking.py` says what that means.
"""

from __future__ import annotations

import enum
import sys
from typing import Any

from pydantic import BaseModel

from ._tracking import _LEAVES, MAX_DEPTH, ChangeMark, TrackedDict, TrackedList, TrackedSet, new_tracked

_TRACKED = (TrackedList, TrackedDict, TrackedSet)


def _refs(obj: Any) -> int:
    return sys.getrefcount(obj)


class _Untrackable(Exception):
    pass


_model_ok: dict[type, bool] = {}


def model_trackable(cls: type[BaseModel]) -> bool:
    """Whether a model class writes its fields only through `__dict__[name] = value`."""
    ok = _model_ok.get(cls)
    if ok is None:
        config = cls.model_config
        ok = (
            cls.__setattr__ is BaseModel.__setattr__
            and cls.__delattr__ is BaseModel.__delattr__
            and not config.get("validate_assignment")
            and config.get("extra") != "allow"
            and not cls.__pydantic_computed_fields__
            and not _has_custom_serialization(cls.__pydantic_core_schema__)
        )
        _model_ok[cls] = ok
    return ok


def _has_custom_serialization(schema: Any) -> bool:
    """Whether a core schema serialises anything through user code (which may read anything)."""
    stack = [schema]
    seen: set[int] = set()
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, dict):
            if "serialization" in node or node.get("computed_fields"):
                return True
            stack.extend(v for k, v in node.items() if k not in ("metadata", "cls", "default", "config"))
        elif isinstance(node, list | tuple):
            stack.extend(node)
    return False


class _Adopter:
    """One walk over a value, putting its mutable parts under `mark`'s watch.

    A plain container is replaced by a tracked copy only when nothing but its
    parent references it (CPython's reference count, against a baseline measured
    on the same code path at import): replacing one that the worker also holds
    would cut the worker's reference off from the state.
    """

    __slots__ = ("links", "mark")

    def __init__(self, mark: ChangeMark) -> None:
        self.mark = mark
        self.links = mark.log
        """Link each part to where it is held (`_at`): only a state kept as deltas needs them."""

    @staticmethod
    def held_by_one(child: Any) -> int:
        """References to `child` beyond this call's own (the caller's local included)."""
        return _refs(child)

    def node(self, value: Any, depth: int, at: tuple[Any, Any] | None = None) -> None:
        """Watch the parts of `value`, which is kept as it is (a leaf, model, tuple or tracked container).

        `at`: where it is held (its parent container and its key there; None: the top).
        """
        kind = type(value)
        if kind in _LEAVES or isinstance(value, enum.Enum):
            return
        if depth > MAX_DEPTH:
            raise _Untrackable
        if isinstance(value, BaseModel):
            self.model(value, depth, at)
        elif kind in _TRACKED:
            if value._mark is not self.mark:
                raise _Untrackable  # watched by another state
            value._at = at  # it may have moved since the last walk
            self.children(value, depth)
        elif kind is tuple or kind is frozenset:
            for item in value:
                if type(item) in (list, dict, set):
                    raise _Untrackable  # a tuple's items cannot be replaced
                self.node(item, depth + 1)  # held by no container: a change inside is noted nowhere
        else:
            raise _Untrackable  # a plain container held elsewhere, a dataclass, a bytearray, ...

    def replace(self, plain: Any, depth: int, at: tuple[Any, Any] | None) -> Any:
        """A tracked copy of a plain container that nothing else holds (emptied: it is unreachable)."""
        kind = type(plain)
        tracked: TrackedList | TrackedDict | TrackedSet
        if kind is list:
            tracked = new_tracked(TrackedList, plain, self.mark, at)
        elif kind is dict:
            tracked = new_tracked(TrackedDict, plain, self.mark, at)
        else:
            tracked = new_tracked(TrackedSet, plain, self.mark, at)
        plain.clear()  # its items now have one holder, the copy
        try:
            self.children(tracked, depth)
        except BaseException:  # an item cannot be watched: `plain` stays in use, so refill it
            if kind is list:
                plain.extend(tracked)
            else:
                plain.update(tracked)
            raise
        return tracked

    def children(self, container: Any, depth: int, *, named: bool = False) -> None:
        """Watch the items of a tracked container (`named`: a model's fields, keyed by name)."""
        # The list and dict branches repeat their child handling on purpose: `held_by_one` counts
        # references as calibrated for a child held by its container and one local here; a
        # helper taking the child as an argument adds one, and every nested list would look
        # shared (tried: 112 tests of test_change_detection.py fail).
        if isinstance(container, list):
            if set(map(type, container)) <= _LEAVES:  # the usual list of strings or numbers
                return
            for i in range(len(container)):
                child = container[i]
                kind = type(child)
                if kind in _LEAVES:
                    continue
                if kind is list or kind is dict or kind is set:
                    if self.held_by_one(child) > _IN_PARENT:
                        raise _Untrackable
                    here = (container, i) if self.links else None
                    list.__setitem__(container, i, self.replace(child, depth + 1, here))
                else:
                    self.node(child, depth + 1, (container, i) if self.links else None)
        elif isinstance(container, dict):
            if not named and not set(map(type, container)) <= _LEAVES:
                for key in container:
                    if type(key) not in _LEAVES and not isinstance(key, enum.Enum):
                        raise _Untrackable  # a key that could change in place
            if set(map(type, container.values())) <= _LEAVES:
                return
            for key in list(container):
                child = container[key]
                kind = type(child)
                if kind in _LEAVES:
                    continue
                if kind is list or kind is dict or kind is set:
                    if self.held_by_one(child) > _IN_PARENT:
                        raise _Untrackable
                    at = (container, key) if self.links else None
                    dict.__setitem__(container, key, self.replace(child, depth + 1, at))
                else:
                    self.node(child, depth + 1, (container, key) if self.links else None)
        elif not set(map(type, container)) <= _LEAVES:  # a set: its items must not change in place
            for item in container:
                if type(item) not in _LEAVES and not isinstance(item, enum.Enum):
                    raise _Untrackable

    def model(self, model: BaseModel, depth: int, at: tuple[Any, Any] | None) -> None:
        if not model_trackable(type(model)):
            raise _Untrackable
        fields = model.__dict__
        if type(fields) is TrackedDict:
            if fields._mark is not self.mark:
                raise _Untrackable
            fields._at = at
            self.children(fields, depth, named=True)
            return
        tracked = new_tracked(TrackedDict, fields, self.mark, at)
        object.__setattr__(model, "__dict__", tracked)
        if self.held_by_one(fields) <= _LOCAL:
            fields.clear()  # the old __dict__ is ours alone now: let its values have one holder
        del fields
        self.children(tracked, depth, named=True)


def _calibrate() -> tuple[int, int]:
    adopter = _Adopter(ChangeMark())
    parent = [[]]  # type: ignore[var-annotated]
    child = parent[0]
    in_parent = adopter.held_by_one(child)
    del parent
    local = adopter.held_by_one(child)
    return in_parent, local


_IN_PARENT, _LOCAL = _calibrate()
"""The references a container has when held by one parent (and a local), or by a local alone."""


def watch(holder: Any, mark: ChangeMark) -> bool:
    """Put `holder.value` under `mark`'s watch; whether every part of it is watched.

    A plain list, dict or set at the top is replaced by a tracked copy when
    nothing but `holder` references it (it has not been handed out yet).
    """
    adopter = _Adopter(mark)
    try:
        value = holder.value
        kind = type(value)
        if kind is list or kind is dict or kind is set:
            if adopter.held_by_one(value) > _IN_PARENT:
                return False  # the worker holds this very object
            holder.value = adopter.replace(value, 0, None)
        else:
            del kind
            adopter.node(value, 0)
    except (_Untrackable, RecursionError):
        return False
    return True
