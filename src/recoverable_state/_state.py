"""RecoverableState: a value kept in a key-value store across restarts."""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from datetime import timedelta
from types import TracebackType
from typing import Any, Generic, Literal, TypeVar, get_args

import anyio

from ._codec import StateCodec, codec_for, describe_validation_error, infer_state_type
from ._editing import EditGuard, interrupts_held
from ._errors import (
    PersistenceTimeoutError,
    StateAlreadyInUseError,
    StateOwnershipLost,
    UnrepresentableStateError,
)
from ._locator import service_locator
from ._metrics import error_kinds
from ._schema import Migration, check_migrations, content_type_for, model_schema_version
from ._slot import StateSlot, Tally, load_slots, persist_slots, smallest_timeout
from ._sync import current_portal
from .events import (
    Event,
    EventManager,
    EventPersistedData,
    EventPersistStateData,
    EventStateOwnershipLostData,
)
from .storage import KeyValueStore, WriteOutcome, check_key

__all__ = ["RecoverableState", "describe_validation_error"]

TStateModel = TypeVar("TStateModel")

DEFAULT_PERSISTENCE_TIMEOUT = timedelta(seconds=60)
"""How long one load or save of a state may take, unless the state says otherwise."""

NOT_ENTERED_GRACE = 10.0
"""Seconds after which a state saving on PERSIST_STATE warns that its manager was never entered."""

_package_logger = logging.getLogger("recoverable_state")

FULL_COMPARE_EVERY = 10
"""Every this many PERSIST_STATE events, every state is serialised and compared, changed or not."""

_editing_made = threading.Lock()

_NAMED_FAILURES = 10
"""A failed batch logs a line for each of its first states, then one line for the rest."""

# Live states by (storage url, store id, key): two in one process would overwrite each other.
# Weak references, so a state dropped without teardown frees its record (a plain dict of
# refs: WeakValueDictionary's bookkeeping cost 2 us a state, measured over 10,000).
_owners: dict[tuple[str, str, str], weakref.ref[RecoverableState[Any]]] = {}


def _seconds(value: timedelta | float | None, name: str) -> float | None:
    if value is None:
        return None
    seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
    if not seconds > 0:
        raise ValueError(f"{name} must be more than 0 seconds (or None for no bound), not {value!r}")
    return seconds


