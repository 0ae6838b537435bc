"""Memory backend (`memory://`): records live in this process only, for tests."""

from __future__ import annotations

import heapq
import uuid
from collections.abc import Callable, Mapping, Sequence, Set
from datetime import UTC, datetime
from typing import TypeVar

import anyio.lowlevel

from .._errors import StorageError, StoreNotFoundError
from ._backend import Durability, RecordInfo, StoredRecord, StoreInfo
from ._chain import CHAIN_CONTENT_TYPE, pack_chain
from ._contract import Pair, WritePlan
from ._transactional import TransactionalBackend

T = TypeVar("T")


class MemoryBackend(TransactionalBackend["MemoryBackend"]):
    """Keeps every store in dictionaries; nothing survives the process.

    A transaction is the code between two awaits on the event loop (nothing else
    runs meanwhile), and its handle is the backend itself.
    """

    keeps_deltas = True

    def __init__(self) -> None:
        super().__init__()
        self.url = "memory://"
        self._stores: dict[str, StoreInfo] = {}
        self._records: dict[str, dict[str, StoredRecord]] = {}
        self._history: dict[Pair, list[StoredRecord]] = {}
        self._deltas: dict[Pair, list[tuple[bytes, str]]] = {}

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
        self._forget_history(store_id)

    def _forget_history(self, store_id: str) -> None:
        for table in (self._history, self._deltas):
            for hkey in [k for k in table if k[0] == store_id]:
                del table[hkey]

    # -- the transactional primitives ------------------------------------------

    async def run_transaction(
        self, fn: Callable[[MemoryBackend], T], *, write: bool, store_ids: Set[str]
    ) -> T:
        await anyio.lowlevel.checkpoint()
        return fn(self)

    def _missing(self, store_ids: Set[str]) -> dict[str, StorageError]:
        return {
            sid: StoreNotFoundError("no such store (was it dropped?)", store=sid)
            for sid in store_ids
            if sid not in self._records
        }

    def find_records(
        self, txn: MemoryBackend, store_ids: Set[str], pairs: Sequence[Pair]
    ) -> tuple[dict[str, StorageError], dict[Pair, StoredRecord]]:
        records = self._records
        found = {
            (sid, key): rec
            for sid, key in pairs
            if sid in records and (rec := records[sid].get(key)) is not None
        }
        if self._deltas:
            for pair, record in found.items():
                if (deltas := self._deltas.get(pair)) is not None:
                    chain = pack_chain([(record.value, record.content_type), *deltas])
                    found[pair] = record._replace(value=chain, content_type=CHAIN_CONTENT_TYPE)
        return self._missing(store_ids), found

    def store_claims(self, txn: MemoryBackend, claimed: Mapping[Pair, int]) -> None:
        for (store_id, key), version in claimed.items():
            records = self._records[store_id]
            records[key] = records[key]._replace(version=version)

    def apply_plan(self, txn: MemoryBackend, plan: WritePlan) -> dict[Pair, StorageError]:
        now = datetime.now(UTC)
        for pair in plan.deletes:
            del self._records[pair[0]][pair[1]]
            self._history.pop(pair, None)
            self._deltas.pop(pair, None)
        for (store_id, key), (w, version) in plan.rows.items():
            self._records[store_id][key] = StoredRecord(key, bytes(w.value), w.content_type, version, now)
            self._deltas.pop((store_id, key), None)
        for (store_id, key), added in plan.appends.items():
            records = self._records[store_id]
            records[key] = records[key]._replace(version=added[-1][0], updated_at=now)
            self._deltas.setdefault((store_id, key), []).extend(
                (bytes(a.value), a.content_type) for _, a in added
            )
        for pair, change in plan.history.items():
            kept = self._history.get(pair, [])
            new = [StoredRecord(pair[1], bytes(w.value), w.content_type, v, now) for v, w in change.added]
            self._history[pair] = new + kept[: change.keep_old]
        return {}

    # -- listings ----------------------------------------------------------------

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
        self._forget_history(store_id)

    async def read_history(self, store_id: str, key: str) -> list[StoredRecord]:
        await anyio.lowlevel.checkpoint()
        self._store(store_id)
        return list(self._history.get((store_id, key), []))

    async def describe_durability(self) -> Durability:
        """Not durable: the records live in this process and end with it."""
        return Durability("memory", False, "not durable: the records live in this process and end with it")

    async def aclose(self) -> None:
        await anyio.lowlevel.checkpoint()
