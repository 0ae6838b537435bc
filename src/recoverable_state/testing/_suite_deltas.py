"""Conformance checks of deltas: `RecordAppend`, and a record read back as its snapshot and deltas."""

from __future__ import annotations

import json

import pytest

from .._errors import StoreNotFoundError
from ..storage import (
    CHAIN_CONTENT_TYPE,
    DELTA_CONTENT_TYPE,
    KeyRing,
    KeyValueStore,
    RecordAppend,
    RecordDelete,
    RecordRead,
    RecordWrite,
    StorageBackend,
    StoredRecord,
    WriteOutcome,
    unpack_chain,
)
from ._suite import MakeBackend, Suite, open_store, read, write

JSON = "application/json"


def _delta(spec: object, part: object) -> bytes:
    """A delta in the format of `recoverable_state.storage._chain` (`[spec, part]`)."""
    return json.dumps([spec, part]).encode()


def _pieces(record: StoredRecord | object) -> list[tuple[bytes, str]]:
    """The pieces of a record as read: [(snapshot, its type)] for a record without deltas."""
    assert isinstance(record, StoredRecord), f"expected a record, got {record!r}"
    if record.content_type != CHAIN_CONTENT_TYPE:
        return [(record.value, record.content_type)]
    return unpack_chain(record.value)