class RecoverableState(Generic[TStateModel]):
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
        before entering it is fine; if it is still not entered `NOT_ENTERED_GRACE`
        seconds later (and no PERSIST_STATE came), a warning says nothing is being
        saved automatically and shutdown signals are not handled.
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
        on_bad_record: Literal["raise", "quarantine"] = "raise",
        persistence_timeout: timedelta | float | None = DEFAULT_PERSISTENCE_TIMEOUT,
        state_type: Any = None,
        change_detection: Literal["track", "compare"] = "track",
    ) -> None:
        """Describe a state; nothing is read or registered until `initialize()`.

        Args:
            default_state: the value to start from when nothing is stored (deep-copied),
                or a zero-argument factory making it (called on each start and reset).
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
            on_bad_record: what `initialize()` does with a record that is not JSON
                or does not validate (after migrations): "raise" a RecordCorruptError
                (the record stays as it is), or "quarantine": copy it to the store's
                quarantine store and start from the default state.
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
        """
        if persistence_enabled not in (True, False, "explicit_only"):
            raise ValueError(
                f"persistence_enabled must be True, False or 'explicit_only', not {persistence_enabled!r}"
            )
        sources = (persist_state_kvs_name, persist_state_kvs_id, persist_state_kvs_factory)
        if sum(x is not None for x in sources) > 1:
            raise ValueError(
                "give at most one of persist_state_kvs_name, persist_state_kvs_id "
                "and persist_state_kvs_factory"
            )
        if history < 0:
            raise ValueError("history must be 0 or more")
        if change_detection not in ("track", "compare"):
            raise ValueError(f"change_detection must be 'track' or 'compare', not {change_detection!r}")
        if on_bad_record not in ("raise", "quarantine"):
            raise ValueError(f"on_bad_record must be 'raise' or 'quarantine', not {on_bad_record!r}")
        self._default: Any = default_state
        self._factory: Callable[[], Any] | None = default_state if callable(default_state) else None
        self._state_type = state_type
        self._migrations = dict(migrations or {})
        self._on_bad_record = on_bad_record
        self._key = persist_state_key
        self._persistence_enabled = persistence_enabled
        self._kvs_name = persist_state_kvs_name
        self._kvs_id = persist_state_kvs_id
        self._kvs_factory = persist_state_kvs_factory
        self._log = logger or _package_logger
        self._event_manager = event_manager
        self._history = history
        self._timeout = _seconds(persistence_timeout, "persistence_timeout")
        self._track = change_detection == "track"

        self._slot: StateSlot | None = None
        self._has_value = False
        self._active = False  # initialized and not torn down
        self._listening_on: EventManager | None = None
        self._owner_key: tuple[str, str, str] | None = None
        # The type is known now unless it must come from RecoverableState[T] (set after
        # __init__) or from calling a factory: then at initialize().
        if state_type is not None or isinstance(self._factory, type) or (
            self._factory is None and not isinstance(default_state, dict | list)
        ):
            self._make_slot()

    # -- reading -------------------------------------------------------------

    @property
    def current_value(self) -> TStateModel:
        """The live value; change it in place, it is persisted as it is."""
        if not self._has_value:
            raise RuntimeError(
                f"RecoverableState {self._key!r} is not initialized: "
                "call `await state.initialize()` (or use `async with`) first"
            )
        assert self._slot is not None
        value: TStateModel = self._slot.hand_out()
        return value

    @property
    def is_initialized(self) -> bool:
        """Whether `initialize()` has run (and `teardown()` has not)."""
        return self._active

    @property
    def persist_state_key(self) -> str:
        """The record key the state is stored under."""
        return self._key

    @property
    def ownership_lost(self) -> bool:
        """Whether another process took this state over; it is then no longer persisted."""
        return self._slot is not None and self._slot.lost

    async def has_persisted_state(self) -> bool:
        """Whether a record of this state is in the store."""
        kvs = await self._open_kvs()
        return await kvs.record_exists(self._key)

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
        errors: list[Exception] = []
        loading: list[RecoverableState[Any]] = []
        claimed: set[tuple[str, str, str]] = set()
        stores: dict[tuple[str | None, str | None], KeyValueStore] = {}  # opened once per call
        for state in states:
            try:
                ready = state._claim_in_known_store(stores, claimed)  # no await for the usual state
                if ready is None:
                    ready = await state._claim_for_loading(stores, claimed)
                if ready:
                    loading.append(state)
            except Exception as exc:
                errors.append(exc)
        if loading:
            slots = [state._loading_slot() for state in loading]
            try:
                results = await load_slots(
                    slots, [state._fresh_default for state in loading], smallest_timeout(slots)
                )
            except BaseException:
                for state in loading:
                    state._release_owner()
                raise
            begun: list[RecoverableState[Any]] = []
            for state, error in zip(loading, results, strict=True):
                if error is None:
                    begun.append(state)
                else:
                    state._release_owner()
                    errors.append(error)
            RecoverableState._begin_many(begun)
        if len(errors) == 1:
            raise errors[0]
        if errors:
            raise ExceptionGroup(f"{len(errors)} of {len(states)} states failed to initialize", errors)

    def _claim_in_known_store(
        self,
        stores: dict[tuple[str | None, str | None], KeyValueStore],
        claimed: set[tuple[str, str, str]],
    ) -> bool | None:
        """`_claim_for_loading` for a state whose store this call has opened already; None otherwise."""
        if self._active or not self._persistence_enabled or self._kvs_factory is not None:
            return None
        kvs = stores.get((self._kvs_name, self._kvs_id))
        if kvs is None:
            return None
        self._make_slot().kvs = kvs
        self._take_owner(kvs, claimed)
        return True

    async def _claim_for_loading(
        self,
        stores: dict[tuple[str | None, str | None], KeyValueStore],
        claimed: set[tuple[str, str, str]],
    ) -> bool:
        """Get ready to load: True when the record must be read, False when there is nothing to do.

        The state's store is opened here (a state of a store already in `stores` takes
        `_claim_in_known_store` instead).
        """
        if self._active:
            return False
        slot = self._make_slot()
        if not self._persistence_enabled:
            slot.take(self._fresh_default(), synced=False)
            self._begin()
            return False
        kvs = await self._open_kvs()
        if self._kvs_factory is None:
            stores.setdefault((self._kvs_name, self._kvs_id), kvs)
        self._take_owner(kvs, claimed)
        return True

    def _loading_slot(self) -> StateSlot:
        assert self._slot is not None
        assert self._slot.kvs is not None
        return self._slot

    def _make_slot(self) -> StateSlot:
        """The store side of this state, made once its type is known."""
        if self._slot is not None:
            return self._slot
        state_type = self._state_type
        if state_type is None:
            args = get_args(getattr(self, "__orig_class__", None))
            if args and not isinstance(args[0], TypeVar):
                state_type = args[0]
        if state_type is None:
            if isinstance(self._factory, type):
                state_type = self._factory
            else:
                sample = self._factory() if self._factory is not None else self._default
                state_type = infer_state_type(sample)
        try:
            codec = codec_for(state_type)
        except TypeError:  # an unhashable type annotation
            codec = StateCodec(state_type)
        schema_version = model_schema_version(state_type)
        check_migrations(schema_version, self._migrations)
        self._slot = StateSlot(
            key=self._key,
            codec=codec,
            content_type=content_type_for(schema_version),
            schema_version=schema_version,
            migrations=self._migrations,
            on_bad_record=self._on_bad_record,
            history=self._history,
            timeout=self._timeout,
            log=self._log,
            on_lost=_LostHandler(self),
            track=self._track,
        )
        return self._slot

    def _fresh_default(self) -> Any:
        if self._factory is not None:
            return self._factory()
        assert self._slot is not None
        return self._slot.codec.copy(self._default)

    def _take_owner(self, kvs: KeyValueStore, claimed: set[tuple[str, str, str]]) -> None:
        """Check the key, and make this state its record's one user in this process."""
        check_key(self._key, store=kvs.label)
        owner_key = (kvs.storage.url, kvs.id, self._key)
        ref = _owners.get(owner_key)
        other = ref() if ref is not None else None
        if (other is not None and other is not self) or owner_key in claimed:
            raise StateAlreadyInUseError(
                f"store {kvs.label!r}, key {self._key!r}: another RecoverableState in this "
                "process already uses this record; share that one, or tear it down first"
            )
        claimed.add(owner_key)
        _owners[owner_key] = weakref.ref(self)
        self._owner_key = owner_key

    def _begin(self) -> None:
        """The value is loaded: persist it from now on (on PERSIST_STATE when enabled)."""
        self._begin_many([self])

    @staticmethod
    def _begin_many(states: Sequence[RecoverableState[Any]]) -> None:
        """`_begin` for many states, joining each manager's persist group once."""
        joining: dict[EventManager, dict[StateSlot, RecoverableState[Any]]] = {}
        default_manager: EventManager | None = None
        for state in states:
            slot = state._slot
            assert slot is not None
            state._has_value = True
            state._active = True
            slot.enabled = bool(state._persistence_enabled)
            if state._persistence_enabled is True:
                manager = state._event_manager
                if manager is None:
                    manager = default_manager = default_manager or service_locator.get_event_manager()
                joining.setdefault(manager, {})[slot] = state
                state._listening_on = manager
        for manager, members in joining.items():
            _PersistGroup.of(manager).add(members)

    def _ownership_lost(self, error: StateOwnershipLost) -> None:
        manager = self._listening_on
        counted_by = manager or self._event_manager
        if counted_by is not None:
            counted_by.record_ownership_loss()
        self._stop_listening()
        if manager is not None and manager.active:
            manager.emit(
                event=Event.STATE_OWNERSHIP_LOST,
                event_data=EventStateOwnershipLostData(store=error.store or "", key=self._key),
            )

    async def persist_state(self, event_data: EventPersistStateData | None = None) -> None:
        """Store the current value now, if it changed since it was last stored.

        Returns once the write is durable. Raises UnrepresentableStateError (the
        stored record unchanged) when the value would not load back equal,
        StorageError (PersistenceTimeoutError past `persistence_timeout`) when the
        store failed, and StateOwnershipLost (and stops persisting this state)
        when another process has taken the record over.
        """
        await self.persist_many([self])

    @staticmethod
    async def persist_many(states: Iterable[RecoverableState[Any]]) -> None:
        """Persist many states with one batched write per backend.

        What one PERSIST_STATE does for every state listening on a manager: each
        changed state is serialised in one pass and all of them are written in one
        batch, bounded by the smallest `persistence_timeout` among them. A state
        whose write is in flight is persisted after it. Every state is settled
        before the failures are raised: one as it is, several as an ExceptionGroup.
        """
        slots = [slot for state in states if (slot := state._slot) is not None]
        # Asked for by the worker: compare every state, whether a change was seen or not.
        errors = await persist_slots(slots, smallest_timeout(slots), full=True)
        if len(errors) == 1:
            raise errors[0]
        if errors:
            raise ExceptionGroup(f"{len(errors)} states were not persisted", errors)

    async def reset(self) -> None:
        """Go back to the default state, in place, and clear the stored record.

        The object `initialize()` returned stays the live one: it is reset field
        by field (a dict or list is emptied and refilled), so later changes to it
        are persisted. Only a value that cannot change in place (an int, a tuple)
        is replaced; read `current_value` again for those.
        """
        slot = self._make_slot()
        fresh = self._fresh_default()
        slot.value = slot.codec.reset_in_place(slot.value, fresh) if self._has_value else fresh
        del fresh  # watching the reset value counts who holds its parts
        slot.changed()
        self._has_value = True
        if not self._persistence_enabled or not self._active:
            return
        kvs = await self._open_kvs()
        async with slot.gate:
            with anyio.move_on_after(slot.timeout) as scope:
                try:
                    if slot.in_doubt is not None:
                        slot.resolve(await kvs.get_record(self._key))
                    deleted = await kvs.delete_record(self._key, expected_version=slot.version)
                    if not deleted and slot.version:
                        record = await kvs.get_record(self._key)
                        if record is not None:
                            lost = slot.settle(WriteOutcome(False, record.version), b"")
                            assert lost is not None
                            raise lost
                except anyio.get_cancelled_exc_class():
                    slot.in_doubt = b""  # a delete in doubt: `resolve` takes an absent record as done
                    raise
                slot.version, slot.stored, slot.in_doubt = 0, None, None
            if scope.cancelled_caught:
                slot.in_doubt = b""
                raise PersistenceTimeoutError(
                    f"clearing the record took longer than the persistence_timeout of {slot.timeout:g} s",
                    store=kvs.label,
                    key=self._key,
                )

    async def teardown(self) -> None:
        """Stop listening, persist one last time, and release the record in this process.

        The last persist is bounded by the event manager's close timeout (not by
        `persistence_timeout`); its failure (an unrepresentable value, a store
        error) is raised, after the record is released.
        """
        if not self._active:
            return
        self._stop_listening()
        slot = self._slot
        assert slot is not None
        try:
            manager = self._event_manager or service_locator.get_event_manager()
            errors = await persist_slots([slot], manager.close_timeout.total_seconds(), full=True)
            if errors:
                raise errors[0]
        finally:
            self._release_owner()
            self._active = False
            slot.enabled = False

    def _stop_listening(self) -> None:
        if self._listening_on is not None:
            assert self._slot is not None
            _PersistGroup.of(self._listening_on).discard(self._slot)
            self._listening_on = None

    def _release_owner(self) -> None:
        if self._owner_key is not None:
            ref = _owners.get(self._owner_key)
            if ref is not None and ref() in (self, None):
                del _owners[self._owner_key]
        self._owner_key = None

    async def _open_kvs(self) -> KeyValueStore:
        slot = self._make_slot()
        if slot.kvs is None:
            if self._kvs_factory is not None:
                slot.kvs = await self._kvs_factory()
            else:
                slot.kvs = await KeyValueStore.open(name=self._kvs_name, id=self._kvs_id)
        return slot.kvs

    async def __aenter__(self) -> TStateModel:
        return await self.initialize()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with anyio.CancelScope(shield=True):
            await self.teardown()

    # -- from sync code, inside run_sync() ---------------------------------------

    def __enter__(self) -> TStateModel:
        """`with RecoverableState(...) as value:` in a run_sync() worker: initialize() through its loop."""
        portal = current_portal("`with RecoverableState(...)`")
        with interrupts_held():  # a WorkerInterrupted waits until the state is loaded
            value = portal.call(self.initialize)
        self.editing()  # made before the worker's first change, so no snapshot can miss it
        return value

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        portal = current_portal("`with RecoverableState(...)`")
        with interrupts_held():  # the last persist of this state is not abandoned halfway
            portal.call(self.teardown)

    def persist_state_sync(self) -> None:
        """`persist_state()` for sync code inside run_sync(): returns once the write is durable."""
        guard = self._slot.editing if self._slot is not None else None
        if guard is not None and guard.held_here:
            raise RuntimeError(
                f"key {self._key!r}: persist_state_sync() inside `with state.editing():` would wait for "
                "itself; persist after the block"
            )
        portal = current_portal("persist_state_sync()")
        with interrupts_held():
            portal.call(self.persist_state)

    def editing(self) -> EditGuard:
        """`with state.editing():` groups changes: no persist serialises the value while it is held.

        Re-entrant in one thread; a persist waits (without blocking the event loop)
        until the block ends, and the block waits at most one serialisation.
        Without it, a snapshot taken while another thread changes the value may
        hold some of a group of changes and not the rest (each field whole).
        """
        slot = self._make_slot()
        with _editing_made:
            if slot.editing is None:
                slot.editing = EditGuard()
            return slot.editing

    def __repr__(self) -> str:
        name = self._slot.codec.name if self._slot is not None else "?"
        return f"<RecoverableState {self._key!r} of {name}>"


