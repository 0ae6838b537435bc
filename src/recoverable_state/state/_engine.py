"""The one engine that loads, writes and clears states: one state is a batch of one.

`persist_slots` writes every changed slot in one batch per backend,
`load_slots` loads (and claims) every slot's record in one batch per backend,
and `clear_slot` deletes one state's record (a reset). Persist, load, reset and
teardown of every state go through here.

Outcomes are settled so that memory agrees with the store: a write that failed
changes nothing; a write reported landed is settled; a write whose outcome is
unknown (the batch raised, was cancelled or timed out) is remembered and
checked against the store, without claiming, before the next write.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import anyio
import anyio.lowlevel

from .._errors import (
    NotDurableError,
    PersistenceTimeoutError,
    RecordCorruptError,
    StorageError,
    StoreNotFoundError,
    UnrepresentableStateError,
)
from ..storage import KeyValueStore, RecordAppend, RecordWrite, StoredRecord, WriteOutcome
from ._collector import PAUSE_COLLECTOR_AT, collector_paused
from ._loading import start_from, start_over
from ._slot import DELETE_IN_DOUBT, StateSlot, Tally, fingerprinted_size

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
    # Every slot, in order: the young copy goes (the collector would visit each state through it).
    taken: Sequence[StateSlot] = slots if len(held) == len(slots) else held
    del held
    errors: list[Exception] = []
    try:
        errors += await _write_held(taken, doubtful, timeout, tally, full)
    finally:
        with anyio.CancelScope(shield=True):  # every gate is left, also when cancelled
            for n, slot in enumerate(taken):
                if n % 1000 == 999:
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
    slice cost a commit of its own.) A state whose worker is inside `editing()` is
    written after the others, as soon as the worker lets go.
    """
    errors: list[Exception] = []
    if doubtful:
        errors += await _resolve_doubts(doubtful, timeout, tally)
    todo = [s for s in slots if s.in_doubt is None and s.enabled] if doubtful else slots
    # A big pass keeps its slices' objects alive while they are written: with the collector
    # on they would reach the oldest generation and set off full scans of every live state.
    big = len(todo) >= PAUSE_COLLECTOR_AT
    if big:
        await anyio.lowlevel.checkpoint()  # each pass over 100,000 states gets a step of its own
    failed: dict[tuple[type, str], Exception] = {}
    writing: list[StateSlot] = []
    puts: list[tuple[KeyValueStore, RecordWrite | RecordAppend]] = []
    held: list[StateSlot] = []  # their worker is inside editing(): written when it lets go
    start = 0
    with anyio.move_on_after(timeout) as scope, collector_paused(active=big):
        if big:
            await anyio.lowlevel.checkpoint()  # the passes above took a slice's time already
        while start < len(todo):
            start = _prepare_slice(todo, start, errors, writing, puts, held, full)
            if start < len(todo) or big:  # big: handing the batch over is a step of its own
                await anyio.lowlevel.checkpoint()
        if puts:
            await _write_and_again(writing, puts, errors, failed, tally)
        if held:
            await _write_when_let_go(held, errors, failed, tally, full)
    if big:  # the gates are left in a step after the collector's
        with anyio.CancelScope(shield=True):
            await anyio.lowlevel.checkpoint()
    if scope.cancelled_caught:
        # None of these is known to be saved: sent with the outcome unknown, serialised but
        # never sent (the timeout came between slices), or never reached.
        unsaved = [s for s in todo[:start] if s.in_doubt is not None and s not in held]
        unsaved += [s for s in writing if s.in_doubt is None]
        unsaved += todo[start:]
        errors += [_timed_out(slot, timeout, "saving") for slot in unsaved]
        errors += [_timed_out(slot, timeout, _HELD) for slot in _let_go(held)]
    for error in failed.values():  # a whole-batch failure, once
        errors.append(error)
    return errors


_HELD = "waiting for the worker's editing() to end before saving"


async def _write_and_again(
    writing: list[StateSlot],
    puts: list[tuple[KeyValueStore, RecordWrite | RecordAppend]],
    errors: list[Exception],
    failed: dict[tuple[type, str], Exception],
    tally: Tally,
) -> None:
    """Write the prepared records; once more those the store went back on or lost the store of."""
    again = await _write_prepared(writing, puts, errors, failed, tally)
    if again:
        await _write_again(again, errors, failed, tally)


async def _write_when_let_go(
    held: list[StateSlot],
    errors: list[Exception],
    failed: dict[tuple[type, str], Exception],
    tally: Tally,
    full: bool,
) -> None:
    """Write each held slot as soon as its worker leaves editing() (polling); `held` keeps the rest."""
    delay = _POLL_FIRST
    while held:
        await anyio.sleep(delay)
        delay = min(delay * 2, _POLL_MOST)
        waiting, held[:] = list(held), []
        writing: list[StateSlot] = []
        puts: list[tuple[KeyValueStore, RecordWrite | RecordAppend]] = []
        _prepare_slice(waiting, 0, errors, writing, puts, held, full, deadline=None)
        if puts:
            await _write_and_again(writing, puts, errors, failed, tally)