class DeltaChecks(Suite):
    """Appends: fenced by version, kept after the snapshot in order, dropped by a write or a delete.

    Skipped for a backend whose `keeps_deltas` is False (no append is handed to it).
    """

    def needs_deltas(self, backend: StorageBackend) -> None:
        if not backend.keeps_deltas:
            pytest.skip(f"{type(backend).__name__}.keeps_deltas is False")

    async def _base(self, backend: StorageBackend) -> KeyValueStore:
        self.needs_deltas(backend)
        kvs = await open_store(backend)
        outcomes = await write(backend, [RecordWrite(kvs.id, "k", b'{"a":1}', JSON)])
        assert outcomes == [WriteOutcome(True, 1)]
        return kvs

    async def test_an_append_follows_its_version(self, backend: StorageBackend) -> None:
        kvs = await self._base(backend)
        d1, d2 = _delta({"b": 1}, {"b": 2}), _delta({"a": 0}, {})
        outcomes = await write(
            backend,
            [
                RecordAppend(kvs.id, "k", d1, DELTA_CONTENT_TYPE, 1),
                RecordAppend(kvs.id, "k", d2, DELTA_CONTENT_TYPE, 1),  # the version moved on: refused
                RecordAppend(kvs.id, "k", d2, DELTA_CONTENT_TYPE, 2),
                RecordAppend(kvs.id, "absent", d1, DELTA_CONTENT_TYPE, 0),
                RecordAppend(kvs.id, "absent", d1, DELTA_CONTENT_TYPE, 1),
            ],
        )
        assert outcomes == [
            WriteOutcome(True, 2),
            WriteOutcome(False, 2),
            WriteOutcome(True, 3),
            WriteOutcome(False, 0),
            WriteOutcome(False, 0),
        ]
        (record, absent) = await read(backend, [RecordRead(kvs.id, "k"), RecordRead(kvs.id, "absent")])
        assert absent is None
        assert isinstance(record, StoredRecord)
        assert record.version == 3
        assert _pieces(record) == [(b'{"a":1}', JSON), (d1, DELTA_CONTENT_TYPE), (d2, DELTA_CONTENT_TYPE)]
        assert await kvs.get_value("k") == {"b": 2}

    async def test_a_write_or_a_delete_drops_the_deltas(self, backend: StorageBackend) -> None:
        kvs = await self._base(backend)
        d = _delta({"a": 1}, {"a": 5})
        await write(backend, [RecordAppend(kvs.id, "k", d, DELTA_CONTENT_TYPE, 1)])
        assert await write(backend, [RecordWrite(kvs.id, "k", b'{"a":9}', JSON, 2)]) == [
            WriteOutcome(True, 3)
        ]
        (record,) = await read(backend, [RecordRead(kvs.id, "k")])
        assert _pieces(record) == [(b'{"a":9}', JSON)]
        await write(backend, [RecordAppend(kvs.id, "k", d, DELTA_CONTENT_TYPE, 3)])
        assert await write(backend, [RecordDelete(kvs.id, "k")]) == [WriteOutcome(True, 0)]
        await write(backend, [RecordWrite(kvs.id, "k", b'{"a":0}', JSON, 0)])
        (record,) = await read(backend, [RecordRead(kvs.id, "k")])
        assert _pieces(record) == [(b'{"a":0}', JSON)]
        assert isinstance(record, StoredRecord)
        assert record.version == 1

    async def test_in_one_batch_each_request_sees_the_last(self, backend: StorageBackend) -> None:
        self.needs_deltas(backend)
        kvs = await open_store(backend)
        d1, d2 = _delta({"x": 1}, {"x": 1}), _delta({"y": 1}, {"y": 2})
        outcomes = await write(
            backend,
            [
                RecordWrite(kvs.id, "a", b"{}", JSON, 0),
                RecordAppend(kvs.id, "a", d1, DELTA_CONTENT_TYPE, 1),
                RecordAppend(kvs.id, "a", d2, DELTA_CONTENT_TYPE, 2),
                RecordWrite(kvs.id, "b", b"{}", JSON),
                RecordAppend(kvs.id, "b", d1, DELTA_CONTENT_TYPE, 1),
                RecordWrite(kvs.id, "b", b'{"z":3}', JSON, 2),
            ],
        )
        assert outcomes == [WriteOutcome(True, v) for v in (1, 2, 3, 1, 2, 3)]
        a, b = await read(backend, [RecordRead(kvs.id, "a"), RecordRead(kvs.id, "b")])
        assert _pieces(a) == [(b"{}", JSON), (d1, DELTA_CONTENT_TYPE), (d2, DELTA_CONTENT_TYPE)]
        assert _pieces(b) == [(b'{"z":3}', JSON)]
        assert [a.version, b.version] == [3, 3]  # type: ignore[union-attr]
        assert await kvs.get_value("a") == {"x": 1, "y": 2}

    async def test_a_claim_keeps_the_deltas_and_fences_the_old_writer(self, backend: StorageBackend) -> None:
        kvs = await self._base(backend)
        d = _delta({"a": 1}, {"a": 2})
        await write(backend, [RecordAppend(kvs.id, "k", d, DELTA_CONTENT_TYPE, 1)])
        (claimed,) = await read(backend, [RecordRead(kvs.id, "k", claim=True)])
        assert isinstance(claimed, StoredRecord)
        assert claimed.version == 3
        assert len(_pieces(claimed)) == 2
        late = await write(backend, [RecordAppend(kvs.id, "k", d, DELTA_CONTENT_TYPE, 2)])
        assert late == [WriteOutcome(False, 3)]
        assert await write(backend, [RecordAppend(kvs.id, "k", d, DELTA_CONTENT_TYPE, 3)]) == [
            WriteOutcome(True, 4)
        ]
        (record,) = await read(backend, [RecordRead(kvs.id, "k")])
        assert len(_pieces(record)) == 3

    async def test_many_deltas_keep_their_order(self, backend: StorageBackend) -> None:
        kvs = await self._base(backend)
        for n in range(1, 121):  # past any page or list size a backend might read in
            delta = _delta({"a": 1}, {"a": n})
            (outcome,) = await write(backend, [RecordAppend(kvs.id, "k", delta, DELTA_CONTENT_TYPE, n)])
            assert outcome == WriteOutcome(True, n + 1)
        (record,) = await read(backend, [RecordRead(kvs.id, "k")])
        assert [json.loads(v)[1]["a"] for v, _ in _pieces(record)[1:]] == list(range(1, 121))
        assert await kvs.get_value("k") == {"a": 120}

    async def test_an_append_to_a_missing_store_fails_alone(self, backend: StorageBackend) -> None:
        kvs = await self._base(backend)
        d = _delta({"a": 1}, {"a": 2})
        outcomes = await write(
            backend,
            [
                RecordAppend("no-such-store", "k", d, DELTA_CONTENT_TYPE, 1),
                RecordAppend(kvs.id, "k", d, DELTA_CONTENT_TYPE, 1),
            ],
        )
        assert isinstance(outcomes[0], StoreNotFoundError)
        assert outcomes[1] == WriteOutcome(True, 2)

    async def test_history_keeps_snapshots_and_purge_drops_deltas(self, backend: StorageBackend) -> None:
        self.needs_deltas(backend)
        self.needs("keeps_history")
        kvs = await open_store(backend)
        await write(backend, [RecordWrite(kvs.id, "k", b'{"a":1}', JSON, 0, keep_history=3)])
        await write(backend, [RecordAppend(kvs.id, "k", _delta({"a": 1}, {"a": 2}), DELTA_CONTENT_TYPE, 1)])
        await write(backend, [RecordWrite(kvs.id, "k", b'{"a":3}', JSON, 2, keep_history=3)])
        assert [r.version for r in await backend.read_history(kvs.id, "k")] == [3, 1]
        await write(backend, [RecordAppend(kvs.id, "k", _delta({"a": 1}, {"a": 4}), DELTA_CONTENT_TYPE, 3)])
        [info] = await backend.list_records(kvs.id)
        assert (info.key, info.version) == ("k", 4)
        await backend.purge_store(kvs.id)
        await write(backend, [RecordWrite(kvs.id, "k", b'{"a":5}', JSON, 0)])
        (record,) = await read(backend, [RecordRead(kvs.id, "k")])
        assert _pieces(record) == [(b'{"a":5}', JSON)]

    async def test_deltas_are_sealed_one_by_one(self, backend: StorageBackend) -> None:
        """Through the facade, each piece is checksummed (and sealed with a ring) on its own."""
        kvs = await self._base(backend)
        backend.key_ring = KeyRing([("k1", bytes(range(32)))])
        try:
            write_ = kvs.prepare_put("s", b'{"n":[1]}', JSON, expected_version=0)
            (_outcome,) = await KeyValueStore.put_together([(kvs, write_)])
            append = RecordAppend(kvs.id, "s", _delta({"n": ["x", 1]}, {"n": [2, 3]}), DELTA_CONTENT_TYPE, 1)
            assert await KeyValueStore.put_together([(kvs, append)]) == [WriteOutcome(True, 2)]
            (raw,) = await read(backend, [RecordRead(kvs.id, "s")])
            assert all("rs-crc32=" in ct and b"[2, 3]" not in v for v, ct in _pieces(raw))
            assert await kvs.get_value("s") == {"n": [1, 2, 3]}
            chain = await kvs.get_record("s", chain=True)
            assert chain is not None
            assert _pieces(chain)[1] == (append.value, DELTA_CONTENT_TYPE)
        finally:
            backend.key_ring = None

    async def test_deltas_are_seen_by_another_instance(
        self, backend: StorageBackend, open_more: MakeBackend
    ) -> None:
        kvs = await self._base(backend)
        self.needs("shared")
        d = _delta({"c": 1}, {"c": [1, 2]})
        await write(backend, [RecordAppend(kvs.id, "k", d, DELTA_CONTENT_TYPE, 1)])
        other = open_more()
        (record,) = await read(other, [RecordRead(kvs.id, "k", claim=True)])
        assert isinstance(record, StoredRecord)
        assert record.version == 3
        assert len(_pieces(record)) == 2
        assert await write(backend, [RecordAppend(kvs.id, "k", d, DELTA_CONTENT_TYPE, 2)]) == [
            WriteOutcome(False, 3)
        ]

    async def test_deltas_survive_a_restart(self, make_backend: MakeBackend) -> None:
        self.needs("durable")
        first = make_backend()
        try:
            self.needs_deltas(first)
            kvs = await open_store(first, "kept")
            await write(first, [RecordWrite(kvs.id, "k", b'{"l":[]}', JSON, 0)])
            await write(
                first,
                [RecordAppend(kvs.id, "k", _delta({"l": ["x", 0]}, {"l": ["a"]}), DELTA_CONTENT_TYPE, 1)],
            )
        finally:
            await first.aclose()
        second = make_backend()
        try:
            kvs = await open_store(second, "kept")
            assert await kvs.get_value("k") == {"l": ["a"]}
        finally:
            await second.aclose()
