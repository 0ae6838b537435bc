"""Change tracking: knowing that a state did not change without serialising it.

A persist with 1% of 10,000 states changed used to serialise all 10,000 to
compare bytes (80% of its time). Instead, when a state's value is first handed
to the worker, its mutable parts are put under watch: each list, dict and set
becomes a `TrackedList`, `TrackedDict` or `TrackedSet` (subclasses, so
`isinstance`, equality and pydantic's serializer see no difference), and each
pydantic model gets a `TrackedDict` as its `__dict__`, which is where pydantic's
`__setattr__` writes a field. Every mutating method sets the state's
`ChangeMark`; a persist serialises only the states whose mark is set.

Anything that cannot be watched leaves the state untracked, and an untracked
state compares serialised bytes on every persist as before (correct, slower):
a dataclass, an object of an unknown class, a bytearray, a model with
`validate_assignment`, `extra="allow"`, computed fields or custom serializers,
a container that another state watches, or a plain container that something
besides the state still references (replacing it would cut that reference off).

Warning:
    Code that bypasses a list's or dict's methods is not seen: the C functions
    of `heapq` (which call the list's C API directly) and unbound calls such as
    `list.append(value.items, x)`. Use `change_detection="compare"` for states
    changed that way.
"""

from __future__ import annotations

import threading
import uuid
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from typing import Any, Self, SupportsIndex

MAX_DEPTH = 200
"""Nesting beyond which a value is left untracked."""

_LEAVES: frozenset[type] = frozenset(
    {str, int, float, bool, type(None), bytes, Decimal, datetime, date, time, timedelta, uuid.UUID}
)
"""Types whose values cannot change in place."""


_NOTHING_NOTED: list[Any] = []
"""The notes of every mark whose log was never on: always empty (only a mark's own list is noted in)."""
_NO_NOTES = threading.Lock()
"""The lock of every mark whose log was never on (never taken: nothing is noted without the log)."""


class ChangeMark:
    """Set by a watched container when its state changes; cleared by the persist that reads it.

    With `log` on (a state kept as deltas, see `_deltas.py`), each container also
    notes where it changed (`_changes`: the keys of a dict, the length a list had
    before it grew, or EVERYTHING) and joins `changed` at its first change. A
    container's `_changes` is not None exactly while it is in `changed`. A note is
    made after its change, under `lock`, and a persist takes the notes under it
    before it reads the values: a change made by another thread (a sync worker) is
    then either seen by this persist or noted for the next.
    """

    __slots__ = ("adopt", "changed", "dirty", "lock", "log")

    def __init__(self) -> None:
        self.dirty = False
        self.adopt = False
        """Something other than a leaf value was put in: watch the state's new parts too."""
        # `log` is set through `note_where`. Its lock and list are made the first time it goes
        # on: most states never keep deltas, and a cold start of 10,000 states made 20,000 of
        # each, every one more object for the collector to scan for as long as the state lives.
        self.log = False
        self.changed: list[Any] = _NOTHING_NOTED
        self.lock = _NO_NOTES

    def note_where(self, on: bool) -> None:
        """Turn the noting of where changes happen on or off (on: the next persist may write a delta).

        Called by the thread that owns the state, before the parts are watched with it on.
        """
        if on and self.lock is _NO_NOTES:
            self.lock = threading.Lock()
            self.changed = []
        self.log = on

    def forget_changes(self) -> list[tuple[Any, Any]]:
        """Each noted container with what it noted, all notes cleared (a persist takes them)."""
        if self.lock is _NO_NOTES:
            return []  # the log was never on: nothing can have been noted
        with self.lock:
            taken, self.changed = self.changed, []
            notes = []
            for container in taken:
                notes.append((container, container._changes))
                container._changes = None
        return notes

    def touched(self, value: Any) -> None:
        self.dirty = True
        if type(value) not in _LEAVES:
            self.adopt = True

    def grown(self) -> None:
        self.dirty = True
        self.adopt = True


EVERYTHING: Any = frozenset({"*everything*"})
"""A container's `_changes` when it changed in a way that is not noted key by key."""


def _note(container: Any, key: Any) -> None:
    """Note that `key` of a dict changed (the mark's log is on); called after the change."""
    mark = container._mark
    with mark.lock:
        changes = container._changes
        if changes is None:
            container._changes = {key}
            mark.changed.append(container)
        elif changes is not EVERYTHING:
            changes.add(key)


