"""The live-key registry: which state of this process uses each record.

Two live states on one record in one process would overwrite each other's
progress, so the second is refused (StateAlreadyInUseError). A process has one
such registry. It holds its states weakly: a state that can no longer persist
(torn down, or dropped by the user after its manager went away) frees its key,
so a later run in the same process uses the same keys. (A state nobody references
may wait for the cyclic collector, when its manager and it refer to each other: a
conflict collects once before it is raised.)
"""

from __future__ import annotations

import gc
import weakref
from typing import Any

from .._errors import StateAlreadyInUseError

OwnerKey = tuple[str, str, str]
"""A record's place, process-wide: (storage URL, store id, key)."""

# A plain dict of weak references without callbacks (WeakValueDictionary's bookkeeping cost
# 2 us a state, measured over 10,000; CPython shares a callback-less reference with every other
# one to the same object). Dead entries are swept when the dict has doubled since the last sweep.
_owners: dict[OwnerKey, weakref.ref[Any]] = {}
_SWEEP_FROM = 1024
_sweep_at = _SWEEP_FROM


def take(owner_key: OwnerKey, owner: object, claimed: set[OwnerKey], *, store: str) -> None:
    """Make `owner` the one user of the record in this process; `claimed` holds this batch's keys.

    Raises StateAlreadyInUseError when another live owner, or another state of the
    same batch, uses the record.
    """
    other = _live_owner(owner_key)
    if other is not None and other is not owner:
        # An owner nobody references may still wait for the collector (a manager and its
        # states refer to each other): collect once before calling the record taken.
        del other  # this frame must not be what keeps it alive
        gc.collect()
        other = _live_owner(owner_key)
    if (other is not None and other is not owner) or owner_key in claimed:
        raise StateAlreadyInUseError(
            f"store {store!r}, key {owner_key[2]!r}: another RecoverableState in this "
            "process already uses this record; share that one, or tear it down first"
        )
    claimed.add(owner_key)
    _owners[owner_key] = weakref.ref(owner)
    if len(_owners) >= _sweep_at:
        _sweep()


def _live_owner(owner_key: OwnerKey) -> Any:
    ref = _owners.get(owner_key)
    return ref() if ref is not None else None


def release(owner_key: OwnerKey, owner: object) -> None:
    """`owner` no longer uses the record (torn down, or it failed to load)."""
    ref = _owners.get(owner_key)
    if ref is not None and ref() in (owner, None):
        del _owners[owner_key]


def in_use() -> int:
    """How many records live states of this process use (for tests and diagnostics)."""
    return sum(1 for ref in list(_owners.values()) if ref() is not None)


def _sweep() -> None:
    """Drop the entries of owners that are gone; sweep again when the dict has doubled."""
    global _sweep_at
    for owner_key in [k for k, ref in _owners.items() if ref() is None]:
        del _owners[owner_key]
    _sweep_at = max(_SWEEP_FROM, 2 * len(_owners))
