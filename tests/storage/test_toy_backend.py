"""A toy backend written here, in well under 100 lines, proves itself with the shipped suite.

It keeps its stores in a plain object that each test makes once, so that two
backends over it behave like two processes over one database (`shared`), and a
backend opened again finds what the first one wrote (`durable`).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping, Sequence, Set
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

import anyio.lowlevel
import pytest

from recoverable_state import StorageError, StoreNotFoundError
from recoverable_state.storage import (
    Pair,
    RecordInfo,
    StoredRecord,
    StoreInfo,
    TransactionalBackend,
    WritePlan,
)
from recoverable_state.testing import BackendConformance
from recoverable_state.testing.conformance import MakeBackend

T = TypeVar("T")


@dataclass
class Data:
    stores: dict[str, str | None] = field(default_factory=dict)
    records: dict[Pair, StoredRecord] = field(default_factory=dict)
    history: dict[Pair, list[StoredRecord]] = field(default_factory=dict)


class ToyBackend(TransactionalBackend[Data]):
    """A transaction is the code between two awaits on the event loop: nothing else runs meanwhile."""

    def __init__(self, data: Data) -> None:
        self.data, self.url = data, "toy://"

    async def run_transaction(self, fn: Callable[[Data], T], *, write: bool, store_ids: Set[str]) -> T:
        await anyio.lowlevel.checkpoint()
        return fn(self.data)

    def find_records(
        self, txn: Data, store_ids: Set[str], pairs: Sequence[Pair]
    ) -> tuple[dict[str, StorageError], dict[Pair, StoredRecord]]:
        missing = {s: StoreNotFoundError("no such store", store=s) for s in store_ids if s not in txn.stores}
        return missing, {pair: txn.records[pair] for pair in pairs if pair in txn.records}

    def store_claims(self, txn: Data, claimed: Mapping[Pair, int]) -> None:
        for pair, version in claimed.items():
            txn.records[pair] = txn.records[pair]._replace(version=version)

    def apply_plan(self, txn: Data, plan: WritePlan) -> dict[Pair, StorageError]:
        now = datetime.now(UTC)
        for pair in plan.deletes:
            del txn.records[pair]
            txn.history.pop(pair, None)
        for pair, (w, version) in plan.rows.items():
            txn.records[pair] = StoredRecord(w.key, w.value, w.content_type, version, now)
        for pair, change in plan.history.items():
            added = [StoredRecord(w.key, w.value, w.content_type, v, now) for v, w in change.added]
            txn.history[pair] = added + txn.history.get(pair, [])[: change.keep_old]
        return {}

    async def open_store(self, *, name: str | None = None, id: str | None = None) -> StoreInfo:
        await anyio.lowlevel.checkpoint()
        if id is not None and id not in self.data.stores:
            raise StoreNotFoundError("no store has this id", store=id)
        found = id or next((s for s, n in self.data.stores.items() if n == name), uuid.uuid4().hex)
        return StoreInfo(found, self.data.stores.setdefault(found, name))

    async def list_stores(self) -> list[StoreInfo]:
        await anyio.lowlevel.checkpoint()
        return sorted(
            (StoreInfo(s, n) for s, n in self.data.stores.items()), key=lambda s: (s.name or "", s.id)
        )

    async def drop_store(self, store_id: str) -> None:
        await anyio.lowlevel.checkpoint()
        self.data.stores.pop(store_id, None)
        self.data.records = {p: r for p, r in self.data.records.items() if p[0] != store_id}
        self.data.history = {p: h for p, h in self.data.history.items() if p[0] != store_id}

    def _keys(self, store_id: str) -> list[str]:
        if store_id not in self.data.stores:
            raise StoreNotFoundError("no such store", store=store_id)
        return sorted(key for sid, key in self.data.records if sid == store_id)

    async def list_records(
        self, store_id: str, *, exclusive_start_key: str | None = None, limit: int | None = None
    ) -> list[RecordInfo]:
        await anyio.lowlevel.checkpoint()
        keys = [k for k in self._keys(store_id) if exclusive_start_key is None or k > exclusive_start_key]
        records = [self.data.records[(store_id, k)] for k in keys[:limit]]
        return [RecordInfo(r.key, len(r.value), r.content_type, r.version, r.updated_at) for r in records]

    async def read_history(self, store_id: str, key: str) -> list[StoredRecord]:
        await anyio.lowlevel.checkpoint()
        self._keys(store_id)
        return list(self.data.history.get((store_id, key), []))

    async def aclose(self) -> None:
        await anyio.lowlevel.checkpoint()


class TestToyBackend(BackendConformance):
    @pytest.fixture
    def make_backend(self) -> MakeBackend:
        data = Data()
        return lambda: ToyBackend(data)


def test_the_toy_backend_is_under_100_lines() -> None:
    source = Path(__file__).read_text()
    toy = source[source.index("@dataclass") : source.index("class TestToyBackend")]
    assert len(toy.strip().splitlines()) < 100
