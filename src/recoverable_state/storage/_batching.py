"""What every backend shares: group commit and the store cache, kept beside the backend.

`batcher_of(backend)` finds a backend's one batcher in a process-wide table that
holds the backend weakly: nothing is written onto the backend object, and a
backend nobody holds any more is forgotten with its batcher.

Group commit: requests that arrive together reach the backend as one batch.

The first caller to find no batch in flight leads: it yields once so that
concurrent callers can queue behind it, then hands the whole queue to the
backend in one call. Callers arriving meanwhile queue for the next batch, whose
leader is woken when the current one ends (the writer queue of LevelDB).
A caller may submit many items at once; they travel in one batch.

The flush may answer an item with an exception instead of a result (a write to
a store that is gone): that caller alone gets it, the rest of the batch stands.
An exception raised by the flush itself fails every caller of the batch.
"""

from __future__ import annotations

import weakref
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

import anyio
import anyio.lowlevel
import anyio.to_thread

from .._errors import StorageError
from .._forks import watch_forks
from ._backend import (
    RecordAppend,
    RecordRead,
    RecordWrite,
    StorageBackend,
    StoredRecord,
    StoreInfo,
    WriteOp,
    WriteOutcome,
)
from ._envelope import seal, unseal, unseal_many
from ._keyring import KeyRing

TItem = TypeVar("TItem")
TResult = TypeVar("TResult")


class _Slot(Generic[TItem, TResult]):
    __slots__ = ("done", "error", "items", "lead", "results", "wake")

    def __init__(self, items: Sequence[TItem]) -> None:
        self.items = items
        self.wake = anyio.Event()
        self.lead = False
        self.done = False
        self.results: Sequence[TResult] = ()
        self.error: BaseException | None = None


class GroupCommitter(Generic[TItem, TResult]):
    """Coalesces concurrent submissions into calls of `flush(items) -> results`."""

    def __init__(
        self,
        flush: Callable[[Sequence[TItem]], Awaitable[Sequence[TResult]]],
        *,
        max_batch: int = 10_000,
    ) -> None:
        self._flush = flush
        self._max_batch = max_batch
        self._queue: list[_Slot[TItem, TResult]] = []
        self._busy = False

    async def submit(self, item: TItem) -> TResult:
        """Flush `item` with whatever arrives together with it; return its result."""
        return (await self.submit_many((item,)))[0]

    async def submit_many(self, items: Sequence[TItem]) -> Sequence[TResult]:
        """Flush `items` in one batch (with whatever arrives together); return their results.

        A result may be an exception instance: the error of that item alone.

        Cancellation never waits for a backend: a caller cancelled while its items
        are queued withdraws them; one cancelled while its batch is in flight
        leaves at once, its outcome unknown, and the batch goes on; a leader
        cancelled while flushing cancels the flush, and every other caller of
        that batch gets a StorageError saying its outcome is unknown.
        """
        if not items:
            return ()
        slot: _Slot[TItem, TResult] = _Slot(items)
        self._queue.append(slot)
        if self._busy:
            try:
                await slot.wake.wait()  # woken when done, or made the leader
            except BaseException:
                self._withdraw(slot)
                raise
        else:
            self._busy = True
            slot.lead = True
        while not slot.done:
            try:
                await anyio.lowlevel.checkpoint()  # let concurrent callers join this batch
            except BaseException:
                self._withdraw(slot)
                raise
            slot.lead = False
            await self._lead()
        if slot.error is not None:
            raise slot.error
        return slot.results

    def _withdraw(self, slot: _Slot[TItem, TResult]) -> None:
        """A cancelled caller's slot leaves the queue if no batch took it; its leadership passes on."""
        if slot in self._queue:
            self._queue.remove(slot)
            if slot.lead:
                slot.lead = False
                self._hand_over()

    def _hand_over(self) -> None:
        """Make the first queued caller lead the next batch, or mark the committer idle."""
        if self._queue:
            nxt = self._queue[0]
            nxt.lead = True
            nxt.wake.set()
        else:
            self._busy = False

    async def _lead(self) -> None:
        taken = 0
        count = 0
        for s in self._queue:  # whole slots, at least one, up to max_batch items
            if count and count + len(s.items) > self._max_batch:
                break
            count += len(s.items)
            taken += 1
        batch = self._queue[:taken]
        del self._queue[:taken]
        items = batch[0].items if taken == 1 else [i for s in batch for i in s.items]
        try:
            results = await self._flush(items)
            if len(results) != len(items):
                raise RuntimeError("storage backend returned a result count unlike its batch")
        except BaseException as exc:  # every caller in this batch gets the error
            error = exc if isinstance(exc, Exception) else _interrupted()
            for s in batch:
                s.error = error
                s.done = True
                s.wake.set()
            if not isinstance(exc, Exception):
                raise
        else:
            start = 0
            for s in batch:
                end = start + len(s.items)
                s.results = results if taken == 1 else results[start:end]
                start = end
                s.done = True
                s.wake.set()
        finally:
            self._hand_over()