def _name_unsaved(slots: Sequence[StateSlot], why: str) -> None:
    """Log the states whose last write is in doubt (the first _NAMED_FAILURES, then a count)."""
    failed = [slot for slot in slots if slot.in_doubt is not None]
    for slot in failed[:_NAMED_FAILURES]:
        _package_logger.error(
            "store %r, key %r: not persisted: %s", slot.label, slot.key, why, extra=slot.log_fields
        )
    if len(failed) > _NAMED_FAILURES:
        _package_logger.error("and %d more states not persisted: %s", len(failed) - _NAMED_FAILURES, why)


class _LostHandler:
    """Tells a state it lost its record, through a weak reference: a state and its slot then
    hold no cycle, so a dropped state is freed by reference counting alone (also while the
    collector is paused). The weak reference is the one `_owners` holds already (CPython shares it)."""

    __slots__ = ("_state",)

    def __init__(self, state: RecoverableState[Any]) -> None:
        self._state = weakref.ref(state)

    def __call__(self, error: StateOwnershipLost) -> None:
        state = self._state()
        if state is not None:
            state._ownership_lost(error)


class _PersistGroup:
    """The one PERSIST_STATE listener of a manager, persisting all its states in a batch.

    Thousands of states listening one by one would each cost a task, a lock
    round and a storage round trip; together they cost one pass and one batch.
    """

    _groups: weakref.WeakKeyDictionary[EventManager, _PersistGroup] = weakref.WeakKeyDictionary()
    _last: tuple[weakref.ref[EventManager], _PersistGroup] | None = None

    def __init__(self, manager: EventManager) -> None:
        self._manager = weakref.ref(manager)  # a strong one would keep the manager alive forever
        # Each listening state's slot, and the state: held here, it stays alive while it listens.
        self._slots: dict[StateSlot, RecoverableState[Any]] = {}
        self._heard = False  # a PERSIST_STATE came: the manager was entered
        self._ticks = 0  # PERSIST_STATE events heard
        self._watch: threading.Timer | None = None
        # The members' smallest persistence_timeout (None: to be found again after a member left).
        self._timeout: tuple[float | None] | None = (None,)

    @classmethod
    def of(cls, manager: EventManager) -> _PersistGroup:
        """The group of a manager (the last one asked for is remembered: states come in crowds)."""
        last = cls._last
        if last is not None and last[0]() is manager:
            return last[1]
        group = cls._groups.get(manager)
        if group is None:
            group = cls._groups[manager] = cls(manager)
        cls._last = (group._manager, group)
        return group

    def add(self, members: dict[StateSlot, RecoverableState[Any]]) -> None:
        """Listen for these states (slot -> state) from now on."""
        manager = self._manager()
        # Registered once per manager; again after a last exit forgot a registration made while entered.
        listening = manager is not None and manager.is_listening(
            event=Event.PERSIST_STATE, listener=self.persist_all
        )
        if manager is not None and not listening:
            manager.on(event=Event.PERSIST_STATE, listener=self.persist_all)
            if not manager.active and not self._heard and self._watch is None:
                key = next(iter(members)).key
                self._watch = threading.Timer(NOT_ENTERED_GRACE, self._warn_if_never_entered, (key,))
                self._watch.daemon = True
                self._watch.start()
        self._slots.update(members)
        if self._timeout is not None:  # kept up to date without a pass over every member
            old, new = self._timeout[0], smallest_timeout(members)
            self._timeout = (new if old is None else old if new is None else min(old, new),)

    def discard(self, slot: StateSlot) -> None:
        self._slots.pop(slot, None)
        self._timeout = None
        manager = self._manager()
        if not self._slots and manager is not None:
            manager.off(event=Event.PERSIST_STATE, listener=self.persist_all)

    def describe_unfinished(self) -> list[str]:
        """The states whose write is still under way, for the manager's log when it leaves it behind."""
        busy = [slot for slot in self._slots if slot.gate.busy]
        named = [f"store {slot.label!r}, key {slot.key!r}" for slot in busy[:_NAMED_FAILURES]]
        if len(busy) > _NAMED_FAILURES:
            named.append(f"and {len(busy) - _NAMED_FAILURES} more states")
        return named

    def _warn_if_never_entered(self, key: str) -> None:
        # Runs in the timer's thread: reads flags only, and logs.
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

    async def persist_all(self, event_data: EventPersistStateData | None = None) -> None:
        """Persist every state of this manager that changed; log what failed."""
        self._heard = True
        slots = list(self._slots)
        # A shutdown's persist is bounded by the manager's close timeout alone.
        migrating = event_data is not None and event_data.is_migrating
        if self._timeout is None:
            self._timeout = (smallest_timeout(slots),)
        started, tally = time.perf_counter(), Tally()
        # Every FULL_COMPARE_EVERY-th tick, and before a move or stop, every state is compared
        # whether a change was seen or not: a change made behind the watched containers' backs
        # (heapq, unbound list methods) is saved then at the latest.
        self._ticks += 1
        full = migrating or self._ticks % FULL_COMPARE_EVERY == 0
        try:
            timeout = None if migrating else self._timeout[0]
            errors = await persist_slots(slots, timeout, full=full, tally=tally)
        except BaseException as exc:  # cancelled at the close timeout, or a bug: a failed persist
            self._count(tally, [exc], time.perf_counter() - started, migrating)
            _name_unsaved(slots, "interrupted before it was known to be stored")
            raise
        self._count(tally, errors, time.perf_counter() - started, migrating)
        for error in errors:
            if isinstance(error, StateOwnershipLost | UnrepresentableStateError):
                continue  # logged already
            if getattr(error, "key", None) is not None:
                store, key = getattr(error, "store", None), getattr(error, "key", None)
                _package_logger.error("not persisted: %s", error, extra={"store": store, "key": key})
                continue
            # A whole batch failed: name the states it held (their writes are now in doubt).
            _name_unsaved(slots, str(error))

    def _count(
        self,
        tally: Tally,
        errors: Sequence[BaseException],
        took: float,
        migrating: bool,
    ) -> None:
        """Hand the manager this persist's figures (for `manager.stats`, OpenTelemetry and PERSISTED)."""
        manager = self._manager()
        if manager is None:
            return
        manager.record_persist(
            EventPersistedData(
                duration=timedelta(seconds=took),
                states_written=tally.states,
                bytes_written=tally.bytes,
                failures=error_kinds(errors),
                is_migrating=migrating,
            )
        )
