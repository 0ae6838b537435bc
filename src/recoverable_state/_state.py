"""RecoverableState: a pydantic model kept in a key-value store across restarts."""

from __future__ import annotations

import collections
import contextlib
import logging
import weakref
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Generic, Literal, TypeVar

import anyio
import anyio.lowlevel
from pydantic import BaseModel, ValidationError

from ._errors import RecordCorruptError, StateAlreadyInUseError, StateOwnershipLost, StorageError
from ._locator import service_locator
from ._schema import Migration, check_migrations, content_type_for, migrate, model_schema_version
from .events import Event, EventManager, EventPersistStateData, EventStateOwnershipLostData
from .storage import KeyValueStore, RecordWrite, StoredRecord, WriteOutcome, check_key

TStateModel = TypeVar("TStateModel", bound=BaseModel)

_package_logger = logging.getLogger("recoverable_state")

# Live states by (storage url, store id, key): two in one process would overwrite each other.
# Weak references, so a state dropped without teardown frees its record (a plain dict of
# refs: WeakValueDictionary's bookkeeping cost 2 us a state, measured over 10,000).
_owners: dict[tuple[str, str, str], weakref.ref[RecoverableState[Any]]] = {}


def describe_validation_error(exc: ValidationError) -> str:
    """Name each failing field and what is wrong with it, on one line."""
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(the record)"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