def _interrupted() -> StorageError:
    return StorageError(
        "the batch this request travelled in was cancelled while in flight: "
        "it may or may not have been applied"
    )


class Batcher:
    """The shared machinery in front of one backend: group commit and the store cache.

    Every caller of a backend (KeyValueStore, the CLI) goes through the one
    batcher of that backend (`batcher_of`), so that writes and reads arriving
    together travel together and thousands of states opening one store cost
    one lookup.
    """

    def __init__(self, backend: StorageBackend) -> None:
        # Weakly: the table of batchers holds each batcher for as long as its backend lives.
        self._backend = weakref.ref(backend)
        # Late-bound, so that a subclass or a test wrapping write_batch is honoured.
        self._writes: GroupCommitter[WriteOp, WriteOutcome | StorageError] = GroupCommitter(
            self._flush_writes, max_batch=backend.max_batch
        )
        self._reads: GroupCommitter[RecordRead, StoredRecord | StorageError | None] = GroupCommitter(
            self._flush_reads, max_batch=backend.max_batch
        )
        self._known_stores: dict[tuple[str, str], StoreInfo] = {}
        self._opening: dict[tuple[str, str], anyio.Event] = {}
        self.open_stores: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()
        """The object handed out for each open store, by store id (the KeyValueStore facade
        keeps its objects here, so that opening a store twice gives one object while it lives)."""
        self._started = False
        self._starting: anyio.Event | None = None
        watch_forks(self)

    # -- fork (see _forks.py) -------------------------------------------------

    def after_fork_in_child(self) -> None:
        """No batch in flight, no store being opened: those were the parent's, whose loop is not here."""
        backend = self.backend
        self._writes = GroupCommitter(self._flush_writes, max_batch=backend.max_batch)
        self._reads = GroupCommitter(self._flush_reads, max_batch=backend.max_batch)
        self._opening = {}
        self._starting = None

    async def _flush_writes(self, ops: Sequence[WriteOp]) -> Sequence[WriteOutcome | StorageError]:
        """Hand a batch to the backend, each record sealed (checksummed, and encrypted with a ring)."""
        backend = self.backend
        if len(ops) >= SEAL_IN_THREAD_FROM:
            sealed = await anyio.to_thread.run_sync(seal_writes, ops, backend.key_ring)
        else:
            sealed = seal_writes(ops, backend.key_ring)
        results = await backend.write_batch(sealed)
        if len(sealed) >= SEAL_IN_THREAD_FROM:
            await _free_in_steps(sealed)
        return results

    async def _flush_reads(self, reads: Sequence[RecordRead]) -> Sequence[StoredRecord | StorageError | None]:
        """Read a batch; each record opened, or answered with the error that says why it cannot be."""
        backend = self.backend
        records = await backend.read_batch(reads)
        return unseal_many(records, backend.key_ring, [read.store_id for read in reads], self.label)

    async def history(self, store_id: str, key: str) -> list[StoredRecord | StorageError]:
        """The kept snapshots of a key, newest first, each opened or answered with its error."""
        backend = self.backend
        snapshots = await backend.read_history(store_id, key)
        return [_unseal_one(r, backend.key_ring, self.label(store_id)) for r in snapshots]

    def label(self, store_id: str) -> str:
        """How messages name a store this batcher has seen: its name, or its id."""
        info = self._known_stores.get(("id", store_id))
        return info.label if info is not None else store_id

    @property
    def backend(self) -> StorageBackend:
        """The backend this batcher is in front of."""
        backend = self._backend()
        if backend is None:  # its callers hold it: only a batcher kept on its own meets this
            raise RuntimeError("the storage backend of this batcher is gone")
        return backend

    async def write(self, op: WriteOp) -> WriteOutcome:
        """Write or delete one record, batched with every request that arrives together."""
        outcome = await self._writes.submit(op)
        if isinstance(outcome, StorageError):
            raise outcome
        return outcome

    async def read(self, read: RecordRead) -> StoredRecord | None:
        """Read one record, batched with every read that arrives together."""
        record = await self._reads.submit(read)
        if isinstance(record, StorageError):
            raise record
        return record

    async def write_many(self, ops: Sequence[WriteOp]) -> Sequence[WriteOutcome | StorageError]:
        """Write (or delete) many records in one batch; a request that failed alone gets its error."""
        return await self._writes.submit_many(ops)

    async def read_many(self, reads: Sequence[RecordRead]) -> Sequence[StoredRecord | StorageError | None]:
        """Read many records in one batch; a read that failed alone is answered with its error."""
        return await self._reads.submit_many(reads)

    async def find_store(self, *, name: str | None = None, id: str | None = None) -> StoreInfo:
        """`open_store`, remembered; concurrent openers of one store wait for the first."""
        key = ("id", id) if id is not None else ("name", name or "")
        while (info := self._known_stores.get(key)) is None:
            opening = self._opening.get(key)
            if opening is None:
                break
            await opening.wait()
        else:
            return info
        self._opening[key] = opening = anyio.Event()
        try:
            info = await self.backend.open_store(name=name, id=id)
            self.know_store(info)
            return info
        finally:
            del self._opening[key]
            opening.set()

    def know_store(self, info: StoreInfo) -> None:
        """Remember a store found by other means (a listing): messages name it by its name."""
        self._known_stores[("id", info.id)] = info
        if info.name is not None:
            self._known_stores[("name", info.name)] = info

    async def start_once(self, prepare: Callable[[], Awaitable[None]]) -> None:
        """Run `prepare` before the first store of this backend is handed out, once.

        Concurrent callers wait until it is done; if it fails, its caller gets the
        error and the next caller tries again.
        """
        while not self._started:
            starting = self._starting
            if starting is not None:
                await starting.wait()
                continue
            self._starting = starting = anyio.Event()
            try:
                await prepare()
                self._started = True
            finally:
                self._starting = None
                starting.set()

    async def drop_store(self, store_id: str) -> None:
        """Drop a store, and forget it was known (also if it was opened again meanwhile)."""
        self.forget_store(store_id)
        try:
            await self.backend.drop_store(store_id)
        finally:
            self.forget_store(store_id)

    def forget_store(self, store_id: str) -> None:
        """Forget a store's id, name and handed-out object (it was dropped)."""
        for key in [k for k, v in self._known_stores.items() if v.id == store_id]:
            del self._known_stores[key]
        self.open_stores.pop(store_id, None)