def _let_go(held: list[StateSlot]) -> list[StateSlot]:
    """Stop waiting for these slots' workers (the persist gave up on them); the slots."""
    for slot in held:
        if slot.editing is not None:
            slot.editing.withdraw()
    return held


_POLL_FIRST = 0.001
_POLL_MOST = 0.01
"""Seconds between two looks at a worker's editing(), first and at most."""


def _prepare_slice(
    slots: Sequence[StateSlot],
    start: int,
    errors: list[Exception],
    writing: list[StateSlot],
    puts: list[tuple[KeyValueStore, RecordWrite | RecordAppend]],
    held: list[StateSlot],
    full: bool = False,
    *,
    deadline: float | None = 0.0,
) -> int:
    """Serialise slots from `start` on, for up to SLICE_SECONDS, into `writing` and `puts`; where to go on.

    A slot whose worker is inside `editing()` goes to `held`. A slot's edit guard is
    claimed for its serialisation alone (no await in between), so a worker entering
    `editing()` waits at most one serialisation. `deadline=None`: the whole list.
    """
    until = time.perf_counter() + SLICE_SECONDS if deadline is not None else None
    i = start
    # One catch per slice: entering it per state would cost more than the slice.
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        while i < len(slots):
            slot = slots[i]
            i += 1
            guard = slot.editing
            if guard is not None and not guard.try_claim():
                held.append(slot)
                continue
            try:
                prepared = _prepare_one(slot, warned, full, errors)
            finally:
                if guard is not None:
                    guard.release_claim()
            if prepared is not None:
                assert slot.kvs is not None
                writing.append(slot)
                puts.append((slot.kvs, prepared))
            if until is not None and not i % 64 and time.perf_counter() > until:
                break
    return i


def _prepare_one(
    slot: StateSlot, warned: list[warnings.WarningMessage], full: bool, errors: list[Exception]
) -> RecordWrite | RecordAppend | None:
    """The write one slot needs (None: none, or it failed; its error goes to `errors`)."""
    try:
        return slot.prepare(warned, full)
    except UnrepresentableStateError as exc:
        errors.append(exc)
    except Exception:  # a bug in a user's serializer must not spoil the batch
        where = slot.log_fields
        slot.log.exception("store %r, key %r: the state cannot be serialised", *where.values(), extra=where)
    return None


_SETTLE_CHUNK = 256  # about 0.5 ms of settling: a step ends soon after its slice's time


async def _write_prepared(
    writing: list[StateSlot],
    puts: list[tuple[KeyValueStore, RecordWrite | RecordAppend]],
    errors: list[Exception],
    failed: dict[tuple[type, str], Exception],
    tally: Tally,
) -> list[tuple[StateSlot, bool]]:
    """Write the prepared records (`puts[i]` of `writing[i]`) and settle each slot with its outcome.

    Empties both lists as it goes: their records are freed a chunk at a time.
    Returns the slots to write again, each with whether its store is gone: those the
    store went back on (`behind`), and those whose store the server lost
    (StoreNotFoundError for a store with a name).
    """
    again: list[tuple[StateSlot, bool]] = []
    try:
        outcomes = await KeyValueStore.put_together(puts)  # a list of its own: emptied as settled
    except StorageError as exc:  # the whole batch failed: it may have landed before failing
        for slot, (_, write) in zip(writing, puts, strict=True):
            slot.in_doubt = write.value
        failed.setdefault((type(exc), str(exc)), exc)
        return again
    except BaseException:  # cancelled (a timeout): the outcome is unknown
        for slot, (_, write) in zip(writing, puts, strict=True):
            slot.in_doubt = write.value
        raise
    # Settled (and freed) in slices too: 100,000 settles in one go held the event loop 300 ms.
    big = len(writing) >= PAUSE_COLLECTOR_AT
    deadline = time.perf_counter() + SLICE_SECONDS
    while writing:
        chunk = zip(writing[:_SETTLE_CHUNK], puts[:_SETTLE_CHUNK], outcomes[:_SETTLE_CHUNK], strict=True)
        for slot, (kvs, write), outcome in chunk:
            if isinstance(outcome, StorageError):
                slot.appendable = False  # whatever it was, the next write of this state is a snapshot
                if isinstance(outcome, NotDurableError) and outcome.outcome is not None:
                    # Applied, not confirmed durable: the version is true, the state stays
                    # unsynced so that the next persist writes it again (and waits again).
                    slot.settle(WriteOutcome(*outcome.outcome), write.value, type(write) is RecordAppend)
                    slot.stored, slot.synced, slot.appendable = None, False, False
                    errors.append(outcome)
                elif isinstance(outcome, StoreNotFoundError) and kvs.name is not None:
                    again.append((slot, True))  # the server lost the store: made again, then written
                else:
                    errors.append(outcome)  # failed on its own: not applied, nothing changes
                continue
            lost = slot.settle(outcome, write.value, type(write) is RecordAppend)
            if lost is not None:
                errors.append(lost)
            elif slot.behind:
                again.append((slot, False))
            else:
                tally.landed(len(write.value))
        del writing[:_SETTLE_CHUNK], puts[:_SETTLE_CHUNK], outcomes[:_SETTLE_CHUNK], chunk
        if writing and time.perf_counter() > deadline:
            with anyio.CancelScope(shield=True):  # what landed is settled, also when cancelled
                await anyio.lowlevel.checkpoint()
            deadline = time.perf_counter() + SLICE_SECONDS
    if big:  # the collector wakes next: its first run (about 10 ms) gets a step of its own
        with anyio.CancelScope(shield=True):
            await anyio.lowlevel.checkpoint()
    return again


