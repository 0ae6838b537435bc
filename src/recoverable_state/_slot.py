"""One state's place in a store, and the one write path and one load path over many of them.

A `StateSlot` holds what the store side of a state needs: the live value, the
version and bytes last known stored, a write in doubt, and a write gate.
`persist_slots` and `load_slots` are the only code that writes or loads a
state; one state is a batch of one. They call the slots' methods and never
reach into a state's fields.

Outcomes are settled so that memory agrees with the store: a write that failed
changes nothing; a write reported landed is settled; a write whose outcome is
unknown (the batch raised, was cancelled or timed out) is remembered and
checked against the store, without claiming, before the next write.
"""

from __future__ import annotations

import collections
import contextlib
import gc
import logging
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Literal

import anyio
import anyio.lowlevel
from pydantic import ValidationError
from pydantic_core import PydanticSerializationError

from ._codec import Refused, StateCodec, describe_validation_error
from ._editing import EditGuard, claim_edits
from ._errors import (
    PersistenceTimeoutError,
    RecordCorruptError,
    StateOwnershipLost,
    StorageError,
    UnrepresentableStateError,
)
from ._schema import Migration, migrate
from ._tracking import ChangeMark, watch
from .storage import KeyValueStore, RecordWrite, StoredRecord, WriteOutcome


