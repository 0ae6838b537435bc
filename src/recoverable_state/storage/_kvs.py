"""KeyValueStore: the facade states and users write records through."""

from __future__ import annotations

import json
import operator
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Any, Literal, Self, TypeVar, overload

import pydantic_core

from .._config import configuration_service
from .._errors import InvalidKeyError, RecordCorruptError, StorageError, StoreNotFoundError
from ._backend import (
    DEFAULT_STORE_NAME,
    RecordAppend,
    RecordDelete,
    RecordInfo,
    RecordRead,
    RecordWrite,
    StorageBackend,
    StoredRecord,
    StoreInfo,
    WriteOutcome,
)
from ._batching import Batcher, batcher_of
from ._chain import materialise
from ._defaults import default_storage
from ._envelope import without_checksum

JSON_CONTENT_TYPE = "application/json; charset=utf-8"
TEXT_CONTENT_TYPE = "text/plain; charset=utf-8"
BYTES_CONTENT_TYPE = "application/octet-stream"

QUARANTINE_SUFFIX = ".quarantine"
"""Records set aside as unusable live in the store named `<store name> + this suffix`."""

SCHEMA_VERSION_PARAM = "schema-version"
"""The content-type parameter a state's record carries its model's schema version in."""

MAX_KEY_LENGTH = 1024
"""The longest key, in characters, every backend accepts."""

KEY_PAGE_SIZE = 1_000
"""How many records `iterate_keys` asks the backend for at a time."""

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def check_key(key: object, *, store: str | None) -> str:
    """Return `key` if every backend can hold it, else raise InvalidKeyError naming it."""
    if type(key) is str and 0 < len(key) <= MAX_KEY_LENGTH and key.isascii() and key.isprintable():
        return key  # the usual key, printable ASCII: none of the checks below can object (2.5x faster)
    if not isinstance(key, str):
        raise InvalidKeyError(f"a key must be a str, not {type(key).__name__}", store=store)
    if not key:
        raise InvalidKeyError("a key must not be empty", store=store, key=key)
    if len(key) > MAX_KEY_LENGTH:
        raise InvalidKeyError(
            f"a key may hold at most {MAX_KEY_LENGTH} characters, this one has {len(key)}",
            store=store,
            key=key[:40] + "...",
        )
    if _CONTROL.search(key):
        raise InvalidKeyError("a key must not hold control characters (NUL among them)", store=store, key=key)
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidKeyError(
            "a key must be valid Unicode text (it holds a lone surrogate)", store=store, key=repr(key)
        ) from None
    return key


def _check_listing(store: str, limit: object, exclusive_start_key: object) -> None:
    """Refuse a `limit` or `exclusive_start_key` that no backend could answer for."""
    if limit is not None:
        if not isinstance(limit, int) or isinstance(limit, bool):
            raise TypeError(f"limit must be an int or None, not {limit!r} (listing store {store!r})")
        if limit < 0:
            raise ValueError(f"limit must not be negative, got {limit} (listing store {store!r})")
    if exclusive_start_key is None:
        return
    if not isinstance(exclusive_start_key, str):
        raise InvalidKeyError(
            f"exclusive_start_key must be a str, not {type(exclusive_start_key).__name__}", store=store
        )
    if "\x00" in exclusive_start_key:
        raise InvalidKeyError(
            "exclusive_start_key must not hold NUL", store=store, key=repr(exclusive_start_key)
        )
    try:
        exclusive_start_key.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidKeyError(
            "exclusive_start_key must be valid Unicode text (it holds a lone surrogate)",
            store=store,
            key=repr(exclusive_start_key),
        ) from None


def _check_name(name: object) -> None:
    if not isinstance(name, str) or not name or len(name) > 255 or "\x00" in name:
        raise StorageError(f"store name {name!r} is not valid: use 1 to 255 characters, no NUL")


def encode_value(value: Any, content_type: str | None) -> tuple[bytes, str]:
    """Turn a value into stored bytes and a content type (JSON unless bytes or str)."""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value), content_type or BYTES_CONTENT_TYPE
    if isinstance(value, str) and (content_type is None or not is_json_content_type(content_type)):
        return value.encode("utf-8"), content_type or TEXT_CONTENT_TYPE
    return pydantic_core.to_json(value), content_type or JSON_CONTENT_TYPE


def is_json_content_type(content_type: str) -> bool:
    """Whether a content type is JSON (`application/json`, `...+json`, with any parameters)."""
    return content_type.split(";", 1)[0].strip().lower().endswith("json")


