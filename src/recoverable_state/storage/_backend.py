"""What a storage backend must do, and the records that cross that line.

A backend keeps named stores of records. A record is one whole snapshot: its
bytes, a content type, a version and the time it was written. Backends know
nothing of events or models; the `KeyValueStore` facade (through the group
commit of `_batching.py`) and the CLI are their callers.

Records are named tuples: a batch of 10,000 writes builds them 10,000 times, and a
frozen dataclass costs about ten times as much to build.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, NamedTuple, TypeAlias

from anyio.abc import AsyncResource

if TYPE_CHECKING:
    from ._keyring import KeyRing

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
    """One stored record: a snapshot, or (content type `CHAIN_CONTENT_TYPE`) a snapshot and its deltas."""

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


class RecordDelete(NamedTuple):
    """Delete one record and its history, optionally only if the stored version is `expected_version`."""

    store_id: str
    key: str
    expected_version: int | None = None


class RecordAppend(NamedTuple):
    """Append a delta to a record stored at `expected_version`; the record's version becomes the next one.

    A delta is the change since the record's previous version (`_chain.py` says what
    it holds); the record is then its snapshot and the deltas appended since, read
    back together as one chain. A snapshot written over it (a `RecordWrite`) or a
    delete drops its deltas. The version is required: a delta follows one version.
    """

    store_id: str
    key: str
    value: bytes
    content_type: str
    expected_version: int


WriteOp: TypeAlias = RecordWrite | RecordDelete | RecordAppend
"""One request of a write batch: a write, a delete or an append."""


class WriteOutcome(NamedTuple):
    """The result of one write or delete: applied or not, and the version now stored (0: none).

    A write answers `(True, new version)` or `(False, stored version)`. A delete
    answers `(True, 0)` when it removed the record, and `(False, stored version)`
    when the record is absent (`(False, 0)`) or at another version.
    """

    applied: bool
    version: int


@dataclass(frozen=True, slots=True)
class Durability:
    """What an acknowledged write means for a backend, as its medium or server reports it.

    `durable_on_ack`: True when a write `write_batch` answered as applied survives a
    crash of the process and of the machine (or server) that holds it; False when it
    can be lost (a memory store, Redis without `appendfsync always`, PostgreSQL with
    `synchronous_commit=off`); None when the backend cannot tell (a server that refused
    to say). `summary` is one line for people; `details` the settings it was read from.
    """

    store_kind: str
    """The kind of store: "memory", "sqlite", "file", "redis", "postgresql", or a plug-in's own."""
    durable_on_ack: bool | None
    summary: str
    details: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        """The fields as plain JSON values (for `recoverable-state status --json`)."""
        return {
            "store_kind": self.store_kind,
            "durable_on_ack": self.durable_on_ack,
            "summary": self.summary,
            "details": dict(self.details),
        }


