"""Conformance checks against the planner: the memory backend, which applies it and nothing else.

A batch whose every write expects a version (the shape a PERSIST_STATE sends)
may take another path in a backend (`expected_outcomes`, SQLite's conditional
updates); its answer must be the planner's either way.
"""

from __future__ import annotations

import os
import random
from collections.abc import AsyncIterator, Sequence

import pytest

from ..storage import (
    KeyValueStore,
    MemoryBackend,
    RecordDelete,
    RecordRead,
    RecordWrite,
    StorageBackend,
    StoredRecord,
    WriteOp,
    WriteOutcome,
)
from ._suite import BYTES, Suite, open_store, read, write


def _seen(found: Sequence[StoredRecord | Exception | None]) -> list[tuple[str, bytes, int] | None]:
    return [
        None if r is None else (r.key, r.value, r.version) if isinstance(r, StoredRecord) else ("!", b"", 0)
        for r in found
    ]


async def same_records(kvs: KeyValueStore, ref: KeyValueStore, keys: list[str], *, history: bool) -> None:
    """The store holds what the model holds: records, listings and (with `history`) kept snapshots."""
    got = await KeyValueStore.get_together([(kvs, key, False) for key in keys])
    want = await KeyValueStore.get_together([(ref, key, False) for key in keys])
    assert [(r.value, r.content_type, r.version) if isinstance(r, StoredRecord) else r for r in got] == [
        (r.value, r.content_type, r.version) if isinstance(r, StoredRecord) else r for r in want
    ]
    assert [(i.key, i.size, i.version) for i in await kvs.list_keys()] == [
        (i.key, i.size, i.version) for i in await ref.list_keys()
    ]
    if history:
        for key in keys:
            assert [(h.version, h.value) for h in await kvs.get_history(key)] == [
                (h.version, h.value) for h in await ref.get_history(key)
            ], key


async def check_random_batches(backend: StorageBackend, seed: str, *, keeps_history: bool) -> None:
    """Random batches of CAS writes, deletes, history and claims: the same answers as the planner's."""
    async with MemoryBackend() as model:
        kvs, ref = await open_store(backend), await open_store(model)
        rng = random.Random(seed)
        keys = [f"key-{i}" for i in range(6)]
        versions = dict.fromkeys(keys, 0)
        for round_ in range(12):
            if round_ % 3 == 2:
                asked = [(rng.choice(keys), rng.random() < 0.5) for _ in range(8)]
                got = await read(backend, [RecordRead(kvs.id, k, c) for k, c in asked])
                want = await read(model, [RecordRead(ref.id, k, c) for k, c in asked])
                assert _seen(got) == _seen(want), round_
                for r in want:
                    if isinstance(r, StoredRecord):
                        versions[r.key] = max(versions[r.key], r.version)
                continue
            batch: list[WriteOp] = []
            for _ in range(rng.randint(1, 20)):
                key = rng.choice(keys)
                expected = rng.choice([None, None, 0, versions[key], versions[key] + 1, versions[key]])
                if rng.random() < 0.15:
                    batch.append(RecordDelete("", key, expected))
                    continue
                keep = rng.choice([0, 0, 1, 2, 4]) if keeps_history else 0
                value = os.urandom(rng.randint(0, 1500))
                batch.append(RecordWrite("", key, value, f"type/{rng.randint(1, 3)}", expected, keep))
            got_out = await write(backend, [w._replace(store_id=kvs.id) for w in batch])
            want_out = await write(model, [w._replace(store_id=ref.id) for w in batch])
            assert got_out == want_out, (round_, batch)
            for w, outcome in zip(batch, want_out, strict=True):
                assert isinstance(outcome, WriteOutcome)
                versions[w.key] = max(versions[w.key], outcome.version)
        await same_records(kvs, ref, keys, history=keeps_history)