class RecoverableState(Generic[TStateModel]):
    """A pydantic model that survives restarts: loaded on start, saved on PERSIST_STATE.

    `initialize()` loads the stored record (or a deep copy of `default_state`);
    with `persistence_enabled=True` the state then saves itself on every
    PERSIST_STATE its event manager emits, with `"explicit_only"` only when
    `persist_state()` is called, and with `False` never. A write happens only when
    the serialised model differs from what was last stored, and only while this
    process still owns the record: a successor that loaded it since (after a
    migration) makes the next write fail with StateOwnershipLost instead.
    """

    def __init__(
        self,
        *,
        default_state: TStateModel,
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
    ) -> None:
        """Describe a state; nothing is read or registered until `initialize()`.

        Args:
            default_state: the model to start from when nothing is stored (deep-copied).
            persist_state_key: the record key the state is stored under.
            persistence_enabled: True, "explicit_only" or False (see the class docstring).
            persist_state_kvs_name: the store to use, by name (created when missing).
            persist_state_kvs_id: the store to use, by id (must exist).
            logger: where to log; the package logger by default.
            persist_state_kvs_factory: an async callable returning the store to use.
            event_manager: the manager to listen on; the service locator's by default.
            history: keep this many snapshots of the record (0: keep none).
            migrations: `{k: fn}` turning stored JSON of schema version k into k + 1;
                the model declares its version as `schema_version: ClassVar[int]`.
            on_bad_record: what `initialize()` does with a record that is not JSON
                or does not validate (after migrations): "raise" a RecordCorruptError
                (the record stays as it is), or "quarantine": copy it to the store's
                quarantine store and start from the default state.
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
        if on_bad_record not in ("raise", "quarantine"):
            raise ValueError(f"on_bad_record must be 'raise' or 'quarantine', not {on_bad_record!r}")
        self._schema_version = model_schema_version(type(default_state))
        self._migrations = dict(migrations or {})
        check_migrations(self._schema_version, self._migrations)
        self._content_type = content_type_for(self._schema_version)
        self._on_bad_record = on_bad_record
        self._default_state = default_state
        self._model = type(default_state)
        self._serializer = self._model.__pydantic_serializer__
        self._key = persist_state_key
        self._persistence_enabled = persistence_enabled
        self._kvs_name = persist_state_kvs_name
        self._kvs_id = persist_state_kvs_id
        self._kvs_factory = persist_state_kvs_factory
        self._log = logger or _package_logger
        self._event_manager = event_manager
        self._history = history

        self._state: TStateModel | None = None
        self._kvs: KeyValueStore | None = None
        self._listening_on: EventManager | None = None
        self._owner_key: tuple[str, str, str] | None = None
        self._gate: _WriteGate | None = None
        self._version = 0  # the stored version this process last read or wrote (0: none)
        self._last_bytes: bytes | None = None  # what the store holds, as far as we know
        self._lost = False

    # -- reading -------------------------------------------------------------

    @property
    def current_value(self) -> TStateModel:
        """The live model; change it in place, it is persisted as it is."""
        if self._state is None:
            raise RuntimeError(
                f"RecoverableState {self._key!r} is not initialized: "
                "call `await state.initialize()` (or use `async with`) first"
            )
        return self._state

    @property
    def is_initialized(self) -> bool:
        """Whether `initialize()` has run (and `teardown()` has not)."""
        return self._state is not None and self._gate is not None

    @property
    def persist_state_key(self) -> str:
        """The record key the state is stored under."""
        return self._key

    @property
    def ownership_lost(self) -> bool:
        """Whether another process took this state over; it is then no longer persisted."""
        return self._lost

    async def has_persisted_state(self) -> bool:
        """Whether a record of this state is in the store."""
        kvs = await self._open_kvs()
        return await kvs.record_exists(self._key)

    # -- lifecycle -----------------------------------------------------------

    async def initialize(self) -> TStateModel:
        """Load the stored state (or a copy of the default) and start persisting it.

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
            if state.is_initialized:
                continue
            if not state._persistence_enabled:
                state._start(state._default_state.model_copy(deep=True), None)
                continue
            by = (state._kvs_name, state._kvs_id)
            if state._kvs is None and state._kvs_factory is None and by in stores:
                state._kvs = stores[by]
            kvs = await state._open_kvs()
            if state._kvs_factory is None:
                stores.setdefault(by, kvs)
            try:
                check_key(state._key, store=kvs.label)
                state._take_owner(kvs, claimed)
            except Exception as exc:
                errors.append(exc)
                continue
            loading.append(state)
        if loading:
            try:
                records = await KeyValueStore.get_together(
                    [(s._kvs, s._key, True) for s in loading]  # type: ignore[misc]
                )
            except BaseException:
                for state in loading:
                    state._release_owner()
                raise
            for state, record in zip(loading, records, strict=True):
                try:
                    if isinstance(record, StorageError):
                        raise record
                    await state._start_from(record)
                except Exception as exc:
                    state._release_owner()
                    errors.append(exc)
        if len(errors) == 1:
            raise errors[0]
        if errors:
            raise ExceptionGroup(f"{len(errors)} of {len(states)} states failed to initialize", errors)

    def _take_owner(self, kvs: KeyValueStore, claimed: set[tuple[str, str, str]]) -> None:
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

    async def _start_from(self, record: StoredRecord | None) -> None:
        kvs = self._kvs
        assert kvs is not None
        if record is None:
            self._start(self._default_state.model_copy(deep=True), None)
            return
        try:
            data = record.value if record.content_type == self._content_type else migrate(
                record.value,
                record.content_type,
                code_version=self._schema_version,
                migrations=self._migrations,
                store=kvs.label,
                key=self._key,
            )
            value = self._validate(kvs, data)
        except RecordCorruptError as exc:
            if self._on_bad_record != "quarantine":
                raise
            await self._quarantine(kvs, record, exc)
            self._start(self._default_state.model_copy(deep=True), record)
            self._last_bytes = None  # the default replaces the bad record on the next persist
            return
        self._start(value, record)
        if data is not record.value:
            self._last_bytes = None  # migrated: written back at the next persist

    async def _quarantine(self, kvs: KeyValueStore, record: StoredRecord, error: Exception) -> None:
        quarantine = await kvs.open_quarantine()
        stamp = datetime.now(UTC).isoformat(timespec="microseconds")
        await quarantine.put_record(f"{self._key}@{stamp}", record.value, record.content_type)
        self._log.warning(
            "%s; the record was copied to store %r, key %r, and the state starts from its default",
            error,
            quarantine.label,
            f"{self._key}@{stamp}",
        )

    def _start(self, state: TStateModel, record: StoredRecord | None) -> None:
        self._state = state
        self._version = record.version if record is not None else 0
        self._last_bytes = record.value if record is not None else None
        self._lost = False
        self._gate = _WriteGate()
        if self._persistence_enabled is True:
            manager = self._event_manager or service_locator.get_event_manager()
            _PersistGroup.of(manager).add(self)
            self._listening_on = manager

    def _validate(self, kvs: KeyValueStore, data: bytes) -> TStateModel:
        try:
            return self._model.model_validate_json(data)
        except ValidationError as exc:
            problem = describe_validation_error(exc)
            if any(e["type"] == "json_invalid" for e in exc.errors()):
                message = f"the stored record is not valid JSON ({problem})"
            else:
                message = f"the stored record does not validate as {self._model.__name__}: {problem}"
            raise RecordCorruptError(message, store=kvs.label, key=self._key) from exc

    async def persist_state(self, event_data: EventPersistStateData | None = None) -> None:
        """Store the current value now, if it changed since it was last stored.

        Returns once the write is durable. Raises StateOwnershipLost (and stops
        persisting this state) when another process has taken the record over.
        """
        if not self._persistence_enabled or self._state is None or self._gate is None or self._lost:
            return
        async with self._gate:
            kvs = self._kvs
            assert kvs is not None
            data = self._serializer.to_json(self._state, by_alias=True)
            if data == self._last_bytes:
                return
            outcome = await kvs.put_record(
                self._key,
                data,
                self._content_type,
                expected_version=self._version,
                keep_history=self._history,
            )
            error = self._settle(outcome, data)
        if error is not None:
            raise error

    @staticmethod
    async def persist_many(states: Iterable[RecoverableState[Any]]) -> None:
        """Persist many states with one batched write per backend.

        What one PERSIST_STATE does for every state listening on a manager: each
        changed state is serialised in one pass and all of them are written in one
        batch. A state whose own `persist_state()` is running is persisted after
        it. States another process took over are logged and left unwritten.
        Writes that failed on their own (their store was dropped) are logged and
        raised together once every other state is settled.
        """
        held: list[tuple[RecoverableState[Any], bytes]] = []
        puts: list[tuple[KeyValueStore, RecordWrite]] = []
        busy: list[RecoverableState[Any]] = []
        failed: list[StorageError] = []
        try:
            for n, state in enumerate(states, 1):
                if n % 2000 == 0:
                    await anyio.lowlevel.checkpoint()  # stay fair to other tasks
                gate = state._gate
                if state._state is None or gate is None or state._lost or not state._persistence_enabled:
                    continue
                if not gate.try_enter():
                    busy.append(state)
                    continue
                try:
                    data = state._serializer.to_json(state._state, by_alias=True)
                except Exception:
                    gate.leave()
                    state._log.exception("state %r cannot be serialised; not persisted", state._key)
                    continue
                if data == state._last_bytes:
                    gate.leave()
                    continue
                held.append((state, data))
                kvs = state._kvs
                assert kvs is not None
                puts.append(
                    (
                        kvs,
                        kvs.prepare_put(
                            state._key,
                            data,
                            state._content_type,
                            expected_version=state._version,
                            keep_history=state._history,
                        ),
                    )
                )
            if puts:
                outcomes = await KeyValueStore.put_together(puts)
                for (state, data), outcome in zip(held, outcomes, strict=True):
                    if isinstance(outcome, StorageError):
                        state._log.error("state %r was not persisted: %s", state._key, outcome)
                        failed.append(outcome)
                    else:
                        state._settle(outcome, data)
        finally:
            for state, _ in held:
                assert state._gate is not None
                state._gate.leave()
        if busy:
            async with anyio.create_task_group() as tg:
                for state in busy:
                    tg.start_soon(_persist_quietly, state)
        if failed:
            raise ExceptionGroup(f"{len(failed)} states were not persisted", failed)

    def _settle(self, outcome: WriteOutcome, data: bytes) -> StateOwnershipLost | None:
        """Record a write's outcome; on a lost compare-and-set, give up the state."""
        if outcome.applied:
            self._version, self._last_bytes = outcome.version, data
            return None
        kvs = self._kvs
        assert kvs is not None
        self._lost = True
        manager = self._listening_on
        self._stop_listening()
        error = StateOwnershipLost(
            f"the stored record is at version {outcome.version}, not {self._version} as this "
            "process last saw it: another process has taken this state over; this snapshot "
            "was not written and the state is no longer persisted from here",
            store=kvs.label,
            key=self._key,
        )
        self._log.error("%s", error)
        if manager is not None and manager.active:
            manager.emit(
                event=Event.STATE_OWNERSHIP_LOST,
                event_data=EventStateOwnershipLostData(store=kvs.label, key=self._key),
            )
        return error

    async def reset(self) -> None:
        """Go back to a copy of the default state and clear the stored record."""
        self._state = self._default_state.model_copy(deep=True)
        if not self._persistence_enabled or self._gate is None:
            return
        async with self._gate:
            kvs = await self._open_kvs()
            await kvs.delete_record(self._key, expected_version=self._version)
            self._version, self._last_bytes = 0, None

    async def teardown(self) -> None:
        """Stop listening, persist one last time, and release the record in this process."""
        if self._gate is None:
            return
        self._stop_listening()
        try:
            await self.persist_state()
        finally:
            self._release_owner()
            self._gate = None

    def _stop_listening(self) -> None:
        if self._listening_on is not None:
            _PersistGroup.of(self._listening_on).discard(self)
            self._listening_on = None

    def _release_owner(self) -> None:
        if self._owner_key is not None:
            ref = _owners.get(self._owner_key)
            if ref is not None and ref() in (self, None):
                del _owners[self._owner_key]
        self._owner_key = None

    async def _open_kvs(self) -> KeyValueStore:
        if self._kvs is None:
            if self._kvs_factory is not None:
                self._kvs = await self._kvs_factory()
            else:
                self._kvs = await KeyValueStore.open(name=self._kvs_name, id=self._kvs_id)
        return self._kvs

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

    def __repr__(self) -> str:
        return f"<RecoverableState {self._key!r} of {self._model.__name__}>"


