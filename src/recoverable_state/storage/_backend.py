"""What every storage backend must do, and the records that cross that line.

A backend stores records in named stores. A record is one whole snapshot: its
bytes, content type, a version and the time it was written. Backends know
nothing of events or models; the `KeyValueStore` facade is their only caller.

To add a backend, subclass `StorageBackend` and implement its abstract methods.
Their contract:

- `write_batch` applies each write on its own terms (a failed compare-and-set
  fails that write only) but makes the whole batch durable together, in one
  transaction, pipeline or round trip where the store has one. It returns only
  once every applied write is durable for that store.
- A write with `expected_version=None` applies whatever is stored; with 0 it
  applies only when the key is absent; with n only when the stored version is n.
  An applied write stores version `stored + 1` (1 for a new key).
- `read_batch` with `claim=True` bumps the version of each record it finds, in
  the same atomic step as the read, so that a process still holding the older
  version can no longer write (fencing).
- A record is never torn: a reader, or a process restarted after SIGKILL, sees
  either the whole previous snapshot or the whole new one.
- Blocking drivers run in anyio worker threads; nothing blocks the event loop.
- A request that fails on its own (its store was dropped) may be answered with
  a StorageError in its place, so the rest of the batch still goes through;
  an error that concerns the whole batch (the server is down) is raised.

Records are named tuples: a batch of 10,000 writes builds them 10,000 times, and a
frozen dataclass costs about ten times as much to build.

The base class adds group commit: `write` and `read` calls that arrive
together are handed to `write_batch` and `read_batch` as one batch.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import NamedTuple

import anyio

from .._errors import StorageError
from ._batching import GroupCommitter

DEFAULT_STORE_NAME = "default"
"""The name of the store used when neither a name nor an id is given."""


@dataclass(frozen=True, slots=True)
class StoreInfo:
    """A store's identity: a stable id, and the name it was opened by (if any)."""

    id: str
    name: str | None

    @property
    def label(self) -> str:
        """How error messages name the store."""
        return self.name if self.name is not None else self.id


class StoredRecord(NamedTuple):
    """One whole stored snapshot."""

    key: str
    value: bytes
    content_type: str
    version: int
    updated_at: datetime


class RecordInfo(NamedTuple):
    """What a listing tells of a record, without its value."""

    key: str
    size: int
    content_type: str
    version: int
    updated_at: datetime


class RecordRead(NamedTuple):
    """Read one record; with `claim`, also take ownership of it (bump its version)."""

    store_id: str
    key: str
    claim: bool = False


class RecordWrite(NamedTuple):
    """Write one record, optionally only if the stored version is `expected_version`."""

    store_id: str
    key: str
    value: bytes
    content_type: str
    expected_version: int | None = None
    keep_history: int = 0
    """Keep this many earlier snapshots of the key (0: keep none)."""


class WriteOutcome(NamedTuple):
    """The result of one write: applied or not, and the version now stored (0: none)."""

    applied: bool
    version: int


class StorageBackend(ABC):
    """A place where stores of records live: memory, SQLite, files, Redis, PostgreSQL."""

    url: str
    """Where the data lives, for messages (never holds a password)."""

    def __init__(self) -> None:
        # Late-bound, so that a subclass or a test wrapping write_batch is honoured.
        self._writes: GroupCommitter[RecordWrite, WriteOutcome | StorageError] = GroupCommitter(
            lambda writes: self.write_batch(writes), max_batch=self.max_batch
        )
        self._reads: GroupCommitter[RecordRead, StoredRecord | StorageError | None] = GroupCommitter(
            lambda reads: self.read_batch(reads), max_batch=self.max_batch
        )
        self._known_stores: dict[tuple[str, str], StoreInfo] = {}
        self._opening: dict[tuple[str, str], anyio.Event] = {}

    max_batch: int = 10_000
    """The most writes or reads handed to the backend in one batch."""

    async def write(self, write: RecordWrite) -> WriteOutcome:
        """Write one record, batched with every write that arrives together."""
        outcome = await self._writes.submit(write)
        if isinstance(outcome, StorageError):
            raise outcome
        return outcome

    async def read(self, read: RecordRead) -> StoredRecord | None:
        """Read one record, batched with every read that arrives together."""
        record = await self._reads.submit(read)
        if isinstance(record, StorageError):
            raise record
        return record

    async def write_many(self, writes: Sequence[RecordWrite]) -> Sequence[WriteOutcome | StorageError]:
        """Write many records in one batch; a write that failed alone is answered with its error."""
        return await self._writes.submit_many(writes)

    async def read_many(self, reads: Sequence[RecordRead]) -> Sequence[StoredRecord | StorageError | None]:
        """Read many records in one batch; a read that failed alone is answered with its error."""
        return await self._reads.submit_many(reads)

    async def find_store(self, *, name: str | None = None, id: str | None = None) -> StoreInfo:
        """`open_store`, remembered: thousands of states opening one store cost one lookup."""
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
            info = await self.open_store(name=name, id=id)
            self._known_stores[("id", info.id)] = info
            if info.name is not None:
                self._known_stores[("name", info.name)] = info
            return info
        finally:
            del self._opening[key]
            opening.set()

    async def remove_store(self, store_id: str) -> None:
        """`drop_store`, and forget the store was known."""
        await self.drop_store(store_id)
        for key in [k for k, v in self._known_stores.items() if v.id == store_id]:
            del self._known_stores[key]

    @abstractmethod
    async def open_store(self, *, name: str | None = None, id: str | None = None) -> StoreInfo:
        """Find a store by id (StoreNotFoundError when missing) or by name (created when missing)."""

    @abstractmethod
    async def list_stores(self) -> list[StoreInfo]:
        """Every store in this backend."""

    @abstractmethod
    async def drop_store(self, store_id: str) -> None:
        """Delete a store with all its records and history."""

    @abstractmethod
    async def read_batch(
        self, reads: Sequence[RecordRead]
    ) -> Sequence[StoredRecord | StorageError | None]:
        """Read each record (None when absent), claiming those asked to be claimed."""

    @abstractmethod
    async def write_batch(self, writes: Sequence[RecordWrite]) -> Sequence[WriteOutcome | StorageError]:
        """Apply each write, durably and together; see the module docstring."""

    @abstractmethod
    async def delete(self, store_id: str, key: str, expected_version: int | None = None) -> bool:
        """Delete a record and its history; False when absent or the version differs."""

    @abstractmethod
    async def list_records(self, store_id: str) -> list[RecordInfo]:
        """Every record in a store, sorted by key."""

    @abstractmethod
    async def read_history(self, store_id: str, key: str) -> list[StoredRecord]:
        """The kept earlier snapshots of a key, newest first."""

    @abstractmethod
    async def aclose(self) -> None:
        """Release connections and files; the backend is not used afterwards."""