def _note_all(container: Any) -> None:
    """Note that a container changed as a whole (the mark's log is on); called after the change."""
    mark = container._mark
    with mark.lock:
        if container._changes is None:
            mark.changed.append(container)
        container._changes = EVERYTHING


def _note_growth(container: Any, before: int) -> None:
    """Note that a list grew at its end from length `before`: the shortest length noted is kept.

    Threads appending at once may note out of order; every item from the shortest
    length on is written, and an item written twice is written the same.
    """
    mark = container._mark
    with mark.lock:
        changes = container._changes
        if changes is None:
            container._changes = before
            mark.changed.append(container)
        elif type(changes) is int and before < changes:
            container._changes = before


def new_tracked(kind: type, plain: Any, mark: ChangeMark, at: tuple[Any, Any] | None) -> Any:
    """A tracked copy of `plain` watched by `mark`, held at `at` (parent container, key; None: the top)."""
    tracked = kind(plain)
    tracked._mark = mark
    tracked._at = at
    tracked._changes = None
    return tracked


class TrackedList(list[Any]):
    """A list that tells its state's mark when it changes; copies and pickles are plain lists."""

    __slots__ = ("_at", "_changes", "_mark")
    _mark: ChangeMark
    _at: tuple[Any, Any] | None
    _changes: Any

    def __setitem__(self, index: Any, value: Any) -> None:
        mark = self._mark
        mark.grown() if isinstance(index, slice) else mark.touched(value)
        super().__setitem__(index, value)
        if mark.log:
            _note_all(self)

    def __delitem__(self, index: Any) -> None:
        self._mark.dirty = True
        super().__delitem__(index)
        self._changed()

    def __iadd__(self, other: Any) -> Self:  # type: ignore[misc]
        self._mark.grown()
        before = len(self)
        result = super().__iadd__(other)
        if self._mark.log:
            _note_growth(self, before)
        return result

    def __imul__(self, n: SupportsIndex) -> Self:
        self._mark.dirty = True
        result = super().__imul__(n)
        self._changed()
        return result

    def append(self, value: Any) -> None:
        mark = self._mark
        mark.touched(value)
        before = len(self)
        super().append(value)
        if mark.log:
            _note_growth(self, before)

    def extend(self, values: Any) -> None:
        self._mark.grown()
        before = len(self)
        super().extend(values)
        if self._mark.log:
            _note_growth(self, before)

    def insert(self, index: SupportsIndex, value: Any) -> None:
        self._mark.touched(value)
        super().insert(index, value)
        self._changed()

    def pop(self, index: SupportsIndex = -1) -> Any:
        self._mark.dirty = True
        item = super().pop(index)
        self._changed()
        return item

    def remove(self, value: Any) -> None:
        self._mark.dirty = True
        super().remove(value)
        self._changed()

    def clear(self) -> None:
        self._mark.dirty = True
        super().clear()
        self._changed()

    def sort(self, *args: Any, **kwargs: Any) -> None:
        self._mark.dirty = True
        super().sort(*args, **kwargs)
        self._changed()

    def reverse(self) -> None:
        self._mark.dirty = True
        super().reverse()
        self._changed()

    def _changed(self) -> None:
        """After a change that removes or moves items: the list is noted as changed whole."""
        if self._mark.log:
            _note_all(self)

    def __copy__(self) -> list[Any]:
        return list(self)

    def __deepcopy__(self, memo: dict[int, Any]) -> list[Any]:
        import copy

        return [copy.deepcopy(v, memo) for v in self]

    def __reduce_ex__(self, protocol: SupportsIndex) -> Any:
        return (list, (list(self),))