class StateSlot:
    """The store side of one state: its value, what the store holds of it, and its write gate."""

    __slots__ = (
        "_refusal",
        "codec",
        "content_type",
        "editing",
        "enabled",
        "gate",
        "handed",
        "history",
        "in_doubt",
        "key",
        "kvs",
        "log",
        "lost",
        "mark",
        "migrations",
        "on_bad_record",
        "on_lost",
        "schema_version",
        "stored",
        "synced",
        "timeout",
        "track",
        "tracked",
        "value",
        "version",
    )

    def __init__(
        self,
        *,
        key: str,
        codec: StateCodec,
        content_type: str,
        schema_version: int | None,
        migrations: Mapping[int, Migration],
        on_bad_record: Literal["raise", "quarantine"],
        history: int,
        timeout: float | None,
        log: logging.Logger,
        on_lost: Callable[[StateOwnershipLost], None],
        track: bool = True,
    ) -> None:
        self.key = key
        self.codec = codec
        self.content_type = content_type
        self.schema_version = schema_version
        self.migrations = migrations
        self.on_bad_record = on_bad_record
        self.history = history
        self.timeout = timeout
        """Seconds each load and save of this state may take (None: no bound)."""
        self.log = log
        self.on_lost = on_lost
        self.kvs: KeyValueStore | None = None
        self.enabled = False  # whether persists write (initialized, persistence on)
        self.value: Any = None
        self.version = 0  # the stored version this process last read or wrote (0: none)
        self.stored: int | None = None  # fingerprint() of what the store holds, as far as we know
        self.in_doubt: bytes | None = None  # bytes of a write whose outcome is unknown
        self.lost = False
        self.gate = WriteGate()
        self.editing: EditGuard | None = None  # made by state.editing(): no snapshot mid-update
        self._refusal: str | None = None  # the last refusal logged, to log each once
        # Change tracking (see _tracking.py): a value not yet handed out cannot change; one
        # handed out and `tracked` changed only if its `mark` is dirty; `synced`: the store
        # holds what the value serialises to, as of the last look.
        self.track = track
        self.mark = ChangeMark()
        self.handed = False
        self.tracked = False
        self.synced = False

    def hand_out(self) -> Any:
        """The live value, for the worker: from now on it may change, so it is watched."""
        if not self.handed:
            self.handed = True
            if self.track and self.enabled:
                self.tracked = watch(self, self.mark)
        return self.value

    def take(self, value: Any, *, synced: bool) -> None:
        """Make `value` (nobody else holds it) the live value; `synced`: the store holds it."""
        self.value = value
        self.mark = ChangeMark()
        self.handed = False
        self.tracked = False
        self.synced = synced

    def changed(self) -> None:
        """The value was changed in a way the mark cannot see (a reset): look at it next persist."""
        self.synced = False
        if self.handed and self.track and self.enabled:
            self.tracked = watch(self, self.mark)

    @property
    def unchanged(self) -> bool:
        """Whether the store is known to hold the value as it is, without serialising it."""
        return self.synced and not self.mark.dirty and (self.tracked or not self.handed)

    @property
    def label(self) -> str:
        """The store's name for messages."""
        return self.kvs.label if self.kvs is not None else "?"

    @property
    def log_fields(self) -> dict[str, str]:
        """The structured fields of every log line about this state (`extra=`): store and key."""
        return {"store": self.label, "key": self.key}

    # -- loading ---------------------------------------------------------------

    def start_from(self, record: StoredRecord | None, default: Callable[[], Any]) -> None:
        """Take the loaded record (None: nothing stored) as the live value; see `load_slots`.

        Raises RecordCorruptError for a record that does not load (see `start_over`).
        """
        kvs = self.kvs
        assert kvs is not None
        self.lost = False
        self.in_doubt = None
        if record is None:
            self.take(default(), synced=False)
            self.version, self.stored = 0, None
            return
        data = record.value if record.content_type == self.content_type else migrate(
            record.value,
            record.content_type,
            code_version=self.schema_version,
            migrations=self.migrations,
            store=kvs.label,
            key=self.key,
        )
        value, dropped = self._validate(data)
        # A migrated record, or one with dropped fields, is written back at the next persist.
        synced = data is record.value and not dropped
        self.take(value, synced=synced)
        self.version = record.version
        self.stored = fingerprint(record.value) if synced else None

    async def start_over(
        self, record: StoredRecord | None, error: RecordCorruptError, default: Callable[[], Any]
    ) -> None:
        """A record that does not load: quarantine it and start from the default, or raise.

        `record` is None when the store itself could not parse it (a damaged file).
        """
        if self.on_bad_record != "quarantine" or (record is None and error.raw is None):
            raise error
        if record is None:
            assert error.raw is not None
            record = StoredRecord(self.key, error.raw, "application/octet-stream", 0, datetime.now(UTC))
        await self._quarantine(record, error)
        self.lost = False
        self.in_doubt = None
        self.take(default(), synced=False)  # the default replaces the bad record on the next persist
        self.version, self.stored = record.version, None

    def _validate(self, data: bytes) -> tuple[Any, bool]:
        try:
            value, dropped = self.codec.load(data)
        except ValidationError as exc:
            problem = describe_validation_error(exc)
            if any(e["type"] == "json_invalid" for e in exc.errors()):
                message = f"the stored record is not valid JSON ({problem})"
            else:
                message = f"the stored record does not validate as {self.codec.name}: {problem}"
            raise RecordCorruptError(message, store=self.label, key=self.key) from exc
        if dropped:
            self.log.warning(
                "store %r, key %r: the stored record has fields %s that %s no longer has; they are "
                "dropped at the next persist (keep them with a migration: see schema_version)",
                self.label,
                self.key,
                ", ".join(repr(d) for d in dropped),
                self.codec.name,
                extra=self.log_fields,
            )
        return value, bool(dropped)

    async def _quarantine(self, record: StoredRecord, error: Exception) -> None:
        assert self.kvs is not None
        quarantine = await self.kvs.open_quarantine()
        stamp = datetime.now(UTC).isoformat(timespec="microseconds")
        await quarantine.put_record(f"{self.key}@{stamp}", record.value, record.content_type)
        self.log.warning(
            "%s; the record was copied to store %r, key %r, and the state starts from its default",
            error,
            quarantine.label,
            f"{self.key}@{stamp}",
            extra=self.log_fields,
        )

    # -- writing ---------------------------------------------------------------

    def prepare(self, warned: list[warnings.WarningMessage], full: bool = False) -> RecordWrite | None:
        """The write this slot needs now (None: nothing changed); raises UnrepresentableStateError.

        `warned` records warnings: pydantic warns when a value does not have its
        declared type (it was assigned without validation), which calls for a full check.
        `full`: serialise and compare even if no change was seen (a change made behind
        the watched containers' backs, as `heapq` does, is found this way).
        """
        mark = self.mark
        if not full and self.synced and not mark.dirty and (self.tracked or not self.handed):
            return None  # `unchanged`, inlined: a big persist asks every state
        mark.dirty = False  # cleared before serialising: a change made from now on sets it again
        self.synced = False
        codec = self.codec
        seen = len(warned)
        try:
            data = codec.serializer.to_json(self.value, by_alias=True)
        except PydanticSerializationError:
            try:
                data = codec.dump_leniently(self.value)
            except Refused as refused:
                raise self._refuse(refused) from None
        if self.handed and self.track and (mark.adopt or not self.tracked):
            mark.adopt = False
            self.tracked = watch(self, mark)  # watch the parts put in since the last look
        if (hash(data) & _HASH_BITS) | (len(data) << 64) == self.stored:  # fingerprint(), inlined
            self.synced = True
            return None
        suspect = len(warned) != seen
        if suspect or codec.needs_check:
            try:
                codec.check(self.value, data, suspect=suspect)
            except Refused as refused:
                raise self._refuse(refused) from None
        kvs = self.kvs
        assert kvs is not None
        fields = (kvs.id, self.key, data, self.content_type, self.version, self.history)
        return _new_write(RecordWrite, fields)

    def _refuse(self, refused: Refused) -> UnrepresentableStateError:
        error = UnrepresentableStateError(
            f"field {refused.field!r} {refused.reason}; the state was not persisted and the "
            "stored record is unchanged",
            store=self.label,
            key=self.key,
            field=refused.field,
        )
        if str(error) != self._refusal:  # a timer tick repeats it: log each distinct one once
            self._refusal = str(error)
            self.log.error("%s", error, extra=self.log_fields)
        return error

    def settle(self, outcome: WriteOutcome, data: bytes) -> StateOwnershipLost | None:
        """Record a write's outcome; a lost compare-and-set gives the state up."""
        if outcome.applied:
            self.version, self.stored, self._refusal = outcome.version, fingerprint(data), None
            self.synced = True
            return None
        self.lost = True
        self.enabled = False
        error = StateOwnershipLost(
            f"the stored record is at version {outcome.version}, not {self.version} as this "
            "process last saw it: another process has taken this state over; this snapshot "
            "was not written and the state is no longer persisted from here",
            store=self.label,
            key=self.key,
        )
        self.log.error("%s", error, extra=self.log_fields)
        self.on_lost(error)
        return error

    def resolve(self, record: StoredRecord | None) -> bool:
        """Settle a write in doubt from what the store holds (read without claiming); whether it landed."""
        data, self.in_doubt = self.in_doubt, None
        if record is not None and record.version == self.version + 1 and record.value == data:
            self.version, self.stored = record.version, fingerprint(data)  # it had landed
            return True
        # Otherwise it had not; a successor, if any, shows in the next write's compare-and-set.
        return False


