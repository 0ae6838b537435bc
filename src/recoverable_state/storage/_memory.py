"""Memory backend (`memory://`): records live in this process only, for tests."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime

import anyio.lowlevel

from .._errors import StorageError, StoreNotFoundError
from ._backend import (
    RecordInfo,
    RecordRead,
    RecordWrite,
    StorageBackend,
    StoredRecord,
    StoreInfo,
    WriteOutcome,
)


class MemoryBackend(StorageBackend):
    """Keeps every store in dictionaries; nothing survives the process."""

    def __init__(self) -> None:
        super().__init__()
        self.url = "memory://"
        self._stores: dict[str, StoreInfo] = {}
        self._records: dict[str, dict[str, StoredRecord]] = {}
        self._history: dict[tuple[str, str], list[StoredRecord]] = {}

    def _store(self, store_id: str) -> dict[str, StoredRecord]:
        try:
            return self._records[store_id]
        except KeyError:
            raise StoreNotFoundError("no such store", store=store_id) from None

    async def open_store(self, *, name: str | None = None, id: str | None = None) -> StoreInfo:
        await anyio.lowlevel.checkpoint()
        if id is not None:
            if id not in self._stores:
                raise StoreNotFoundError("no store has this id", store=id)
            return self._stores[id]
        for info in self._stores.values():
            if info.name == name:
                return info
        info = StoreInfo(id=uuid.uuid4().hex, name=name)
        self._stores[info.id] = info
        self._records[info.id] = {}
        return info

    async def list_stores(self) -> list[StoreInfo]:
        await anyio.lowlevel.checkpoint()
        return sorted(self._stores.values(), key=lambda s: (s.name or "", s.id))

    async def drop_store(self, store_id: str) -> None:
        await anyio.lowlevel.checkpoint()
        self._stores.pop(store_id, None)
        self._records.pop(store_id, None)
        for hkey in [k for k in self._history if k[0] == store_id]:
            del self._history[hkey]

    async def read_batch(self, reads: Sequence[RecordRead]) -> list[StoredRecord | StorageError | None]:
        await anyio.lowlevel.checkpoint()
        found: list[StoredRecord | StorageError | None] = []
        for r in reads:
            try:
                records = self._store(r.store_id)
            except StoreNotFoundError as exc:
                found.append(exc)
                continue
            rec = records.get(r.key)
            if rec is not None and r.claim:
                rec = StoredRecord(rec.key, rec.value, rec.content_type, rec.version + 1, rec.updated_at)
                records[r.key] = rec
            found.append(rec)
        return found

    async def write_batch(self, writes: Sequence[RecordWrite]) -> list[WriteOutcome | StorageError]:
        await anyio.lowlevel.checkpoint()
        outcomes: list[WriteOutcome | StorageError] = []
        now = datetime.now(UTC)
        for w in writes:
            try:
                records = self._store(w.store_id)
            except StoreNotFoundError as exc:
                outcomes.append(exc)
                continue
            old = records.get(w.key)
            stored = old.version if old is not None else 0
            if w.expected_version is not None and w.expected_version != stored:
                outcomes.append(WriteOutcome(applied=False, version=stored))
                continue
            rec = StoredRecord(w.key, bytes(w.value), w.content_type, stored + 1, now)
            records[w.key] = rec
            if w.keep_history > 0:
                kept = self._history.setdefault((w.store_id, w.key), [])
                kept.insert(0, rec)
                del kept[w.keep_history :]
            outcomes.append(WriteOutcome(applied=True, version=rec.version))
        return outcomes

    async def delete(self, store_id: str, key: str, expected_version: int | None = None) -> bool:
        await anyio.lowlevel.checkpoint()
        records = self._store(store_id)
        old = records.get(key)
        if old is None or (expected_version is not None and old.version != expected_version):
            return False
        del records[key]
        self._history.pop((store_id, key), None)
        return True

    async def list_records(self, store_id: str) -> list[RecordInfo]:
        await anyio.lowlevel.checkpoint()
        return [
            RecordInfo(r.key, len(r.value), r.content_type, r.version, r.updated_at)
            for _, r in sorted(self._store(store_id).items())
        ]

    async def read_history(self, store_id: str, key: str) -> list[StoredRecord]:
        await anyio.lowlevel.checkpoint()
        self._store(store_id)
        return list(self._history.get((store_id, key), []))

    async def aclose(self) -> None:
        await anyio.lowlevel.checkpoint()
