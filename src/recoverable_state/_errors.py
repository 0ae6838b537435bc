"""One hierarchy of errors, each named for what went wrong.

Catch `RecoverableStateError` for everything, or a precise subclass. Storage
errors carry the store and key they concern, so a message always says where.
"""

from __future__ import annotations


class RecoverableStateError(Exception):
    """Base class of every error this library raises on purpose."""

    unsaved: bool = False
    """True on an error a persist or a teardown raised because a state's latest value was not
    saved (a store failure, a timeout, a value that cannot be stored): a runner whose worker
    ends with such an error exits with EXIT_NOT_PERSISTED (75), as a shutdown that could not
    save every state does."""


class ServiceConflictError(RecoverableStateError, RuntimeError):
    """A service (configuration, event manager, storage) was set after another one was handed out."""


class StorageError(RecoverableStateError):
    """A key-value store could not do what was asked."""

    def __init__(self, message: str, *, store: str | None = None, key: str | None = None) -> None:
        where = []
        if store is not None:
            where.append(f"store {store!r}")
        if key is not None:
            where.append(f"key {key!r}")
        prefix = f"{', '.join(where)}: " if where else ""
        super().__init__(prefix + message)
        self.store = store
        """The store the error concerns (its name, or its id when unnamed)."""
        self.key = key
        """The record key the error concerns, when there is one."""


class InvalidKeyError(StorageError, ValueError):
    """A record key is not allowed (empty, too long, or holds control characters)."""


class StoreNotFoundError(StorageError, LookupError):
    """No store has the id that was asked for."""


class StorageUnavailableError(StorageError, ConnectionError):
    """The storage server could not be reached, or did not answer, within the retry budget.

    Worth trying again later: the server was down, silent, or busy (a lock held
    by another connection) for the whole budget. The message says which.
    """


class NotDurableError(StorageError):
    """A write was applied, but the store could not confirm it as durable as the URL asks.

    Redis with `wait_replicas=N` answers it when fewer than N replicas acknowledged
    the batch within `wait_timeout` (or, with `fsync=true`, when the AOF was not
    fsynced in time); a load whose claims were not confirmed raises it (loading
    again claims again). Unlike any other error answered in a write's place, the write
    DID land on the server: `outcome` is `(applied, version)` as it was applied, and
    a reader of that server sees it. It may be lost if that server fails before its
    replicas catch up. A state keeps its new version and stays unsynced, so that the
    next persist writes it again (and waits again); the message names the store,
    the key and how many replicas acknowledged.
    """

    def __init__(
        self,
        message: str,
        *,
        store: str | None = None,
        key: str | None = None,
        outcome: tuple[bool, int] | None = None,
        acknowledged: int | None = None,
    ) -> None:
        super().__init__(message, store=store, key=key)
        self.outcome = outcome
        """`(applied, version)`: what the write did, as a `WriteOutcome` would say it."""
        self.acknowledged = acknowledged
        """How many replicas acknowledged the write in time (None: not a replica count)."""


class StorageAuthenticationError(StorageError, PermissionError):
    """The storage server refused the credentials (wrong password, unknown user, access rule).

    Never retried: trying again with the same credentials cannot succeed. The
    message names the server (without its password) and the store.
    """


class RecordCorruptError(StorageError, ValueError):
    """A stored record cannot be read as the state model: damaged (its checksum does not match),
    not JSON, or it fails validation."""

    raw: bytes | None = None
    """The unreadable bytes as the store holds them, when they could not even be taken apart."""
    version: int = 0
    """The stored version of the record, when the store told it (0: not known)."""

    def __init__(
        self,
        message: str,
        *,
        store: str | None = None,
        key: str | None = None,
        raw: bytes | None = None,
        version: int = 0,
    ) -> None:
        super().__init__(message, store=store, key=key)
        if raw is not None:
            self.raw = raw
        self.version = version


class RecordDecryptionError(StorageError, PermissionError):
    """A sealed record cannot be opened: its key id is not in the key ring, or it fails authentication.

    Not a bad record: it is never quarantined, and never overwritten by a default.
    The message names the store, the key and the key id, never key material.
    """

    def __init__(self, message: str, *, store: str | None, key: str | None, key_id: str | None) -> None:
        super().__init__(message, store=store, key=key)
        self.key_id = key_id
        """The id of the key the record is sealed with."""


class SchemaVersionError(StorageError):
    """A stored record's schema version is newer than the code's, or no migration leads on."""


class StateAlreadyInUseError(RecoverableStateError, RuntimeError):
    """Another live RecoverableState in this process already owns this store and key."""


class StateOwnershipLost(RecoverableStateError):
    """Another process took over this state; this one must stop persisting it.

    Raised by a persist whose compare-and-set found a newer version in the store:
    a successor (after a migration) has loaded the state and moved on, so this
    process's snapshot is stale and is never written.
    """

    def __init__(self, message: str, *, store: str | None, key: str) -> None:
        super().__init__(f"store {store!r}, key {key!r}: {message}")
        self.store = store
        self.key = key


class UnrepresentableStateError(RecoverableStateError, ValueError):
    """A state cannot be stored so that it loads back equal; nothing was written.

    NaN or infinite floats (JSON stores them as null), bytes that are not UTF-8,
    nesting deeper than JSON loading allows, or a value its type validates into
    something else. The stored record is left as it was.
    """

    def __init__(self, message: str, *, store: str | None, key: str, field: str) -> None:
        super().__init__(f"store {store!r}, key {key!r}: {message}")
        self.store = store
        self.key = key
        self.field = field
        """Where in the state the problem is, as a dotted path."""


class PersistenceTimeoutError(StorageError, TimeoutError):
    """Loading or saving a state took longer than its `persistence_timeout`.

    Whether a save that timed out landed is unknown; the next persist finds out
    from the store before writing again.
    """
