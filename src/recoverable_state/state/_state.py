"""RecoverableState: a value kept in a key-value store across restarts."""

from __future__ import annotations

import logging
import threading
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from datetime import timedelta
from types import TracebackType
from typing import Any, Generic, Literal, TypeVar, get_args

import anyio

from ..events import EventManager, EventPersistStateData
from ._collector import PAUSE_COLLECTOR_AT, collector_paused
from ._core import NO_STORE, StateCore, settings_for
from ._editing import EditGuard
from ._kvs import KeyValueStore, open_store
from ._schema import Migration
from ._slot import StateSlot
from ._sync_facade import SyncFacade

__all__ = ["DEFAULT_PERSISTENCE_TIMEOUT", "RecoverableState"]

TStateModel = TypeVar("TStateModel")

DEFAULT_PERSISTENCE_TIMEOUT = timedelta(seconds=60)
"""How long one load or save of a state may take, unless the state says otherwise."""

_editing_made = threading.Lock()


def _seconds(value: timedelta | float | None, name: str) -> float | None:
    if value is None:
        return None
    seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
    if not seconds > 0:
        raise ValueError(f"{name} must be more than 0 seconds (or None for no bound), not {value!r}")
    return seconds


def _check(
    persistence_enabled: object,
    sources: Sequence[object],
    history: int,
    change_detection: str,
    on_bad_record: str,
) -> None:
    """Refuse arguments no state can work with, naming the argument."""
    if persistence_enabled not in (True, False, "explicit_only"):
        raise ValueError(
            f"persistence_enabled must be True, False or 'explicit_only', not {persistence_enabled!r}"
        )
    if (sources[0] is not None) + (sources[1] is not None) + (sources[2] is not None) > 1:
        raise ValueError(
            "give at most one of persist_state_kvs_name, persist_state_kvs_id and persist_state_kvs_factory"
        )
    if history < 0:
        raise ValueError("history must be 0 or more")
    if change_detection not in ("track", "compare"):
        raise ValueError(f"change_detection must be 'track' or 'compare', not {change_detection!r}")
    if on_bad_record not in ("raise", "quarantine", "previous"):
        raise ValueError(f"on_bad_record must be 'raise', 'quarantine' or 'previous', not {on_bad_record!r}")
    if on_bad_record == "previous" and history < 1:
        raise ValueError("on_bad_record='previous' starts from the record's history: give history=1 or more")


