"""What every storage backend must do, and the records that cross that line.

A backend stores records in named stores. A record is one whole snapshot: its
bytes, content type, a version and the time it was written. Backends know
nothing of events or models; the `KeyValueStore` facade is their only caller.

To add a backend (S3, DynamoDB, a cluster), subclass `StorageBackend` and
implement its abstract methods; that is all. What a batch of requests does is
decided by the functions of `_contract.py` (the record contract, written once):
`read_batch` and `write_batch` fetch the stored versions of the batch's keys and
the stores that are missing, ask `plan_reads` / `plan_writes`, and apply the
answer. What every backend shares (group commit, the store cache) lives in
`_batching.py` and is not the backend's concern. Their contract:

- `write_batch` makes the whole batch durable together, in one transaction,
  pipeline or round trip where the store has one, and returns only once every
  applied write is durable for that store.
- Each write's outcome tells the truth: a write answered as applied is stored;
  a write answered with a StorageError in its place changed nothing. A store
  that cannot apply part of a batch (a disk filling up under a file store)
  answers the records it could not store with their error (`fail_records`),
  the rest as applied. An error that concerns the whole batch (the server is
  down) is raised; the caller then cannot know whether it landed.
- `read_batch` with `claim=True` bumps the version of each record it finds, in
  the same atomic step as the read (fencing).
- A record is never torn: a reader, or a process restarted after SIGKILL, sees
  either the whole previous snapshot or the whole new one.
- Blocking drivers run in anyio worker threads; nothing blocks the event loop.

Records are named tuples: a batch of 10,000 writes builds them 10,000 times, and a
frozen dataclass costs about ten times as much to build.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import NamedTuple

from anyio.abc import AsyncResource

from .._errors import StorageError

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


class StorageBackend(AsyncResource):
    """A place where stores of records live: memory, SQLite, files, Redis, PostgreSQL.

    Use it as `async with open_backend(url) as storage:` or call `aclose()`.
    """

    url: str
    """Where the data lives, for messages (never holds a password)."""

    max_batch: int = 10_000
    """The most writes or reads handed to `write_batch` / `read_batch` at once."""

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
    async def list_records(
        self, store_id: str, *, exclusive_start_key: str | None = None, limit: int | None = None
    ) -> list[RecordInfo]:
        """The records of a store in key order, after `exclusive_start_key`, at most `limit`.

        Keys sort by code point (Python's `sorted`, which is also the byte order of
        their UTF-8). `exclusive_start_key` need not be a stored key; None starts at
        the first key, and `limit` None means no limit. A backend answers with a range
        query where it has one, so that paging through a large store stays cheap.
        """

    async def purge_store(self, store_id: str) -> None:
        """Delete every record of a store and its history, keeping the store (its id and name).

        This default deletes the records one by one; backends override it with one
        statement or script.
        """
        start: str | None = None
        while records := await self.list_records(store_id, exclusive_start_key=start, limit=1_000):
            for info in records:
                await self.delete(store_id, info.key)
            start = records[-1].key

    @abstractmethod
    async def read_history(self, store_id: str, key: str) -> list[StoredRecord]:
        """The kept earlier snapshots of a key, newest first."""

    @abstractmethod
    async def aclose(self) -> None:
        """Release connections and files; the backend is not used afterwards."""