class KeyValueStore:
    """A named store of records in a storage backend.

    Open one with `await KeyValueStore.open(name=..., id=...)`; without either,
    the default store. Opening a store that is open already returns the same
    object, until the store is dropped. Values are JSON, text or bytes, chosen by
    their type or by an explicit content type.
    """

    def __init__(self, info: StoreInfo, storage: StorageBackend) -> None:
        self._info = info
        self._storage = storage
        self._batcher = batcher_of(storage)
        self._batcher.know_store(info)  # made from a listing: its errors name it as this object does
        self._label = info.label

    @classmethod
    async def open(
        cls,
        *,
        name: str | None = None,
        id: str | None = None,
        storage: StorageBackend | None = None,
    ) -> Self:
        """Open a store by id (StoreNotFoundError when there is none) or by name.

        A store opened by name is created when missing. A store that is open
        already (in this backend, by its name or its id) is returned as the same
        object, as Crawlee does; `drop()` forgets it. `storage` defaults to the
        service locator's backend, built from `RECOVERABLE_STATE_STORAGE_URL`.

        A subclass's `open` makes objects of the subclass: when the object open for
        a store is not one, a new object of the subclass replaces it from then on.

        The first store opened in a backend first empties the default store when
        the `purge_on_start` setting is on (`RECOVERABLE_STATE_PURGE_ON_START`).
        """
        if name is not None and id is not None:
            raise ValueError("open a store by name or by id, not both")
        if storage is None:
            storage = default_storage.get()
        if id is None:
            name = DEFAULT_STORE_NAME if name is None else name
            _check_name(name)
        batcher = batcher_of(storage)
        await batcher.start_once(lambda: _purge_default_store_on_start(storage))
        info = await batcher.find_store(name=name, id=id)
        opened = batcher.open_stores.get(info.id)
        if isinstance(opened, cls):
            return opened
        kvs = cls(info, storage)
        batcher.open_stores[info.id] = kvs
        return kvs

    @property
    def id(self) -> str:
        """The store's stable id."""
        return self._info.id

    @property
    def name(self) -> str | None:
        """The store's name, or None when it has none."""
        return self._info.name

    @property
    def storage(self) -> StorageBackend:
        """The backend the store lives in."""
        return self._storage

    @property
    def label(self) -> str:
        """How messages name the store: its name, or its id."""
        return self._label

    def __repr__(self) -> str:
        return f"<KeyValueStore {self.label!r} in {self._storage.url}>"

    # -- values -------------------------------------------------------------

    async def get_value(self, key: str, default: Any = None) -> Any:
        """The value under `key` (decoded by its content type), or `default`."""
        record = await self.get_record(key)
        if record is None:
            return default
        return self.decode(record)

    def decode(self, record: StoredRecord) -> Any:
        """Decode a record's bytes by its content type: JSON, text or bytes."""
        if is_json_content_type(record.content_type):
            try:
                return json.loads(record.value)
            except ValueError as exc:
                raise RecordCorruptError(
                    f"the stored record is not valid JSON ({exc})", store=self.label, key=record.key
                ) from exc
        if record.content_type.startswith("text/"):
            return record.value.decode("utf-8", errors="replace")
        return record.value

    async def set_value(self, key: str, value: Any, content_type: str | None = None) -> None:
        """Store `value` under `key`, durably, replacing what was there."""
        check_key(key, store=self.label)
        try:
            data, ctype = encode_value(value, content_type)
        except pydantic_core.PydanticSerializationError as exc:
            raise StorageError(
                f"the value cannot be stored as JSON: {exc}", store=self.label, key=key
            ) from exc
        await self._batcher.write(RecordWrite(self.id, key, data, ctype))

    async def delete_value(self, key: str) -> None:
        """Delete the record under `key` (and its history); nothing happens if absent."""
        check_key(key, store=self.label)
        await self._batcher.write(RecordDelete(self.id, key))

    async def record_exists(self, key: str) -> bool:
        """Whether a record is stored under `key`."""
        return await self.get_record(key) is not None

    async def iterate_keys(
        self, *, limit: int | None = None, exclusive_start_key: str | None = None
    ) -> AsyncIterator[RecordInfo]:
        """Yield what is known of each record (key, size, type, version, time), in key order.

        Keys sort by code point (as Python's `sorted`); the listing starts after
        `exclusive_start_key` (which need not be stored) and yields at most `limit`
        records. The records are fetched a page at a time, never the whole store at
        once; a record written while iterating is seen if its key is after the last
        one yielded.
        """
        _check_listing(self.label, limit, exclusive_start_key)
        start = exclusive_start_key
        left = limit
        while left is None or left > 0:
            page = KEY_PAGE_SIZE if left is None else min(KEY_PAGE_SIZE, left)
            infos = await self._storage.list_records(self.id, exclusive_start_key=start, limit=page)
            for info in infos:
                yield _listed(info)
            if len(infos) < page:
                return
            start = infos[-1].key
            if left is not None:
                left -= len(infos)

    async def list_keys(
        self, *, limit: int | None = None, exclusive_start_key: str | None = None
    ) -> list[RecordInfo]:
        """Each record's key, size, content type, version and time, in key order.

        `limit` and `exclusive_start_key` as in `iterate_keys`; without them, every
        record of the store (Crawlee stops at 1,000 unless told otherwise).
        """
        _check_listing(self.label, limit, exclusive_start_key)
        start = exclusive_start_key
        infos = await self._storage.list_records(self.id, exclusive_start_key=start, limit=limit)
        return [_listed(info) for info in infos]

    async def reopen(self) -> Self:
        """This store opened again by its name, made anew when its server lost it (restarted empty).

        Raises StoreNotFoundError for a store that has no name (one opened by id
        cannot be made again).
        """
        if self.name is None:
            raise StoreNotFoundError("the store is gone and has no name to make it again by", store=self.id)
        self._batcher.forget_store(self.id)
        return await type(self).open(name=self.name, storage=self._storage)

    async def open_quarantine(self) -> Self:
        """The store where unusable records of this one are set aside (created when missing)."""
        return await type(self).open(name=self.label + QUARANTINE_SUFFIX, storage=self._storage)

    async def drop(self) -> None:
        """Delete the store with every record in it and their history.

        The store is forgotten: opening its name again makes a new, empty store
        (with a new id), and this object fails with StoreNotFoundError from now on.
        """
        await self._batcher.drop_store(self.id)

    async def purge(self) -> None:
        """Delete every record of the store and their history; the store stays, with its id and name.

        A state still holding one of these records finds it gone, as after
        `delete_value`: its next fenced write is refused.
        """
        await self._storage.purge_store(self.id)

    # -- whole records (used by RecoverableState and the CLI) ----------------

    async def get_record(self, key: str, *, claim: bool = False, chain: bool = False) -> StoredRecord | None:
        """The whole stored record under `key`; with `claim`, take ownership of it too.

        A record kept as a snapshot and deltas is made whole (its deltas applied);
        with `chain`, it is answered as stored, its pieces packed in one value of
        content type `CHAIN_CONTENT_TYPE` (see `unpack_chain`).
        """
        check_key(key, store=self.label)
        record = await self._batcher.read(RecordRead(self.id, key, claim))
        if record is None or chain:
            return record
        return materialise(record, store=self.label)

    async def put_record(
        self,
        key: str,
        value: bytes,
        content_type: str,
        *,
        expected_version: int | None = None,
        keep_history: int = 0,
    ) -> WriteOutcome:
        """Write raw bytes, only if the stored version is `expected_version` (when given)."""
        check_key(key, store=self.label)
        return await self._batcher.write(
            RecordWrite(self.id, key, value, content_type, expected_version, keep_history)
        )

    async def delete_record(self, key: str, *, expected_version: int | None = None) -> bool:
        """Delete the record and its history if its version is `expected_version` (when given).

        True when it was deleted; False when it is absent or at another version.
        The delete travels in the batch of the writes that arrive with it.
        """
        check_key(key, store=self.label)
        return (await self._batcher.write(RecordDelete(self.id, key, expected_version))).applied

    @overload
    async def get_history(self, key: str, *, errors: Literal["raise"] = "raise") -> list[StoredRecord]: ...
    @overload
    async def get_history(
        self, key: str, *, errors: Literal["return"]
    ) -> list[StoredRecord | StorageError]: ...

    async def get_history(
        self, key: str, *, errors: Literal["raise", "return"] = "raise"
    ) -> list[StoredRecord] | list[StoredRecord | StorageError]:
        """The kept snapshots of `key`, newest first.

        A snapshot that cannot be read (damaged, or sealed with a key the ring
        lacks) raises its error; with `errors="return"` it is answered with its
        error in its place, and the others are still read.
        """
        check_key(key, store=self.label)
        snapshots = await self._batcher.history(self.id, key)
        if errors == "return":
            return snapshots
        for snapshot in snapshots:
            if isinstance(snapshot, StorageError):
                raise snapshot
        return [s for s in snapshots if not isinstance(s, StorageError)]  # none is left

    def prepare_put(
        self,
        key: str,
        value: bytes,
        content_type: str,
        *,
        expected_version: int | None = None,
        keep_history: int = 0,
    ) -> RecordWrite:
        """Describe a raw write for `put_together` (the key is taken as already checked)."""
        return RecordWrite(self.id, key, value, content_type, expected_version, keep_history)

    @staticmethod
    async def put_together(
        puts: Sequence[tuple[KeyValueStore, RecordWrite | RecordAppend]],
    ) -> list[WriteOutcome | StorageError]:
        """Apply many prepared writes and appends, across stores, in as few batches as there are backends.

        A write that failed on its own is answered with its error in its place.
        """
        writes = list(map(_second, puts))
        return await _per_backend(list(map(_first, puts)), writes, Batcher.write_many)

    @staticmethod
    async def get_together(
        gets: Sequence[tuple[KeyValueStore, str, bool]],
    ) -> list[StoredRecord | StorageError | None]:
        """Read many `(store, key, claim)` records, in as few batches as there are backends.

        The keys are taken as checked (see `check_key`), as in `prepare_put`. A record
        with deltas is answered as stored, as its chain (see `get_record`).

        A read that failed on its own is answered with its error in its place.
        """
        # Built from their fields: the NamedTuple's constructor is Python code (0.9 us a read).
        reads = [_new_read(RecordRead, (kvs.id, key, claim)) for kvs, key, claim in gets]
        return await _per_backend(list(map(_first, gets)), reads, Batcher.read_many)