class RecoverableState(SyncFacade, Generic[TStateModel]):
    """A value that survives restarts: loaded on start, saved on PERSIST_STATE.

    The value is a pydantic model, or anything pydantic can validate (a
    dataclass, a TypedDict, `dict[str, int]`, a list). `initialize()` loads the
    stored record (or a fresh default); with `persistence_enabled=True` the
    state then saves itself on every PERSIST_STATE its event manager emits, with
    `"explicit_only"` only when `persist_state()` is called, and with `False`
    never. A write happens only when the serialised value differs from what was
    last stored, only when it would load back equal (else UnrepresentableStateError),
    and only while this process still owns the record: a successor that loaded
    it since (after a migration) makes the next write fail with StateOwnershipLost.

    Warning:
        With `persistence_enabled=True` the state saves itself only while its
        event manager is entered (`async with manager`, or `run()`). Initializing
        before entering it is fine; if it is still not entered ten seconds later
        (and no PERSIST_STATE came), a warning says nothing is being saved
        automatically and shutdown signals are not handled.
    """

    def __init__(
        self,
        *,
        default_state: TStateModel | Callable[[], TStateModel],
        persist_state_key: str,
        persistence_enabled: bool | Literal["explicit_only"] = False,
        persist_state_kvs_name: str | None = None,
        persist_state_kvs_id: str | None = None,
        logger: logging.Logger | None = None,
        persist_state_kvs_factory: Callable[[], Awaitable[KeyValueStore]] | None = None,
        event_manager: EventManager | None = None,
        history: int = 0,
        migrations: Mapping[int, Migration] | None = None,
        on_bad_record: Literal["raise", "quarantine", "previous"] = "raise",
        persistence_timeout: timedelta | float | None = DEFAULT_PERSISTENCE_TIMEOUT,
        state_type: Any = None,
        change_detection: Literal["track", "compare"] = "track",
        deltas: bool = True,
    ) -> None:
        """Describe a state; nothing is read or registered until `initialize()`.

        Args:
            default_state: the value to start from when nothing is stored (deep-copied),
                or a zero-argument factory making it (called once on each start and reset).
            persist_state_key: the record key the state is stored under.
            persistence_enabled: True, "explicit_only" or False (see the class docstring).
            persist_state_kvs_name: the store to use, by name (created when missing).
            persist_state_kvs_id: the store to use, by id (must exist).
            logger: where to log; the package logger by default.
            persist_state_kvs_factory: an async callable returning the store to use.
            event_manager: the manager to listen on; the service locator's by default.
            history: keep this many snapshots of the record (0: keep none).
            migrations: `{k: fn}` turning stored JSON of schema version k into k + 1;
                the type declares its version as `schema_version: ClassVar[int]`.
            on_bad_record: what `initialize()` does with a record that is damaged (its
                checksum does not match), not JSON, or does not validate (after migrations):
                "raise" a RecordCorruptError (the record stays as it is); "quarantine": copy
                it to the store's quarantine store and start from the default state;
                "previous" (with `history` 1 or more): start from the newest snapshot of its
                history that loads, and copy the bad record aside. A record sealed with a key
                the ring lacks is never bad: RecordDecryptionError, the record left as it is.
            persistence_timeout: how long each load and each save may take (a timedelta
                or seconds; None: no bound); PersistenceTimeoutError names store and key.
                The final persist of `teardown()` and of a shutdown is bounded by the
                manager's close timeout instead.
            state_type: the type to validate stored values as; by default the default's
                class, `RecoverableState[T]`'s T, or a JSON dict or list.
            change_detection: how a persist tells that the value changed. "track" (the
                default) watches the lists, dicts, sets and models inside the value, so an
                unchanged state costs nothing to persist; a value with parts that cannot be
                watched (a dataclass, an unknown class) is compared as with "compare".
                "compare" serialises the value on every persist and compares the bytes:
                use it when the value is changed behind its containers' backs (by
                `heapq`'s functions, or by unbound calls such as `list.append(v, x)`).
            deltas: with "track", a state whose snapshot is 64 KiB or more writes what
                changed (a delta appended to its record) instead of the whole value, and a
                snapshot again once the deltas add up to the snapshot's size or number 100
                (see the guide on deltas). False: every persist writes the whole value.
                States with `history`, on a backend without deltas, or of a type that is
                not a watched model write whole values whatever this says.
        """
        sources = (persist_state_kvs_name, persist_state_kvs_id, persist_state_kvs_factory)
        _check(persistence_enabled, sources, history, change_detection, on_bad_record)
        factory = default_state if callable(default_state) else None
        store = (
            NO_STORE
            if persist_state_kvs_name is None and persist_state_kvs_id is None
            else (
                persist_state_kvs_name,
                persist_state_kvs_id,
            )
        )
        timeout = _seconds(persistence_timeout, "persistence_timeout")
        track = change_detection == "track"
        if not isinstance(deltas, bool):
            raise TypeError(f"deltas must be True or False, not {deltas!r}")
        settings = settings_for(history, migrations or {}, on_bad_record, timeout, track, deltas)
        self._core = StateCore(
            persist_state_key,
            default_state,
            factory,
            state_type,
            persistence_enabled,
            store,
            persist_state_kvs_factory,
            open_store,
            logger,
            event_manager,
            settings,
        )
        # The type is known now unless it must come from RecoverableState[T] (set after
        # __init__) or from calling a factory. Fixed here, a bad `migrations` or
        # `schema_version` is refused at once; the slot is made at initialize() either way.
        if (
            state_type is not None
            or isinstance(factory, type)
            or (factory is None and type(default_state) is not dict and type(default_state) is not list)
        ):
            self._core.fix_type()

    def _slot(self) -> StateSlot:
        """The core's slot, made with `RecoverableState[T]`'s T when that is how the type is given."""
        slot = self._core.slot
        if slot is None:
            args = get_args(getattr(self, "__orig_class__", None))
            slot = self._core.make_slot(args[0] if args and not isinstance(args[0], TypeVar) else None)
        return slot

    # -- reading -------------------------------------------------------------

    @property
    def current_value(self) -> TStateModel:
        """The live value; change it in place, it is persisted as it is."""
        if not self._core.has_value:
            raise RuntimeError(
                f"RecoverableState {self._core.key!r} is not initialized: "
                "call `await state.initialize()` (or use `async with`) first"
            )
        value: TStateModel = self._slot().hand_out()
        return value

    @property
    def is_initialized(self) -> bool:
        """Whether `initialize()` has run (and `teardown()` has not)."""
        return self._core.active

    @property
    def persist_state_key(self) -> str:
        """The record key the state is stored under."""
        return self._core.key

    @property
    def ownership_lost(self) -> bool:
        """Whether another process took this state over; it is then no longer persisted."""
        slot = self._core.slot
        return slot is not None and slot.lost

    async def has_persisted_state(self) -> bool:
        """Whether a record of this state is in the store."""
        self._slot()
        kvs = await self._core.open_kvs()
        return await kvs.record_exists(self._core.key)

    # -- lifecycle -----------------------------------------------------------

    async def initialize(self) -> TStateModel:
        """Load the stored state (or a fresh default) and start persisting it.

        Raises RecordCorruptError, naming the store, key and failing fields, when
        the stored record is not valid JSON or does not validate; the record is
        left as it is. Raises StateAlreadyInUseError when another live state in
        this process uses the same store and key.
        """
        await self.initialize_many([self])
        return self.current_value

    @staticmethod
    async def initialize_many(states: Sequence[RecoverableState[Any]]) -> None:
        """Initialize many states with one batched read per backend.

        The same as calling `initialize()` on each, but thousands of states cost
        one round trip instead of thousands. States that fail (a bad record, a
        record already in use) stay uninitialized; the others are ready. One
        failure is raised as it is; several as an ExceptionGroup.
        """
        # The slots are made here, with the collector paused for a big batch as for its load.
        with collector_paused(active=len(states) >= PAUSE_COLLECTOR_AT, settle=True):
            for state in states:
                if state._core.slot is None:
                    state._slot()
            errors = await StateCore.initialize_many([state._core for state in states])
        if len(errors) == 1:
            raise errors[0]
        if errors:
            raise ExceptionGroup(f"{len(errors)} of {len(states)} states failed to initialize", errors)

    async def persist_state(self, event_data: EventPersistStateData | None = None) -> None:
        """Store the current value now, if it changed since it was last stored.

        Returns once the write is durable. Raises UnrepresentableStateError (the
        stored record unchanged) when the value would not load back equal,
        StorageError (PersistenceTimeoutError past `persistence_timeout`) when the
        store failed, and StateOwnershipLost (and stops persisting this state)
        when another process has taken the record over.
        """
        await StateCore.persist_many([self._core])

    @staticmethod
    async def persist_many(states: Iterable[RecoverableState[Any]]) -> None:
        """Persist many states with one batched write per backend.

        What one PERSIST_STATE does for every state listening on a manager: each
        changed state is serialised in one pass and all of them are written in one
        batch, bounded by the smallest `persistence_timeout` among them. A state
        whose write is in flight is persisted after it. Every state is settled
        before the failures are raised: one as it is, several as an ExceptionGroup.
        """
        await StateCore.persist_many([state._core for state in states])

    async def reset(self) -> None:
        """Go back to the default state, in place, and clear the stored record.

        The object `initialize()` returned stays the live one: it is reset field
        by field (a dict or list is emptied and refilled), so later changes to it
        are persisted. Only a value that cannot change in place (an int, a tuple)
        is replaced; read `current_value` again for those.
        """
        self._slot()
        await self._core.reset()

    async def teardown(self) -> None:
        """Stop listening, persist one last time, and release the record in this process.

        The last persist is bounded by the event manager's close timeout (not by
        `persistence_timeout`); its failure (an unrepresentable value, a store
        error) is raised, after the record is released.
        """
        await self._core.teardown()

    def editing(self) -> EditGuard:
        """`with state.editing():` groups changes: no persist serialises the value while it is held.

        Re-entrant in one thread; a persist waits (without blocking the event loop)
        until the block ends, and the block waits at most one serialisation.
        Without it, a snapshot taken while another thread changes the value may
        hold some of a group of changes and not the rest (each field whole).
        """
        slot = self._slot()
        with _editing_made:
            if slot.editing is None:
                slot.editing = EditGuard()
            return slot.editing

    def _edit_guard(self) -> EditGuard | None:
        slot = self._core.slot
        return slot.editing if slot is not None else None

    async def __aenter__(self) -> TStateModel:
        return await self.initialize()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        with anyio.CancelScope(shield=True):
            await self.teardown()

    def __repr__(self) -> str:
        slot = self._core.slot
        return f"<RecoverableState {self._core.key!r} of {slot.codec.name if slot is not None else '?'}>"