class _WriteGate:
    """Lets one write of a state through at a time; the others wait their turn, in order.

    An anyio.Lock does the same, but a PERSIST_STATE over 10,000 states passes
    10,000 gates in one pass, and the uncontended path here costs a flag test
    instead of a current-task lookup (34 ms of such lookups per pass, measured).
    """

    __slots__ = ("_busy", "_waiting")

    def __init__(self) -> None:
        self._busy = False
        self._waiting: collections.deque[anyio.Event] | None = None  # made when first contended

    def try_enter(self) -> bool:
        """Enter if no write is in flight; never waits."""
        if self._busy:
            return False
        self._busy = True
        return True

    async def __aenter__(self) -> None:
        if self.try_enter():
            return
        turn = anyio.Event()
        if self._waiting is None:
            self._waiting = collections.deque()
        self._waiting.append(turn)
        try:
            await turn.wait()
        except BaseException:
            if turn in self._waiting:
                self._waiting.remove(turn)
            else:
                self.leave()  # our turn came as we were cancelled: pass it on
            raise

    async def __aexit__(self, *exc_info: object) -> None:
        self.leave()

    def leave(self) -> None:
        """End this write; hand the gate to the next waiting write, if any."""
        if self._waiting:
            self._waiting.popleft().set()
        else:
            self._busy = False