class ModelChecks(Suite):
    """Answers compared with the planner's, on batches of the shapes that take other paths."""

    @pytest.fixture
    async def model(self) -> AsyncIterator[StorageBackend]:
        """The memory backend: the planner's answers."""
        async with MemoryBackend() as storage:
            yield storage

    @pytest.mark.parametrize("stale_share", [0.0, 0.1, 1.0], ids=["all-hold", "some-stale", "all-stale"])
    async def test_batches_expecting_every_version_answer_as_the_planner(
        self, backend: StorageBackend, model: StorageBackend, stale_share: float
    ) -> None:
        kvs, ref = await open_store(backend), await open_store(model)
        rng = random.Random(f"{type(self).__name__}-{stale_share}")
        keys = [f"key-{i:03d}" for i in range(40)]
        known = dict.fromkeys(keys, 0)  # the version each key is at, as a careful writer knows it
        for round_ in range(8):
            if round_ % 3 == 2:  # another owner claims some keys: their known versions go stale
                claimed = rng.sample(keys, 5)
                got = await read(backend, [RecordRead(kvs.id, k, True) for k in claimed])
                want = await read(model, [RecordRead(ref.id, k, True) for k in claimed])
                assert _seen(got) == _seen(want)
            batch = []
            for key in rng.sample(keys, rng.randint(1, len(keys))):
                expected = known[key]
                if rng.random() < stale_share:
                    expected = rng.choice([expected + 1, max(expected - 1, 0), expected + 5])
                batch.append(RecordWrite("", key, os.urandom(rng.randint(1, 300)), BYTES, expected))
            got_out = await write(backend, [w._replace(store_id=kvs.id) for w in batch])
            want_out = await write(model, [w._replace(store_id=ref.id) for w in batch])
            assert got_out == want_out, round_
            for w, outcome in zip(batch, want_out, strict=True):
                assert isinstance(outcome, WriteOutcome)
                known[w.key] = outcome.version
        await same_records(kvs, ref, keys, history=False)

    async def test_one_stale_write_keeps_nothing_of_itself_and_spoils_no_other(
        self, backend: StorageBackend
    ) -> None:
        kvs = await open_store(backend)
        first = [RecordWrite(kvs.id, f"k{i}", b"one", BYTES, 0) for i in range(5)]
        assert await write(backend, first) == [WriteOutcome(True, 1)] * 5
        second = [RecordWrite(kvs.id, f"k{i}", b"two", BYTES, 1) for i in range(5)]
        second[3] = second[3]._replace(expected_version=7)  # a writer that lost track of k3
        outcomes = await write(backend, second)
        assert outcomes == [WriteOutcome(True, 2)] * 3 + [WriteOutcome(False, 1), WriteOutcome(True, 2)]
        records = [await kvs.get_record(f"k{i}") for i in range(5)]
        assert [(r.value, r.version) for r in records if r] == [(b"two", 2)] * 3 + [(b"one", 1), (b"two", 2)]

    async def test_a_new_key_expected_absent_is_refused_when_it_exists(self, backend: StorageBackend) -> None:
        kvs = await open_store(backend)
        await write(backend, [RecordWrite(kvs.id, "taken", b"first", BYTES, 0)])
        outcomes = await write(
            backend,
            [RecordWrite(kvs.id, "taken", b"second", BYTES, 0), RecordWrite(kvs.id, "free", b"x", BYTES, 0)],
        )
        assert outcomes == [WriteOutcome(False, 1), WriteOutcome(True, 1)]
        taken = await kvs.get_record("taken")
        assert taken is not None
        assert (taken.value, taken.version) == (b"first", 1)

    @pytest.mark.parametrize("share", [0.95, 0.3], ids=["most-of-the-store", "part-of-it"])
    async def test_a_big_claiming_read_answers_as_the_planner(
        self, backend: StorageBackend, model: StorageBackend, share: float
    ) -> None:
        """Big reads may take another path (SQLite reads the store's whole range)."""
        kvs, ref = await open_store(backend), await open_store(model)
        rng = random.Random(f"{type(self).__name__}-{share}")
        keys = [f"key-{i:05d}" for i in range(1200)]
        for store, target in ((kvs, backend), (ref, model)):
            outcomes = await write(target, [RecordWrite(store.id, k, k.encode(), BYTES, 0) for k in keys])
            assert outcomes == [WriteOutcome(True, 1)] * len(keys)
        asked = rng.sample(keys, int(len(keys) * share)) + [f"absent-{i}" for i in range(20)]
        asked += asked[:5]  # a key claimed twice in one batch is bumped twice
        rng.shuffle(asked)
        claims = [rng.random() < 0.8 for _ in asked]
        got = await read(backend, [RecordRead(kvs.id, k, c) for k, c in zip(asked, claims, strict=True)])
        want = await read(model, [RecordRead(ref.id, k, c) for k, c in zip(asked, claims, strict=True)])
        assert _seen(got) == _seen(want)
        await same_records(kvs, ref, [], history=False)