_new_write = tuple.__new__
"""Builds a RecordWrite from all its fields: 0.6 of the time calling the class takes (it is in Python)."""


def fingerprint(data: bytes) -> int:
    """What a state keeps of the bytes last stored: their length and 64-bit hash.

    Keeping the bytes themselves cost 650 B a state of 600 B. The price: a changed
    snapshot with the same length and hash as the stored one (a chance of about 1
    in 2**64 a changed persist) would be taken as unchanged and not written.
    Python's bytes hash is computed once per bytes object and kept in it.
    """
    return (hash(data) & _HASH_BITS) | (len(data) << 64)


_HASH_BITS = 0xFFFF_FFFF_FFFF_FFFF


def fingerprinted_size(stored: int | None) -> int:
    """The length of the bytes a fingerprint was taken of (0 for None)."""
    return 0 if stored is None else stored >> 64


def smallest_timeout(slots: Iterable[StateSlot]) -> float | None:
    """The tightest persistence timeout among `slots` (None: none is bounded)."""
    bounded = [s.timeout for s in slots if s.timeout is not None]
    return min(bounded) if bounded else None


class Tally:
    """What a persist wrote: states and bytes (for `manager.stats`), counted as it settles."""

    __slots__ = ("bytes", "states")

    def __init__(self) -> None:
        self.states = 0
        self.bytes = 0

    def landed(self, size: int) -> None:
        self.states += 1
        self.bytes += size