async def _persist_quietly(state: RecoverableState[Any]) -> None:
    with contextlib.suppress(StateOwnershipLost):  # already logged and announced by the state
        await state.persist_state()


class _PersistGroup:
    """The one PERSIST_STATE listener of a manager, persisting all its states in a batch.

    Thousands of states listening one by one would each cost a task, a lock
    round and a storage round trip; together they cost one pass and one batch.
    """

    _groups: weakref.WeakKeyDictionary[EventManager, _PersistGroup] = weakref.WeakKeyDictionary()

    def __init__(self, manager: EventManager) -> None:
        self._manager = weakref.ref(manager)  # a strong one would keep the manager alive forever
        self._states: dict[RecoverableState[Any], None] = {}

    _last: tuple[weakref.ref[EventManager], _PersistGroup] | None = None

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

    def add(self, state: RecoverableState[Any]) -> None:
        manager = self._manager()
        if not self._states and manager is not None:
            manager.on(event=Event.PERSIST_STATE, listener=self.persist_all)
        self._states[state] = None

    def discard(self, state: RecoverableState[Any]) -> None:
        self._states.pop(state, None)
        manager = self._manager()
        if not self._states and manager is not None:
            manager.off(event=Event.PERSIST_STATE, listener=self.persist_all)

    async def persist_all(self, event_data: EventPersistStateData | None = None) -> None:
        """Persist every state of this manager that changed."""
        await RecoverableState.persist_many(list(self._states))