_batchers: dict[int, Batcher] = {}
"""Each live backend's batcher, by the backend's id; an entry leaves when its backend is collected.

By id, with a finalizer, rather than a WeakKeyDictionary: a backend need not be hashable
(a dataclass with eq=True is not). An id is reused only after its object is gone, and
the finalizer has then removed the entry.
"""


def batcher_of(backend: StorageBackend) -> Batcher:
    """The one batcher in front of `backend`, made on first use (nothing is written onto `backend`)."""
    batcher = _batchers.get(id(backend))
    if batcher is None:
        batcher = _batchers[id(backend)] = Batcher(backend)
        weakref.finalize(backend, _batchers.pop, id(backend), None)
    return batcher


SEAL_IN_THREAD_FROM = 2000
"""Writes in a batch from which they are sealed in a worker thread: the checksums of 100,000
records held the event loop 100 ms in one step; in a thread, the loop gets the GIL back every
switch interval (5 ms)."""


def seal_writes(ops: Sequence[WriteOp], ring: KeyRing | None) -> list[WriteOp]:
    """`ops` with each write's and append's value sealed as it is stored (deletes as they are)."""
    sealed: list[WriteOp] = []
    for op in ops:
        if type(op) is RecordWrite:  # `type() is`: this runs once per write of a 100,000-state persist
            store_id, key, value, content_type, expected, keep = op
            value, content_type = seal(value, content_type, ring)
            op = _new_write(RecordWrite, (store_id, key, value, content_type, expected, keep))
        elif type(op) is RecordAppend:
            store_id, key, value, content_type, expected = op
            value, content_type = seal(value, content_type, ring)
            op = _new_write(RecordAppend, (store_id, key, value, content_type, expected))
        sealed.append(op)
    return sealed


def _unseal_one(record: StoredRecord, ring: KeyRing | None, store: str) -> StoredRecord | StorageError:
    try:
        return unseal(record, ring, store=store)
    except StorageError as error:  # damaged, or sealed with a key the ring lacks
        return error


_FREE_STEP = 4096  # about 1 ms of freeing


async def _free_in_steps(items: list[Any]) -> None:
    """Drop a written batch's sealed records a step at a time.

    100,000 records freed at once held the event loop 28 ms, in C, where no other
    task or thread gets a turn. Shielded: the batch is written, and its results must
    reach its callers.
    """
    with anyio.CancelScope(shield=True):
        while len(items) > _FREE_STEP:
            del items[-_FREE_STEP:]
            await anyio.lowlevel.checkpoint()


_new_write = tuple.__new__