_PASS_CHUNK = 2000
"""States a persist looks at between two turns of the event loop (about 0.5 ms)."""


async def persist_slots(
    slots: Sequence[StateSlot],
    timeout: float | None,
    *,
    full: bool = False,
    tally: Tally | None = None,
) -> list[Exception]:
    """Write every changed slot, in one batch per backend; return the errors, one a failure.

    A slot whose write is in flight is written after it, in order. Each batch
    (and each check of a write in doubt) is bounded by `timeout` seconds. With
    `full`, every slot is serialised and compared, whether a change was seen or not.
    `tally` counts the states and bytes that landed.
    """
    tally = tally or Tally()
    held: list[StateSlot] = []
    busy: list[StateSlot] = []
    doubtful: list[StateSlot] = []
    for start in range(0, len(slots), _PASS_CHUNK):
        if start:
            await anyio.lowlevel.checkpoint()  # stay fair to other tasks
        for slot in slots[start : start + _PASS_CHUNK]:
            if not slot.enabled or (  # `slot.unchanged`, inlined: this loop visits every state
                not full
                and slot.synced
                and not slot.mark.dirty
                and (slot.tracked or not slot.handed)
                and slot.in_doubt is None
            ):
                continue
            if slot.gate.try_enter():
                held.append(slot)
                if slot.in_doubt is not None:
                    doubtful.append(slot)
            else:
                busy.append(slot)
    errors: list[Exception] = []
    try:
        errors += await _write_held(held, doubtful, timeout, tally, full)
    finally:
        with anyio.CancelScope(shield=True):  # every gate is left, also when cancelled
            for n, slot in enumerate(held):
                if n % 5000 == 4999:
                    await anyio.lowlevel.checkpoint()
                slot.gate.leave()
    if busy:
        async with anyio.create_task_group() as tg:
            for slot in busy:
                tg.start_soon(_write_in_turn, slot, timeout, errors, tally, full)
    return errors


async def _write_in_turn(
    slot: StateSlot, timeout: float | None, errors: list[Exception], tally: Tally, full: bool = False
) -> None:
    async with slot.gate:
        if slot.enabled:
            doubtful = [slot] if slot.in_doubt is not None else []
            errors += await _write_held([slot], doubtful, timeout, tally, full)


SLICE_SECONDS = 0.005
"""How long one slice of a big persist may hold the event loop before other tasks get a turn."""


async def _write_held(
    slots: Sequence[StateSlot],
    doubtful: Sequence[StateSlot],
    timeout: float | None,
    tally: Tally,
    full: bool = False,
) -> list[Exception]:
    """Write the enabled slots whose gates are held; `doubtful` are those with a write in doubt.

    The slots are serialised in slices of at most SLICE_SECONDS, so the event loop
    keeps running during a persist of 100,000 states, and then written in one batch.
    (Writing each slice while the next one is serialised was slower: the store's
    thread and the event loop took the GIL from each other at every row, and each
    slice cost a commit of its own.)
    """
    errors: list[Exception] = []
    if doubtful:
        errors += await _resolve_doubts(doubtful, timeout, tally)
    todo = [s for s in slots if s.in_doubt is None and s.enabled] if doubtful else slots
    big = len(todo) >= PAUSE_COLLECTOR_AT
    if big:
        await anyio.lowlevel.checkpoint()  # each pass over 100,000 states gets a step of its own
    edits = await claim_edits(todo, timeout)  # never a snapshot while a worker is in editing()
    if edits.waited_out:
        held = "waiting for the worker's editing() to end before saving"
        errors += [_timed_out(s, timeout, held) for s in edits.waited_out]
        todo = [s for s in todo if s not in edits.waited_out]
    failed: dict[tuple[type, str], Exception] = {}
    # A big pass keeps its slices' objects alive while they are written: with the collector
    # on they would reach the oldest generation and set off full scans of every live state.
    big = len(todo) >= PAUSE_COLLECTOR_AT
    writing: list[StateSlot] = []
    puts: list[tuple[KeyValueStore, RecordWrite]] = []
    start = 0
    with edits, anyio.move_on_after(timeout) as scope, collector_paused(active=big):
        if big:
            await anyio.lowlevel.checkpoint()  # the passes above took a slice's time already
        while start < len(todo):
            start = _prepare_slice(todo, start, errors, writing, puts, full)
            if start < len(todo) or big:  # big: handing the batch over is a step of its own
                await anyio.lowlevel.checkpoint()
        if puts:
            await _write_prepared(writing, puts, errors, failed, tally)
    if big:  # the gates are left in a step after the collector's
        with anyio.CancelScope(shield=True):
            await anyio.lowlevel.checkpoint()
    if scope.cancelled_caught:
        # None of these is known to be saved: sent with the outcome unknown, serialised but
        # never sent (the timeout came between slices), or never reached.
        unsaved = [s for s in todo[:start] if s.in_doubt is not None]
        unsaved += [s for s in writing if s.in_doubt is None]
        unsaved += todo[start:]
        errors += [_timed_out(slot, timeout, "saving") for slot in unsaved]
    for error in failed.values():  # a whole-batch failure, once
        errors.append(error)
    return errors


