"""The PERSIST_STATE listener of a manager: all its states persisted in one pass and one batch.

Thousands of states listening one by one would each cost a task, a lock round
and a storage round trip; together they cost one pass and one batch. A
manager's group is registered on it as one listener, and the manager's
registry is what keeps the group alive: when the manager forgets it (its last
exit forgets what was registered while entered) or is itself dropped, the
group and the states it held go with it, unless the user still holds them. The
group answers each PERSIST_STATE with its figures (`EventPersistedData`), which
the manager counts and emits as PERSISTED; it never calls the manager for that.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from .._errors import StateOwnershipLost, UnrepresentableStateError
from .._metrics import error_kinds
from ..events import Event, EventManager, EventPersistedData, EventPersistStateData
from ._engine import persist_slots
from ._slot import StateSlot, Tally, smallest_timeout

_package_logger = logging.getLogger("recoverable_state")

NOT_ENTERED_GRACE = 10.0
"""Seconds after which a state saving on PERSIST_STATE warns that its manager was never entered."""

FULL_COMPARE_EVERY = 10
"""Every this many PERSIST_STATE events, every state is serialised and compared, changed or not."""

NAMED_FAILURES = 10
"""A failed batch logs a line for each of its first states, then one line for the rest."""

# The group of each manager, held weakly both ways: the manager's listener registry owns it.
_groups: weakref.WeakKeyDictionary[EventManager, weakref.ref[PersistGroup]] = weakref.WeakKeyDictionary()


def group_of(manager: EventManager) -> PersistGroup:
    """The group of `manager`, made on first use (or again after the manager forgot the last one)."""
    ref = _groups.get(manager)
    group = ref() if ref is not None else None
    if group is None or not group.registered:
        group = PersistGroup(manager)
        _groups[manager] = weakref.ref(group)
    return group


def name_unsaved(slots: Sequence[StateSlot], why: str) -> None:
    """Log the states whose last write is in doubt (the first NAMED_FAILURES, then a count)."""
    failed = [slot for slot in slots if slot.in_doubt is not None]
    for slot in failed[:NAMED_FAILURES]:
        _package_logger.error(
            "store %r, key %r: not persisted: %s", slot.label, slot.key, why, extra=slot.log_fields
        )
    if len(failed) > NAMED_FAILURES:
        _package_logger.error("and %d more states not persisted: %s", len(failed) - NAMED_FAILURES, why)


class PersistGroup:
    """The one PERSIST_STATE listener of a manager, persisting every member state in a batch."""

    def __init__(self, manager: EventManager) -> None:
        self._manager = weakref.ref(manager)
        # Each member's slot, and its owner (held here: a state stays alive while it listens).
        self._slots: dict[StateSlot, Any] = {}
        # The members in a list, kept as they join, so that it grows old with them. A list
        # made afresh for each persist would be young while 100,000 states are written, and
        # the collector's next young pass would visit every state through it (5-6 ms each).
        # A persist holds the list (`_lent`): a member joining then gets the group a new one.
        self._members: list[StateSlot] | None = []
        self._lent: list[StateSlot] | None = None
        self._lending = 0  # persists under way holding `_lent`
        self._heard = False  # a PERSIST_STATE came: the manager was entered
        self._ticks = 0  # PERSIST_STATE events heard
        self._watch: threading.Timer | None = None
        # The members' smallest persistence_timeout (None: to be found again after a member left).
        self._timeout: tuple[float | None] | None = (None,)

    @property
    def manager(self) -> EventManager | None:
        """The manager this group listens on (None once it is gone)."""
        return self._manager()

    @property
    def registered(self) -> bool:
        """Whether the manager still calls this group on PERSIST_STATE."""
        manager = self._manager()
        return manager is not None and manager.is_listening(
            event=Event.PERSIST_STATE, listener=self.persist_all
        )

    def add(self, members: dict[StateSlot, Any]) -> None:
        """Persist these states (slot -> its owner) on every PERSIST_STATE from now on."""
        manager = self._manager()
        if manager is not None and not self.registered:
            manager.on(event=Event.PERSIST_STATE, listener=self.persist_all)
            if not manager.active and not self._heard and self._watch is None:
                key = next(iter(members)).key
                self._watch = threading.Timer(
                    NOT_ENTERED_GRACE, _warn_if_never_entered, (weakref.ref(self), key)
                )
                self._watch.daemon = True
                self._watch.start()
        if self._members is not None:
            fresh = [slot for slot in members if slot not in self._slots]
            if self._members is self._lent:
                self._members = [*self._members, *fresh]
            else:
                self._members += fresh
        self._slots.update(members)
        if self._timeout is not None:  # kept up to date without a pass over every member
            old, new = self._timeout[0], smallest_timeout(members)
            self._timeout = (new if old is None else old if new is None else min(old, new),)

    def discard(self, slot: StateSlot) -> None:
        """Stop persisting this state."""
        if self._slots.pop(slot, None) is not None:
            self._members = None  # made again at the next persist
        self._timeout = None
        manager = self._manager()
        if not self._slots and manager is not None:
            manager.off(event=Event.PERSIST_STATE, listener=self.persist_all)

    def describe_unfinished(self) -> list[str]:
        """The states whose write is still under way (`ReportsUnfinished`: the manager logs them)."""
        busy = [slot for slot in self._slots if slot.gate.busy]
        named = [f"store {slot.label!r}, key {slot.key!r}" for slot in busy[:NAMED_FAILURES]]
        if len(busy) > NAMED_FAILURES:
            named.append(f"and {len(busy) - NAMED_FAILURES} more states")
        return named

    def warn_if_never_entered(self, key: str) -> None:
        """Runs in the timer's thread: reads flags only, and logs."""
        manager = self._manager()
        if manager is None or manager.active or self._heard or not self._slots:
            return
        _package_logger.warning(
            "%d state(s) (key %r among them) have persistence_enabled=True, but their event "
            "manager was not entered within %g s: nothing is saved automatically and shutdown "
            "signals are not handled. Enter it (`async with manager:` or recoverable_state.run()), "
            "or use persistence_enabled='explicit_only' and call persist_state()",
            len(self._slots),
            key,
            NOT_ENTERED_GRACE,
        )

    async def persist_all(self, event_data: EventPersistStateData | None = None) -> EventPersistedData:
        """Persist every member that changed; log what failed; return this persist's figures."""
        self._heard = True
        if self._members is None:
            self._members = list(self._slots)
        slots = self._lent = self._members  # never changed while lent: see __init__
        migrating = event_data is not None and event_data.is_migrating
        if self._timeout is None:
            self._timeout = (smallest_timeout(slots),)
        started, tally = time.perf_counter(), Tally()
        # Every FULL_COMPARE_EVERY-th tick, and before a move or stop, every state is compared
        # whether a change was seen or not: a change made behind the watched containers' backs
        # (heapq, unbound list methods) is saved then at the latest.
        self._ticks += 1
        full = migrating or self._ticks % FULL_COMPARE_EVERY == 0
        self._lending += 1
        try:
            # A shutdown's persist is bounded by the manager's close timeout alone.
            errors = await persist_slots(
                slots, None if migrating else self._timeout[0], full=full, tally=tally
            )
        except BaseException:  # cancelled at the close timeout, or a bug: a failed persist
            name_unsaved(slots, "interrupted before it was known to be stored")
            raise
        finally:
            self._lending -= 1
            if not self._lending:  # let go: a list replaced meanwhile (and the slots of states gone) is freed
                self._lent = None
        _log_failures(errors, slots)
        return EventPersistedData(
            duration=timedelta(seconds=time.perf_counter() - started),
            states_written=tally.states,
            bytes_written=tally.bytes,
            failures=error_kinds(errors),
            is_migrating=migrating,
        )


def _warn_if_never_entered(group: weakref.ref[PersistGroup], key: str) -> None:
    alive = group()
    if alive is not None:
        alive.warn_if_never_entered(key)


def _log_failures(errors: Sequence[Exception], slots: Sequence[StateSlot]) -> None:
    for error in errors:
        if isinstance(error, StateOwnershipLost | UnrepresentableStateError):
            continue  # logged already
        if getattr(error, "key", None) is not None:
            store, key = getattr(error, "store", None), getattr(error, "key", None)
            _package_logger.error("not persisted: %s", error, extra={"store": store, "key": key})
            continue
        # A whole batch failed: name the states it held (their writes are now in doubt).
        name_unsaved(slots, str(error))