class StorageBackend(AsyncResource):
    """A place where stores of records live: memory, SQLite, files, Redis, PostgreSQL, or yours.

    Seven abstract methods make a backend. Callers never call `read_batch` and
    `write_batch` one request at a time: the group commit in front of every
    backend hands them whatever arrived together, up to `max_batch` requests.
    The rules every answer follows (compare-and-set, claims, order inside a
    batch, history) are written once, in `recoverable_state.storage.plan_writes`
    and `plan_reads`: a backend over a medium with transactions subclasses
    `TransactionalBackend`, which calls them for it; one that must decide
    elsewhere (inside a server, as Redis does in Lua) follows the same rules and
    proves it with the conformance suite (`recoverable_state.testing`).

    The contract of a batch:

    - Requests of one batch act one after another, in order: a second write to
      a key sees the first, a delete after a write removes it, a write after a
      delete creates the record afresh (version 1).
    - `write_batch` makes the whole batch durable together (one transaction,
      pipeline or script where the medium has one) and returns only once every
      applied request is durable for that medium.
    - Each answer tells the truth: a request answered as applied is stored; a
      request answered with a StorageError in its place changed nothing, except
      a NotDurableError: applied (its `outcome` says how) but not confirmed as
      durable as the URL asked (Redis `wait_replicas`, `fsync`). A
      medium that cannot apply part of a batch (a disk filling up under a file
      store) answers the records it could not store with their error, the rest
      as applied. An error that concerns the whole batch (the server is down)
      is raised: the caller then cannot know whether it landed.
    - A request to a store that does not exist fails alone, answered with a
      StoreNotFoundError in its place.
    - A record is never torn: a reader, or a process restarted after SIGKILL,
      sees the whole previous snapshot or the whole new one.
    - Blocking drivers run in anyio worker threads; nothing blocks the event loop.

    Usage (what the facade does, one batch at a time)::

        async with open_backend("sqlite:///./state.sqlite3") as storage:
            store = await storage.open_store(name="jobs")
            (outcome,) = await storage.write_batch(
                [RecordWrite(store.id, "job-1", b'{"page": 3}', "application/json", expected_version=0)]
            )
            (record,) = await storage.read_batch([RecordRead(store.id, "job-1", claim=True)])
            # outcome == WriteOutcome(True, 1); record.version == 2 (the claim bumped it)
    """

    url: str
    """Where the data lives, for messages (never holds a password)."""

    key_ring: KeyRing | None = None
    """Seal every record written with this ring (AES-GCM), open them as they are read.

    Set by `open_backend(url, encryption_keys=...)` or assigned. The shared layer
    in front of the backend does the sealing and the checksums: a backend only
    ever stores and returns opaque bytes."""

    max_batch: int = 10_000
    """The most requests handed to `write_batch` / `read_batch` at once."""

    keeps_deltas: bool = False
    """Whether this backend keeps deltas (`RecordAppend`, see `write_batch`).

    False, as for a backend written before deltas existed: states on it write whole
    snapshots only, and no append is ever handed to it."""

    @abstractmethod
    async def open_store(self, *, name: str | None = None, id: str | None = None) -> StoreInfo:
        """Find a store by id (StoreNotFoundError when missing) or by name (created when missing).

        Two callers opening one new name at once, also from two processes, get one store.
        """

    @abstractmethod
    async def list_stores(self) -> list[StoreInfo]:
        """Every store in this backend, sorted by name, then id."""

    @abstractmethod
    async def drop_store(self, store_id: str) -> None:
        """Delete a store with all its records and history (nothing happens if it is gone)."""

    @abstractmethod
    async def read_batch(self, reads: Sequence[RecordRead]) -> Sequence[StoredRecord | StorageError | None]:
        """Answer each read, in order: its record, None when absent, or its own error.

        A read with `claim` bumps the version of the record it finds in the same
        atomic step as the read (fencing: a writer still expecting the older
        version is refused from now on), and answers with the bumped version. A
        claim of an absent record creates nothing. Two claims of one key in a
        batch bump it twice; a read after a claim sees the claimed version.
        """

    @abstractmethod
    async def write_batch(self, ops: Sequence[WriteOp]) -> Sequence[WriteOutcome | StorageError]:
        """Apply each write or delete, in order, durably and together; answer each one.

        A `RecordWrite` with `expected_version=None` applies whatever is stored;
        with 0, only when the key is absent; with n, only when the stored version
        is n. An applied write stores version `stored + 1` (1 for a new key) and,
        with `keep_history=n`, keeps its snapshot among the newest n of the key.
        A `RecordDelete` applies when the record exists and, if a version is
        expected, is at that version; it removes the record and its history.
        A `RecordAppend` applies when the record exists at `expected_version`: it
        keeps the delta after the record's snapshot (and its earlier deltas) and
        stores the next version. A write drops the deltas kept before it, a delete
        drops them with the record, and a read of a record with deltas answers with
        the chain of its pieces (`pack_chain`: the snapshot first, each piece as it
        was stored). A backend without deltas answers an append with a StorageError.
        See `WriteOutcome` for the answers, and the class docstring for the batch.
        """

    @abstractmethod
    async def list_records(
        self, store_id: str, *, exclusive_start_key: str | None = None, limit: int | None = None
    ) -> list[RecordInfo]:
        """The records of a store in key order, after `exclusive_start_key`, at most `limit`.

        Keys sort by code point (Python's `sorted`, which is also the byte order of
        their UTF-8). `exclusive_start_key` need not be a stored key; None starts at
        the first key, and `limit` None means no limit. A backend answers with a range
        query where it has one, so that paging through a large store stays cheap.
        StoreNotFoundError when the store is missing.
        """

    async def purge_store(self, store_id: str) -> None:
        """Delete every record of a store and its history, keeping the store (its id and name).

        This default deletes the records a page at a time, each page in one write
        batch; backends override it with one statement or script.
        """
        start: str | None = None
        while records := await self.list_records(store_id, exclusive_start_key=start, limit=1_000):
            outcomes = await self.write_batch([RecordDelete(store_id, info.key) for info in records])
            for outcome in outcomes:
                if isinstance(outcome, StorageError):
                    raise outcome
            start = records[-1].key

    @abstractmethod
    async def read_history(self, store_id: str, key: str) -> list[StoredRecord]:
        """The kept earlier snapshots of a key, newest first (StoreNotFoundError: no such store)."""

    async def describe_durability(self) -> Durability:
        """What an acknowledged write means here, as the medium or the server reports it now.

        Server backends ask the server (its persistence settings, its replicas), so
        this may raise what any call to that server raises. This default knows
        nothing of the medium: a backend of a plug-in overrides it.
        """
        return Durability(type(self).__name__, None, "unknown: this backend does not describe its durability")

    @abstractmethod
    async def aclose(self) -> None:
        """Release connections, threads and files; the backend is not used afterwards."""
