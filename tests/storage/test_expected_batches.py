"""Batches whose every write expects a version: the shape a PERSIST_STATE sends.

A backend may apply such a batch as conditional updates without reading the
stored versions first (`expected_outcomes`), and must fall back to the planner
when one expectation fails. These tests check, on every backend, that the
answer is the planner's either way: the writes whose expectation holds apply,
the others are refused with the stored version, and nothing of a refused
write lands. A claim between two batches moves the expectations on.
"""

from __future__ import annotations

import os
import random
import uuid
from collections.abc import AsyncIterator

import pytest

from recoverable_state.storage import (
    KeyValueStore,
    RecordRead,
    RecordWrite,
    StorageBackend,
    WriteOutcome,
    open_backend,
)

pytestmark = pytest.mark.anyio

BYTES = "application/octet-stream"


async def _store(backend: StorageBackend) -> KeyValueStore:
    return await KeyValueStore.open(name=f"store-{uuid.uuid4().hex[:12]}", storage=backend)


@pytest.fixture
async def model() -> AsyncIterator[StorageBackend]:
    """The memory backend, which applies the planner and nothing else: the expected answers."""
    async with open_backend("memory://") as storage:
        yield storage


async def _listed_alike(kvs: KeyValueStore, ref: KeyValueStore) -> None:
    listed = [(i.key, i.version) for i in await kvs.list_keys()]
    assert listed == [(i.key, i.version) for i in await ref.list_keys()]


@pytest.mark.parametrize("stale_share", [0.0, 0.1, 1.0], ids=["all-hold", "some-stale", "all-stale"])
async def test_expected_batches_answer_as_the_planner(
    backend: StorageBackend, model: StorageBackend, backend_kind: str, stale_share: float
) -> None:
    kvs, ref = await _store(backend), await _store(model)
    rng = random.Random(f"{backend_kind}-{stale_share}")
    keys = [f"key-{i:03d}" for i in range(40)]
    known = dict.fromkeys(keys, 0)  # the version each key is at, as a careful writer knows it
    for round_ in range(8):
        if round_ % 3 == 2:  # another owner claims some keys: their known versions go stale
            claimed = rng.sample(keys, 5)
            got = await backend.read_batch([RecordRead(kvs.id, k, True) for k in claimed])
            want = await model.read_batch([RecordRead(ref.id, k, True) for k in claimed])
            assert [r and r.version for r in got] == [r and r.version for r in want]
        batch = []
        for key in rng.sample(keys, rng.randint(1, len(keys))):
            expected = known[key]
            if rng.random() < stale_share:
                expected = rng.choice([expected + 1, max(expected - 1, 0), expected + 5])
            batch.append(RecordWrite("", key, os.urandom(rng.randint(1, 300)), BYTES, expected))
        got_out = await backend.write_batch([w._replace(store_id=kvs.id) for w in batch])
        want_out = await model.write_batch([w._replace(store_id=ref.id) for w in batch])
        assert got_out == want_out, round_
        for w, outcome in zip(batch, want_out, strict=True):
            assert isinstance(outcome, WriteOutcome)
            known[w.key] = outcome.version
    for key in keys:
        got_rec, want_rec = await kvs.get_record(key), await ref.get_record(key)
        assert (got_rec and (got_rec.value, got_rec.version)) == (
            want_rec and (want_rec.value, want_rec.version)
        ), key
    await _listed_alike(kvs, ref)


async def test_one_stale_write_keeps_nothing_of_itself_and_spoils_no_other(backend: StorageBackend) -> None:
    kvs = await _store(backend)
    first = [RecordWrite(kvs.id, f"k{i}", b"one", BYTES, 0) for i in range(5)]
    assert all(o.applied for o in await backend.write_batch(first))  # type: ignore[union-attr]
    second = [RecordWrite(kvs.id, f"k{i}", b"two", BYTES, 1) for i in range(5)]
    second[3] = second[3]._replace(expected_version=7)  # a writer that lost track of k3
    outcomes = await backend.write_batch(second)
    assert outcomes == [
        WriteOutcome(True, 2),
        WriteOutcome(True, 2),
        WriteOutcome(True, 2),
        WriteOutcome(False, 1),
        WriteOutcome(True, 2),
    ]
    records = [await kvs.get_record(f"k{i}") for i in range(5)]
    assert [(r.value, r.version) for r in records if r] == [
        (b"two", 2),
        (b"two", 2),
        (b"two", 2),
        (b"one", 1),
        (b"two", 2),
    ]


async def test_a_new_key_expected_absent_is_refused_when_it_exists(backend: StorageBackend) -> None:
    kvs = await _store(backend)
    await backend.write_batch([RecordWrite(kvs.id, "taken", b"first", BYTES, 0)])
    outcomes = await backend.write_batch(
        [RecordWrite(kvs.id, "taken", b"second", BYTES, 0), RecordWrite(kvs.id, "free", b"x", BYTES, 0)]
    )
    assert outcomes == [WriteOutcome(False, 1), WriteOutcome(True, 1)]
    taken = await kvs.get_record("taken")
    assert taken is not None and (taken.value, taken.version) == (b"first", 1)


@pytest.mark.parametrize("share", [0.95, 0.3], ids=["most-of-the-store", "part-of-it"])
async def test_a_big_claiming_read_answers_as_the_planner(
    backend: StorageBackend, model: StorageBackend, backend_kind: str, share: float
) -> None:
    """Big reads take another path on some backends (SQLite reads the store's whole range)."""
    kvs, ref = await _store(backend), await _store(model)
    rng = random.Random(f"{backend_kind}-{share}")
    keys = [f"key-{i:05d}" for i in range(1200)]
    for store, target in ((kvs, backend), (ref, model)):
        outcomes = await target.write_batch([RecordWrite(store.id, k, k.encode(), BYTES, 0) for k in keys])
        assert all(isinstance(o, WriteOutcome) and o.applied for o in outcomes)
    asked = rng.sample(keys, int(len(keys) * share)) + [f"absent-{i}" for i in range(20)]
    asked += asked[:5]  # a key claimed twice in one batch is bumped twice
    rng.shuffle(asked)
    claims = [rng.random() < 0.8 for _ in asked]
    got = await backend.read_batch([RecordRead(kvs.id, k, c) for k, c in zip(asked, claims, strict=True)])
    want = await model.read_batch([RecordRead(ref.id, k, c) for k, c in zip(asked, claims, strict=True)])
    assert [r and (r.key, r.value, r.version) for r in got] == [  # type: ignore[union-attr]
        r and (r.key, r.value, r.version)
        for r in want  # type: ignore[union-attr]
    ]
    await _listed_alike(kvs, ref)
