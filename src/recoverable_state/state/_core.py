"""One state's life: where it is stored, and how it loads, persists, resets and ends.

`StateCore` is what a `RecoverableState` (and an auto-saved value) is made of:
the settings it was given, its `StateSlot` once its type is known, its claim on
its record in this process, and its membership of its manager's persist group.
Every load, write and delete goes through the engine (`_engine.py`).
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, Literal

from .._errors import StateOwnershipLost
from ..events import Event, EventManager, EventStateOwnershipLostData, default_event_manager
from ..storage import KeyValueStore, check_key
from . import _ownership
from ._codec import StateCodec, codec_for, infer_state_type
from ._engine import clear_slot, load_slots, persist_slots
from ._scheduler import PersistGroup, group_of, name_unsaved
from ._schema import Migration, check_migrations, content_type_for, model_schema_version
from ._slot import SlotSettings, StateSlot, smallest_timeout

_package_logger = logging.getLogger("recoverable_state")

OpenStore = Callable[[str | None, str | None], Awaitable[KeyValueStore]]
"""Opens a store by name or id (the front door's KeyValueStore.open)."""

StoreKey = tuple[str | None, str | None]


class StateCore:
    """The working part of one state (see the module docstring)."""

    __slots__ = (
        "__weakref__",
        "_default",
        "_factory",
        "_group",
        "_kind",
        "_kvs_factory",
        "_log",
        "_open_store",
        "_owner_key",
        "_sample",
        "_settings",
        "_state_type",
        "_store",
        "active",
        "event_manager",
        "has_value",
        "key",
        "persistence_enabled",
        "slot",
    )

    def __init__(
        self,
        key: str,
        default: Any,
        factory: Callable[[], Any] | None,
        state_type: Any,
        persistence_enabled: bool | Literal["explicit_only"],
        store: StoreKey,
        kvs_factory: Callable[[], Awaitable[KeyValueStore]] | None,
        open_store: OpenStore,
        log: logging.Logger | None,
        event_manager: EventManager | None,
        settings: SlotSettings,
    ) -> None:
        # Positional, and shared where states share them (`store`, `settings`): ten thousand
        # states made in a loop cost ten thousand of these, and every object made wakes the
        # collector sooner.
        self.key = key
        self.persistence_enabled = persistence_enabled
        self.event_manager = event_manager
        self.slot: StateSlot | None = None
        self.has_value = False
        self.active = False  # initialized and not torn down
        self._default = default
        self._factory = factory
        self._sample: list[Any] | None = None  # a factory's product made to learn the type
        self._state_type = state_type
        self._store = store
        self._kvs_factory = kvs_factory
        self._open_store = open_store
        self._log = log or _package_logger
        self._settings = settings
        self._group: weakref.ref[PersistGroup] | None = None
        self._owner_key: _ownership.OwnerKey | None = None
        self._kind: tuple[StateCodec, int | None] | None = None  # fixed by the constructor, if it could

    # -- the slot ------------------------------------------------------------

    def make_slot(self, type_hint: Any = None) -> StateSlot:
        """The store side of this state, made once its type is known (the T of `RecoverableState[T]`)."""
        if self.slot is not None:
            return self.slot
        codec, schema_version = self._kind or _kind_of(self._type_of(type_hint), self._settings[1])
        # A weak reference back: a core and its slot then hold no cycle, so a dropped state is
        # freed by reference counting alone (also while the collector is paused). CPython
        # shares it with the one the live-key registry holds.
        self.slot = StateSlot(self.key, codec, schema_version, self._settings, self._log, weakref.ref(self))
        return self.slot

    def fix_type(self) -> None:
        """Fix the type from the default now (the constructor calls it); raises for unfit migrations.

        Bad `migrations` are refused at once this way, while the slot itself waits for
        `initialize()`, whose batch may make ten thousand of them with the collector
        paused (see `_collector.py`).
        """
        # Kept for the slot: a type whose codec is not cached (unhashable, or with migrations)
        # would otherwise have it built a second time by `initialize()`.
        self._kind = _kind_of(self._type_of(None), self._settings[1])

    def _type_of(self, type_hint: Any) -> Any:
        """The state's type: the one given, else `type_hint`, else learnt from the default."""
        if self._state_type is not None:
            return self._state_type
        if type_hint is not None:
            return type_hint
        if isinstance(self._factory, type):
            return self._factory
        if self._factory is not None:
            self._sample = [self._factory()]
            return infer_state_type(self._sample[0])
        return infer_state_type(self._default)

    def fresh_default(self) -> Any:
        """A new default: the factory's (its first product, if the type was learnt from it), or a copy."""
        if self._factory is not None:
            return self._sample.pop() if self._sample else self._factory()
        assert self.slot is not None
        return self.slot.codec.copy(self._default)

    async def open_kvs(self) -> KeyValueStore:
        """The state's store, opened once."""
        slot = self.make_slot()
        if slot.kvs is None:
            slot.kvs = await (
                self._kvs_factory() if self._kvs_factory is not None else self._open_store(*self._store)
            )
        return slot.kvs

    # -- starting --------------------------------------------------------------

    @staticmethod
    async def initialize_many(cores: Sequence[StateCore]) -> list[Exception]:
        """Load every core's record (one batched read per backend); the errors, one a failed core."""
        errors: list[Exception] = []
        loading: list[StateCore] = []
        claimed: set[_ownership.OwnerKey] = set()
        stores: dict[StoreKey, KeyValueStore] = {}  # opened once per call
        for core in cores:
            try:
                ready = core._claim_known(stores, claimed)  # no await for the usual state of a batch
                if ready is None:
                    ready = await core._claim(stores, claimed)
                if ready:
                    loading.append(core)
            except Exception as exc:
                errors.append(exc)
        if not loading:
            return errors
        slots = [core.make_slot() for core in loading]
        try:
            results = await load_slots(
                slots, [core.fresh_default for core in loading], smallest_timeout(slots)
            )
        except BaseException:
            for core in loading:
                core.release_owner()
            raise
        begun: list[StateCore] = []
        for core, error in zip(loading, results, strict=True):
            core._sample = None  # made to learn the type, unused when a record was stored
            if error is None:
                begun.append(core)
            else:
                core.release_owner()
                errors.append(error)
        StateCore.begin_many(begun)
        return errors

    def _claim_known(
        self, stores: dict[StoreKey, KeyValueStore], claimed: set[_ownership.OwnerKey]
    ) -> bool | None:
        """`_claim` for a state whose store this batch has opened already; None otherwise."""
        if self.active or not self.persistence_enabled or self._kvs_factory is not None:
            return None
        kvs = stores.get(self._store)
        if kvs is None:
            return None
        self.make_slot().kvs = kvs
        self._take_owner(kvs, claimed)
        return True

    async def _claim(self, stores: dict[StoreKey, KeyValueStore], claimed: set[_ownership.OwnerKey]) -> bool:
        """Get ready to load: True when the record must be read, False when there is nothing to do."""
        if self.active:
            return False
        slot = self.make_slot()
        if not self.persistence_enabled:
            slot.take(self.fresh_default(), synced=False)
            StateCore.begin_many([self])
            return False
        kvs = await self.open_kvs()
        if self._kvs_factory is None:
            stores.setdefault(self._store, kvs)
        self._take_owner(kvs, claimed)
        return True

    def _take_owner(self, kvs: KeyValueStore, claimed: set[_ownership.OwnerKey]) -> None:
        """Check the key, and make this state its record's one user in this process."""
        check_key(self.key, store=kvs.label)
        owner_key = (kvs.storage.url, kvs.id, self.key)
        _ownership.take(owner_key, self, claimed, store=kvs.label)
        self._owner_key = owner_key

    @staticmethod
    def begin_many(cores: Sequence[StateCore]) -> None:
        """The values are loaded: persist them from now on, joining each manager's group once."""
        joining: dict[EventManager, dict[StateSlot, StateCore]] = {}
        default: EventManager | None = None
        for core in cores:
            slot = core.slot
            assert slot is not None
            core.has_value = True
            core.active = True
            slot.enabled = bool(core.persistence_enabled)
            if core.persistence_enabled is True:
                manager = core.event_manager
                if manager is None:
                    manager = default = default or default_event_manager.get()
                joining.setdefault(manager, {})[slot] = core
        for manager, members in joining.items():
            group = group_of(manager)
            group.add(members)
            ref = weakref.ref(group)
            for core in members.values():
                core._group = ref

    # -- persisting -------------------------------------------------------------

    @staticmethod
    async def persist_many(
        cores: Iterable[StateCore], timeout: float | None = None, *, bounded: bool = False
    ) -> None:
        """Persist these states now, in one batch per backend; raise what failed.

        Each is compared whether a change was seen or not. Bounded by the smallest
        persistence_timeout among them, or by `timeout` when `bounded`.
        """
        slots = [slot for core in cores if (slot := core.slot) is not None]
        errors = await persist_slots(slots, timeout if bounded else smallest_timeout(slots), full=True)
        for error in errors:
            if not isinstance(error, StateOwnershipLost):
                error.unsaved = True  # type: ignore[attr-defined]  # a library error or a user's serializer bug
            if getattr(error, "key", None) is None:  # a whole batch failed: name the states it held
                name_unsaved(slots, str(error))
        if len(errors) == 1:
            raise errors[0]
        if errors:
            raise ExceptionGroup(f"{len(errors)} states were not persisted", errors)

    def ownership_lost(self, error: StateOwnershipLost) -> None:
        """Another process took the record over: stop persisting, and say so on the manager."""
        manager = self.manager()
        self.stop_listening()
        if manager is not None and manager.active:
            manager.emit(
                event=Event.STATE_OWNERSHIP_LOST,
                event_data=EventStateOwnershipLostData(store=error.store or "", key=self.key),
            )

    def manager(self) -> EventManager | None:
        """The manager this state persists on: the one it joined, or the one it was given."""
        group = self._group() if self._group is not None else None
        joined = group.manager if group is not None else None
        return joined or self.event_manager

    def stop_listening(self) -> None:
        group = self._group() if self._group is not None else None
        self._group = None
        if group is not None and self.slot is not None:
            group.discard(self.slot)

    # -- resetting and ending ------------------------------------------------------

    async def reset(self) -> None:
        """Go back to the default in place (see RecoverableState.reset) and clear the stored record."""
        slot = self.make_slot()
        fresh = self.fresh_default()
        slot.value = slot.codec.reset_in_place(slot.value, fresh) if self.has_value else fresh
        del fresh  # watching the reset value counts who holds its parts
        slot.changed()
        self.has_value = True
        if self.persistence_enabled and self.active:
            await self.open_kvs()
            await clear_slot(slot, slot.timeout)

    async def teardown(self) -> None:
        """Stop listening, persist one last time (bounded by the close timeout), release the record."""
        if not self.active:
            return
        manager = self.manager() or default_event_manager.get()
        self.stop_listening()
        slot = self.slot
        assert slot is not None
        try:
            await StateCore.persist_many([self], manager.close_timeout.total_seconds(), bounded=True)
        finally:
            self.release_owner()
            self.active = False
            slot.enabled = False

    def release_owner(self) -> None:
        if self._owner_key is not None:
            _ownership.release(self._owner_key, self)
        self._owner_key = None


def settings_for(
    history: int,
    migrations: Mapping[int, Migration],
    on_bad_record: Literal["raise", "quarantine", "previous"],
    timeout: float | None,
    track: bool,
    deltas: bool = True,
) -> SlotSettings:
    """The settings tuple of a state, one object for every state with the same ones."""
    if migrations:
        return (history, dict(migrations), on_bad_record, timeout, track, deltas)
    key = (history, on_bad_record, timeout, track, deltas)
    known = _settings.get(key)
    if known is None:
        known = _settings[key] = (history, _NO_MIGRATIONS, on_bad_record, timeout, track, deltas)
    return known


_NO_MIGRATIONS: Mapping[int, Migration] = MappingProxyType({})
_settings: dict[tuple[Any, ...], SlotSettings] = {}
NO_STORE: StoreKey = (None, None)
"""The store key of a state in the default store (shared)."""


def _kind_of(state_type: Any, migrations: Mapping[int, Migration]) -> tuple[StateCodec, int | None]:
    """The codec and schema version of a state type, checked against `migrations` (cached when none)."""
    if not migrations:
        known = _kinds.get(state_type) if _hashable(state_type) else None
        if known is not None:
            return known
    try:
        codec = codec_for(state_type)
    except TypeError:  # an unhashable type annotation
        codec = StateCodec(state_type)
    schema_version = model_schema_version(state_type)
    check_migrations(schema_version, migrations)
    codec.content_type = content_type_for(schema_version)
    if not migrations and _hashable(state_type):
        _kinds[state_type] = (codec, schema_version)
    return codec, schema_version


def _hashable(value: Any) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


_kinds: dict[Any, tuple[StateCodec, int | None]] = {}
"""Each state type's codec and schema version (a thousand states of one type look it up once)."""
