"""A third-party storage backend, `snapshotfile:///abs/path`: all stores in one file, replaced per batch."""

from __future__ import annotations

import fcntl
import os
import pickle
from collections.abc import Callable, Mapping, Sequence, Set
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import anyio.to_thread

from recoverable_state import StorageError, StoreNotFoundError, storage
from recoverable_state.storage import RecordInfo, StoredRecord, StoreInfo, TransactionalBackend, WritePlan

T = TypeVar("T")
Data = dict[str, Any]  # {"stores": {id: name}, "records": {pair: record}, "history": {pair: [record, ...]}}


def open_snapshot_file(url: str, **options: Any) -> SnapshotFileBackend:
    """The entry point: no query parameter is accepted; pool_size and retry_timeout do not apply."""
    storage.url_options(url, ())
    return SnapshotFileBackend(url.removeprefix("snapshotfile://"))


class SnapshotFileBackend(TransactionalBackend[Data]):
    """A transaction reads the file under a lock; one that writes replaces the file, synced, then returns."""

    def __init__(self, path: str) -> None:
        self.path, self.url = Path(path), f"snapshotfile://{path}"

    async def run_transaction(
        self, fn: Callable[[Data], T], *, write: bool, store_ids: Set[str] = frozenset()
    ) -> T:
        return await anyio.to_thread.run_sync(self._transaction, fn, write)

    def _transaction(self, fn: Callable[[Data], T], write: bool) -> T:
        with open(f"{self.path}.lock", "a") as lock:  # flock: one writer at a time, in any thread or process
            fcntl.flock(lock, fcntl.LOCK_EX if write else fcntl.LOCK_SH)
            empty: Data = {"stores": {}, "records": {}, "history": {}}
            data = pickle.loads(self.path.read_bytes()) if self.path.exists() else empty  # our own file
            result = fn(data)
            if write:  # a new file, synced, renamed over the old one: never torn, durable on return
                with open(f"{self.path}.new", "wb") as new:
                    pickle.dump(data, new)
                    new.flush()
                    os.fsync(new.fileno())
                os.replace(f"{self.path}.new", self.path)
                folder = os.open(self.path.parent, os.O_RDONLY)
                os.fsync(folder)
                os.close(folder)
            return result

    def find_records(self, txn: Data, store_ids: Set[str], pairs: Sequence[storage.Pair]) -> Any:
        missing = {
            s: StoreNotFoundError("no such store", store=s) for s in store_ids if s not in txn["stores"]
        }
        return missing, {pair: txn["records"][pair] for pair in pairs if pair in txn["records"]}

    def store_claims(self, txn: Data, claimed: Mapping[storage.Pair, int]) -> None:
        for pair, version in claimed.items():
            txn["records"][pair] = txn["records"][pair]._replace(version=version)

    def apply_plan(self, txn: Data, plan: WritePlan) -> dict[storage.Pair, StorageError]:
        now, records, history = datetime.now(UTC), txn["records"], txn["history"]
        for pair in plan.deletes:
            del records[pair]
            history.pop(pair, None)
        for pair, (w, version) in plan.rows.items():
            records[pair] = StoredRecord(w.key, w.value, w.content_type, version, now)
        for pair, change in plan.history.items():
            added = [StoredRecord(w.key, w.value, w.content_type, v, now) for v, w in change.added]
            history[pair] = added + history.get(pair, [])[: change.keep_old]
        return {}

    async def open_store(self, *, name: str | None = None, id: str | None = None) -> StoreInfo:
        def find(data: Data) -> StoreInfo:
            if id is not None and id not in data["stores"]:
                raise StoreNotFoundError("no store has this id", store=id)
            found = id or next((s for s, n in data["stores"].items() if n == name), os.urandom(16).hex())
            return StoreInfo(found, data["stores"].setdefault(found, name))

        return await self.run_transaction(find, write=id is None)

    async def list_stores(self) -> list[StoreInfo]:
        stores = (await self.run_transaction(lambda data: data, write=False))["stores"]
        return sorted((StoreInfo(s, n) for s, n in stores.items()), key=lambda s: (s.name or "", s.id))

    async def drop_store(self, store_id: str) -> None:
        def drop(data: Data) -> None:
            data["stores"].pop(store_id, None)
            for part in ("records", "history"):
                data[part] = {pair: v for pair, v in data[part].items() if pair[0] != store_id}

        await self.run_transaction(drop, write=True)

    async def _part(self, part: str, store_id: str) -> dict[str, Any]:
        data = await self.run_transaction(lambda data: data, write=False)  # a copy: each is read anew
        if store_id not in data["stores"]:
            raise StoreNotFoundError("no such store", store=store_id)
        return {key: v for (sid, key), v in data[part].items() if sid == store_id}

    async def list_records(
        self, store_id: str, *, exclusive_start_key: str | None = None, limit: int | None = None
    ) -> list[RecordInfo]:
        found = await self._part("records", store_id)
        keys = sorted(k for k in found if exclusive_start_key is None or k > exclusive_start_key)[:limit]
        return [RecordInfo(k, len(found[k].value), *found[k][2:]) for k in keys]

    async def read_history(self, store_id: str, key: str) -> list[StoredRecord]:
        return list((await self._part("history", store_id)).get(key, []))

    async def aclose(self) -> None:
        """Nothing stays open between transactions."""