def _prepare_slice(
    slots: Sequence[StateSlot],
    start: int,
    errors: list[Exception],
    writing: list[StateSlot],
    puts: list[tuple[KeyValueStore, RecordWrite]],
    full: bool = False,
) -> int:
    """Serialise slots from `start` on for up to SLICE_SECONDS into `writing` and `puts`; where to go on."""
    deadline = time.perf_counter() + SLICE_SECONDS
    i = start
    # One catch per slice: entering it per state would cost more than the slice.
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        while i < len(slots):
            slot = slots[i]
            i += 1
            try:
                prepared = slot.prepare(warned, full)
            except UnrepresentableStateError as exc:
                errors.append(exc)
                prepared = None
            except Exception:  # a bug in a user's serializer must not spoil the batch
                where = slot.log_fields
                slot.log.exception(
                    "store %r, key %r: the state cannot be serialised", *where.values(), extra=where
                )
                prepared = None
            if prepared is not None:
                assert slot.kvs is not None
                writing.append(slot)
                puts.append((slot.kvs, prepared))
            if not i % 64 and time.perf_counter() > deadline:
                break
    return i


_SETTLE_CHUNK = 256  # about 0.5 ms of settling: a step ends soon after its slice's time


async def _write_prepared(
    writing: list[StateSlot],
    puts: list[tuple[KeyValueStore, RecordWrite]],
    errors: list[Exception],
    failed: dict[tuple[type, str], Exception],
    tally: Tally,
) -> None:
    """Write the prepared records (`puts[i]` of `writing[i]`) and settle each slot with its outcome.

    Empties both lists as it goes: their records are freed a chunk at a time.
    """
    try:
        outcomes = await KeyValueStore.put_together(puts)  # a list of its own: emptied as settled
    except StorageError as exc:  # the whole batch failed: it may have landed before failing
        for slot, (_, write) in zip(writing, puts, strict=True):
            slot.in_doubt = write.value
        failed.setdefault((type(exc), str(exc)), exc)
        return
    except BaseException:  # cancelled (a timeout): the outcome is unknown
        for slot, (_, write) in zip(writing, puts, strict=True):
            slot.in_doubt = write.value
        raise
    # Settled (and freed) in slices too: 100,000 settles in one go held the event loop 300 ms.
    big = len(writing) >= PAUSE_COLLECTOR_AT
    deadline = time.perf_counter() + SLICE_SECONDS
    while writing:
        chunk = zip(writing[:_SETTLE_CHUNK], puts[:_SETTLE_CHUNK], outcomes[:_SETTLE_CHUNK], strict=True)
        for slot, (_, write), outcome in chunk:
            if isinstance(outcome, StorageError):
                errors.append(outcome)  # failed on its own: not applied, nothing changes
                continue
            lost = slot.settle(outcome, write.value)
            if lost is None:
                tally.landed(len(write.value))
            else:
                errors.append(lost)
        del writing[:_SETTLE_CHUNK], puts[:_SETTLE_CHUNK], outcomes[:_SETTLE_CHUNK], chunk
        if writing and time.perf_counter() > deadline:
            with anyio.CancelScope(shield=True):  # what landed is settled, also when cancelled
                await anyio.lowlevel.checkpoint()
            deadline = time.perf_counter() + SLICE_SECONDS
    if big:  # the collector wakes next: its first run (about 10 ms) gets a step of its own
        with anyio.CancelScope(shield=True):
            await anyio.lowlevel.checkpoint()