async def _write_again(
    again: list[tuple[StateSlot, bool]],
    errors: list[Exception],
    failed: dict[tuple[type, str], Exception],
    tally: Tally,
) -> None:
    """Write once more the states the store went back on, or whose store its server lost (True).

    A lost store is opened again by name (made anew, and logged); its states start
    from version 0 there. A state still behind after this stays unsynced: the next
    persist writes it again.
    """
    made: dict[int, KeyValueStore] = {}
    slots: list[StateSlot] = []
    for slot, store_lost in again:
        slot.behind = False
        kvs = slot.kvs
        assert kvs is not None
        if store_lost:
            if id(kvs) not in made:
                try:
                    made[id(kvs)] = await kvs.reopen()
                except StorageError as exc:
                    errors.append(exc)
                    continue
                slot.log.warning(
                    "store %r is gone from its server (restarted without its data?): it was made again, "
                    "and its states are written again",
                    kvs.label,
                    extra=slot.log_fields,
                )
            slot.kvs, slot.version, slot.stored, slot.synced = made[id(kvs)], 0, None, False
            slot.appendable = False
        slots.append(slot)
    writing: list[StateSlot] = []
    puts: list[tuple[KeyValueStore, RecordWrite | RecordAppend]] = []
    held: list[StateSlot] = []  # a worker entered editing() meanwhile: the next persist writes them
    _prepare_slice(slots, 0, errors, writing, puts, held, full=True, deadline=None)
    _let_go(held)
    if puts:
        for slot, _ in await _write_prepared(writing, puts, errors, failed, tally):
            slot.behind = False  # still behind: the next persist writes it again


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
    with collector_paused(active=len(slots) >= PAUSE_COLLECTOR_AT, settle=True):
        with anyio.move_on_after(timeout):
            records = await KeyValueStore.get_together([(s.kvs, s.key, True) for s in slots])  # type: ignore[misc]
        if records is None:
            return [_timed_out(s, timeout, "loading") for s in slots]
        for slot, record, default in zip(slots, records, defaults, strict=True):
            try:
                if isinstance(record, RecordCorruptError):
                    await start_over(slot, None, record, default)
                elif isinstance(record, StorageError):
                    raise record
                else:
                    try:
                        start_from(slot, record, default)
                    except RecordCorruptError as exc:
                        await start_over(slot, record, exc, default)
            except Exception as exc:
                results.append(exc)
            else:
                results.append(None)
        records = None  # gone before the collector is back (see `collector_paused`)
    return results


def _timed_out(slot: StateSlot, timeout: float | None, doing: str) -> PersistenceTimeoutError:
    return PersistenceTimeoutError(
        f"{doing} the state took longer than its persistence_timeout of {timeout:g} s; "
        "a save that timed out may or may not have landed, and the next persist checks",
        store=slot.label,
        key=slot.key,
    )


async def clear_slot(slot: StateSlot, timeout: float | None) -> None:
    """Delete the slot's record, fenced by the version it holds (a reset); after any write in flight.

    Raises StateOwnershipLost when another process holds the record now, and
    PersistenceTimeoutError past `timeout` (the delete is then in doubt, and the
    next persist checks it).
    """
    kvs = slot.kvs
    assert kvs is not None
    async with slot.gate:
        with anyio.move_on_after(timeout) as scope:
            try:
                if slot.in_doubt is not None:
                    slot.resolve(await kvs.get_record(slot.key, chain=True))
                deleted = await kvs.delete_record(slot.key, expected_version=slot.version)
                if not deleted and slot.version:
                    record = await kvs.get_record(slot.key, chain=True)
                    if record is not None and record.version < slot.version:  # the store went back
                        await kvs.delete_record(slot.key, expected_version=record.version)
                    elif record is not None:
                        lost = slot.settle(WriteOutcome(False, record.version), b"")
                        assert lost is not None
                        raise lost
            except NotDurableError:  # deleted, not confirmed durable: the record is gone all the same
                slot.version, slot.stored, slot.in_doubt = 0, None, None
                raise
            except anyio.get_cancelled_exc_class():
                slot.in_doubt = DELETE_IN_DOUBT
                raise
            slot.version, slot.stored, slot.in_doubt = 0, None, None
        if scope.cancelled_caught:
            slot.in_doubt = DELETE_IN_DOUBT
            raise _timed_out(slot, timeout, "clearing")