def _listed(info: RecordInfo) -> RecordInfo:
    """A listed record as written: its content type without the checksum parameter."""
    content_type = without_checksum(info.content_type)
    return info if content_type is info.content_type else info._replace(content_type=content_type)


async def _purge_default_store_on_start(storage: StorageBackend) -> None:
    """Empty the default store if the `purge_on_start` setting is on (Crawlee's behaviour)."""
    if not configuration_service.get().purge_on_start:
        return
    info = await batcher_of(storage).find_store(name=DEFAULT_STORE_NAME)
    await storage.purge_store(info.id)


_first, _second = operator.itemgetter(0), operator.itemgetter(1)
_new_read = tuple.__new__


TRequest = TypeVar("TRequest")
TAnswer = TypeVar("TAnswer")


async def _per_backend(
    stores: Sequence[KeyValueStore],
    requests: list[TRequest],
    send: Callable[[Batcher, Sequence[TRequest]], Awaitable[Sequence[TAnswer]]],
) -> list[TAnswer]:
    """Send `requests[i]` (for `stores[i]`) in one batch per backend; their answers, in order."""
    groups = _by_backend(stores)
    if len(groups) == 1:  # the usual case: no per-request placing
        return list(await send(batcher_of(groups[0][0]), requests))
    answers: list[TAnswer | None] = [None] * len(requests)
    for storage, indexes in groups:
        batch = await send(batcher_of(storage), [requests[i] for i in indexes])
        for i, answer in zip(indexes, batch, strict=True):
            answers[i] = answer
    return answers  # type: ignore[return-value]  # every position was filled


def _backends_of(stores: Iterable[KeyValueStore]) -> list[StorageBackend]:
    """The distinct backends of `stores` (a few stores, whatever the number of states)."""
    distinct = set(stores)  # built in C: 100,000 writes cost 3 ms, not 30
    return list({id(kvs._storage): kvs._storage for kvs in distinct}.values())


def _by_backend(stores: Sequence[KeyValueStore]) -> list[tuple[StorageBackend, Sequence[int]]]:
    """The positions of `stores` grouped by the backend each store lives in."""
    backends = _backends_of(stores)
    if len(backends) == 1:  # the usual case: every position, without a look at each
        return [(backends[0], range(len(stores)))]
    groups: dict[int, tuple[StorageBackend, list[int]]] = {}
    for i, kvs in enumerate(stores):
        groups.setdefault(id(kvs._storage), (kvs._storage, []))[1].append(i)
    return list(groups.values())