async def _resolve_doubts(slots: Sequence[StateSlot], timeout: float | None, tally: Tally) -> list[Exception]:
    """Read (without claiming) what the store holds for slots whose last write is in doubt."""
    records: Sequence[StoredRecord | StorageError | None] | None = None
    try:
        with anyio.move_on_after(timeout):
            records = await KeyValueStore.get_together([(s.kvs, s.key, False) for s in slots])  # type: ignore[misc]
    except StorageError as exc:
        return [exc]
    if records is None:
        return [_timed_out(s, timeout, "checking the last save of") for s in slots]
    errors: list[Exception] = []
    for slot, record in zip(slots, records, strict=True):
        if isinstance(record, StorageError):
            errors.append(record)
        elif slot.resolve(record):
            tally.landed(fingerprinted_size(slot.stored))
    return errors


async def load_slots(
    slots: Sequence[StateSlot], defaults: Sequence[Callable[[], Any]], timeout: float | None
) -> list[Exception | None]:
    """Load (and claim) every slot's record in one batch per backend; each slot's error or None.

    An error of the whole batch is raised.
    """
    records: Sequence[StoredRecord | StorageError | None] | None = None
    results: list[Exception | None] = []
    # Paused from the read on: the records read are as long-lived as the values made of them.
    with collector_paused(active=len(slots) >= PAUSE_COLLECTOR_AT):
        with anyio.move_on_after(timeout):
            records = await KeyValueStore.get_together([(s.kvs, s.key, True) for s in slots])  # type: ignore[misc]
        if records is None:
            return [_timed_out(s, timeout, "loading") for s in slots]
        for slot, record, default in zip(slots, records, defaults, strict=True):
            try:
                if isinstance(record, RecordCorruptError):
                    await slot.start_over(None, record, default)
                elif isinstance(record, StorageError):
                    raise record
                else:
                    try:
                        slot.start_from(record, default)
                    except RecordCorruptError as exc:
                        await slot.start_over(record, exc, default)
            except Exception as exc:
                results.append(exc)
            else:
                results.append(None)
    return results


PAUSE_COLLECTOR_AT = 10_000
"""States in one batch from which the collector is paused while they are built or written."""


@contextlib.contextmanager
def collector_paused(*, active: bool = True) -> Iterator[None]:
    """Pause Python's cyclic garbage collector while a batch builds many long-lived objects.

    Validating 100,000 records allocates millions of objects, and the collector
    would scan the growing heap again and again (0.7 s of 2.7 s, and growing
    faster than the batch). The batch makes no cycles; the collector runs as
    usual afterwards.

    (The library never calls `gc.freeze()`: that would exempt the application's
    own objects from collection for good, a choice only the application can make.)

    `active`: False leaves the collector alone.
    """
    if not active or not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _timed_out(slot: StateSlot, timeout: float | None, doing: str) -> PersistenceTimeoutError:
    return PersistenceTimeoutError(
        f"{doing} the state took longer than its persistence_timeout of {timeout:g} s; "
        "a save that timed out may or may not have landed, and the next persist checks",
        store=slot.label,
        key=slot.key,
    )


class WriteGate:
    """Lets one write of a state through at a time; the others wait their turn, in order.

    An anyio.Lock does the same, but a PERSIST_STATE over 10,000 states passes
    10,000 gates in one pass, and the uncontended path here costs a flag test
    instead of a current-task lookup (34 ms of such lookups per pass, measured).
    """

    __slots__ = ("_busy", "_waiting")

    def __init__(self) -> None:
        self._busy = False
        self._waiting: collections.deque[anyio.Event] | None = None  # made when first contended

    @property
    def busy(self) -> bool:
        """Whether a write of the state is under way."""
        return self._busy

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