class TrackedDict(dict[Any, Any]):
    """A dict (or a model's `__dict__`) that tells its state's mark when it changes."""

    __slots__ = ("_at", "_changes", "_mark")
    _mark: ChangeMark
    _at: tuple[Any, Any] | None
    _changes: Any

    def __setitem__(self, key: Any, value: Any) -> None:
        mark = self._mark
        mark.touched(value)
        super().__setitem__(key, value)
        if mark.log:
            _note(self, key)

    def __delitem__(self, key: Any) -> None:
        mark = self._mark
        mark.dirty = True
        super().__delitem__(key)
        if mark.log:
            _note(self, key)

    def __ior__(self, other: Any) -> Self:  # type: ignore[misc]
        self._mark.grown()
        result = super().__ior__(other)
        self._grown_by(other)
        return result

    def update(self, *args: Any, **kwargs: Any) -> None:
        self._mark.grown()
        super().update(*args, **kwargs)
        self._grown_by(args[0] if len(args) == 1 and not kwargs else None, kwargs)

    def _grown_by(self, other: Any, kwargs: dict[str, Any] | None = None) -> None:
        """After items were put in: from a mapping (their keys noted) or from anything else (noted whole)."""
        if self._mark.log:
            if kwargs and other is None:
                for key in kwargs:
                    _note(self, key)
            elif isinstance(other, dict) and not kwargs:
                for key in other:
                    _note(self, key)
            else:
                _note_all(self)

    def setdefault(self, key: Any, default: Any = None) -> Any:
        mark = self._mark
        mark.touched(default)
        value = super().setdefault(key, default)
        if mark.log:
            _note(self, key)
        return value

    def pop(self, *args: Any) -> Any:
        mark = self._mark
        mark.dirty = True
        value = super().pop(*args)
        if mark.log and args:
            _note(self, args[0])
        return value

    def popitem(self) -> tuple[Any, Any]:
        mark = self._mark
        mark.dirty = True
        item = super().popitem()
        if mark.log:
            _note(self, item[0])
        return item

    def clear(self) -> None:
        mark = self._mark
        mark.dirty = True
        super().clear()
        if mark.log:
            _note_all(self)

    def __copy__(self) -> dict[Any, Any]:
        return dict(self)

    def __deepcopy__(self, memo: dict[int, Any]) -> dict[Any, Any]:
        import copy

        return {copy.deepcopy(k, memo): copy.deepcopy(v, memo) for k, v in self.items()}

    def __reduce_ex__(self, protocol: SupportsIndex) -> Any:
        return (dict, (dict(self),))


class TrackedSet(set[Any]):
    """A set that tells its state's mark when it changes (its items are leaf values).

    A set is noted as changed whole: its JSON is an array, with no key to name an item by.
    """

    __slots__ = ("_at", "_changes", "_mark")
    _mark: ChangeMark
    _at: tuple[Any, Any] | None
    _changes: Any

    def _before(self, grown: bool = False) -> None:
        if grown:
            self._mark.grown()
        self._mark.dirty = True

    def _after(self) -> None:
        if self._mark.log:
            _note_all(self)

    def add(self, value: Any) -> None:
        self._mark.touched(value)
        super().add(value)
        self._after()

    def discard(self, value: Any) -> None:
        self._before()
        super().discard(value)
        self._after()

    def remove(self, value: Any) -> None:
        self._before()
        super().remove(value)
        self._after()

    def pop(self) -> Any:
        self._before()
        item = super().pop()
        self._after()
        return item

    def clear(self) -> None:
        self._before()
        super().clear()
        self._after()

    def update(self, *others: Any) -> None:
        self._before(grown=True)
        super().update(*others)
        self._after()

    def difference_update(self, *others: Any) -> None:
        self._before()
        super().difference_update(*others)
        self._after()

    def intersection_update(self, *others: Any) -> None:
        self._before()
        super().intersection_update(*others)
        self._after()

    def symmetric_difference_update(self, other: Any) -> None:
        self._before(grown=True)
        super().symmetric_difference_update(other)
        self._after()

    def __ior__(self, other: Any) -> Self:  # type: ignore[misc]
        self._before(grown=True)
        result = super().__ior__(other)
        self._after()
        return result

    def __iand__(self, other: Any) -> Self:  # type: ignore[misc]
        self._before()
        result = super().__iand__(other)
        self._after()
        return result

    def __isub__(self, other: Any) -> Self:  # type: ignore[misc]
        self._before()
        result = super().__isub__(other)
        self._after()
        return result

    def __ixor__(self, other: Any) -> Self:  # type: ignore[misc]
        self._before(grown=True)
        result = super().__ixor__(other)
        self._after()
        return result

    def __copy__(self) -> set[Any]:
        return set(self)

    def __deepcopy__(self, memo: dict[int, Any]) -> set[Any]:
        return set(self)  # the items are leaves

    def __reduce_ex__(self, protocol: SupportsIndex) -> Any:
        return (set, (set(self),))
