"""Memory backend (`memory://`): records live in this process only, for tests."""

from __future__ import annotations

import heapq
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
from ._contract import compare_and_set, plan_reads, plan_writes


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

    def _missing(self, store_ids: set[str]) -> dict[str, StorageError]:
        return {
            sid: StoreNotFoundError("no such store (was it dropped?)", store=sid)
            for sid in store_ids
            if sid not in self._records
        }

    async def read_batch(self, reads: Sequence[RecordRead]) -> list[StoredRecord | StorageError | None]:
        await anyio.lowlevel.checkpoint()
        missing = self._missing({r.store_id for r in reads})
        found = {
            (r.store_id, r.key): rec
            for r in reads
            if r.store_id not in missing and (rec := self._records[r.store_id].get(r.key)) is not None
        }
        results, bumped = plan_reads(reads, found, missing)
        for (store_id, key), version in bumped.items():
            self._records[store_id][key] = found[(store_id, key)]._replace(version=version)
        return results

    async def write_batch(self, writes: Sequence[RecordWrite]) -> list[WriteOutcome | StorageError]:
        await anyio.lowlevel.checkpoint()
        missing = self._missing({w.store_id for w in writes})
        stored = {
            (w.store_id, w.key): rec.version
            for w in writes
            if w.store_id not in missing and (rec := self._records[w.store_id].get(w.key)) is not None
        }
        plan = plan_writes(writes, stored, missing)
        now = datetime.now(UTC)
        for (store_id, key), (w, version) in plan.rows.items():
            self._records[store_id][key] = StoredRecord(key, bytes(w.value), w.content_type, version, now)
        for pair, change in plan.history.items():
            kept = self._history.get(pair, [])
            new = [StoredRecord(pair[1], bytes(w.value), w.content_type, v, now) for v, w in change.added]
            self._history[pair] = new + kept[: change.keep_old]
        return plan.outcomes

    async def delete(self, store_id: str, key: str, expected_version: int | None = None) -> bool:
        await anyio.lowlevel.checkpoint()
        records = self._store(store_id)
        old = records.get(key)
        if old is None or not compare_and_set(expected_version, old.version):
            return False
        del records[key]
        self._history.pop((store_id, key), None)
        return True

    async def list_records(
        self, store_id: str, *, exclusive_start_key: str | None = None, limit: int | None = None
    ) -> list[RecordInfo]:
        await anyio.lowlevel.checkpoint()
        records = self._store(store_id)
        start = exclusive_start_key
        keys = (k for k in records if start is None or k > start)
        chosen = sorted(keys) if limit is None else heapq.nsmallest(limit, keys)
        return [
            RecordInfo(r.key, len(r.value), r.content_type, r.version, r.updated_at)
            for r in (records[k] for k in chosen)
        ]

    async def purge_store(self, store_id: str) -> None:
        await anyio.lowlevel.checkpoint()
        self._store(store_id).clear()
        for hkey in [k for k in self._history if k[0] == store_id]:
            del self._history[hkey]

    async def read_history(self, store_id: str, key: str) -> list[StoredRecord]:
        await anyio.lowlevel.checkpoint()
        self._store(store_id)
        return list(self._history.get((store_id, key), []))

    async def aclose(self) -> None:
        await anyio.lowlevel.checkpoint()
