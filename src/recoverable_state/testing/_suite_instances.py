"""Conformance checks across backend instances: reopening the data, and instances open at once."""

from __future__ import annotations

import anyio

from ..storage import KeyValueStore, RecordRead, StorageBackend, WriteOutcome
from ._suite import BYTES, MakeBackend, Suite, read, version_of


class InstanceChecks(Suite):
    """What another process sees: after a restart (`durable`), and at the same time (`shared`)."""

    async def test_records_survive_closing_and_opening_again(self, make_backend: MakeBackend) -> None:
        self.needs("durable")
        keep = 2 if self.keeps_history else 0
        async with make_backend() as first:
            kvs = await KeyValueStore.open(name="kept", storage=first)
            for n in range(3):
                await kvs.put_record("k", f"v{n}".encode(), BYTES, keep_history=keep)
            await kvs.get_record("k", claim=True)  # version 4
            await kvs.put_record("gone", b"x", BYTES)
            await kvs.delete_record("gone")
            store_id = kvs.id
        async with make_backend() as second:
            again = await KeyValueStore.open(id=store_id, storage=second)
            assert again.name == "kept"
            record = await again.get_record("k")
            assert record is not None
            assert (record.value, record.version) == (b"v2", 4)
            assert [(i.key, i.version) for i in await again.list_keys()] == [("k", 4)]
            if keep:
                assert [h.value for h in await again.get_history("k")] == [b"v2", b"v1"]
            assert await again.put_record("k", b"stale", BYTES, expected_version=3) == WriteOutcome(False, 4)

    async def test_a_claim_in_one_instance_fences_a_writer_in_another(
        self, backend: StorageBackend, open_more: MakeBackend
    ) -> None:
        self.needs("shared")
        a = await KeyValueStore.open(name="owned", storage=backend)
        b = await KeyValueStore.open(name="owned", storage=open_more())
        assert a.id == b.id
        assert await a.put_record("state", b"A's snapshot", BYTES, expected_version=0) == WriteOutcome(
            True, 1
        )
        taken = await b.get_record("state", claim=True)
        assert taken is not None
        assert (taken.value, taken.version) == (b"A's snapshot", 2)
        assert await a.put_record("state", b"A's stale one", BYTES, expected_version=1) == WriteOutcome(
            False, 2
        )
        assert not await a.delete_record("state", expected_version=1)
        assert await b.put_record("state", b"B's snapshot", BYTES, expected_version=2) == WriteOutcome(
            True, 3
        )
        assert await a.get_value("state") == b"B's snapshot"

    async def test_one_name_opened_at_once_by_several_instances_is_one_store(
        self, backend: StorageBackend, open_more: MakeBackend
    ) -> None:
        self.needs("shared")
        await backend.list_stores()  # the data exists before the race
        instances = [open_more() for _ in range(3)]
        ids: list[str] = []

        async def open_one(storage: StorageBackend) -> None:
            ids.append((await storage.open_store(name="raced")).id)

        async with anyio.create_task_group() as tg:
            for storage in instances:
                for _ in range(4):
                    tg.start_soon(open_one, storage)
        assert len(ids) == 12
        assert len(set(ids)) == 1

    async def test_fresh_data_first_used_by_several_instances_at_once(self, open_more: MakeBackend) -> None:
        self.needs("shared")
        instances = [open_more() for _ in range(6)]

        async def first_use(i: int, storage: StorageBackend) -> None:
            kvs = await KeyValueStore.open(name=f"first-{i}", storage=storage)
            await kvs.set_value("k", i)

        async with anyio.create_task_group() as tg:
            for i, storage in enumerate(instances):
                tg.start_soon(first_use, i, storage)
        for i, storage in enumerate(instances):
            other = (i + 1) % len(instances)
            kvs = await KeyValueStore.open(name=f"first-{other}", storage=storage)
            assert await kvs.get_value("k") == other

    async def test_compare_and_set_races_between_instances_have_one_winner(
        self, backend: StorageBackend, open_more: MakeBackend
    ) -> None:
        self.needs("shared")
        instances = [backend, open_more(), open_more()]
        stores = [await KeyValueStore.open(name="race", storage=b) for b in instances]
        outcomes: list[tuple[str, int, WriteOutcome]] = []

        async def cas(kvs: KeyValueStore, key: str, n: int) -> None:
            outcome = await kvs.put_record(key, f"{key}:{n}".encode(), BYTES, expected_version=0)
            outcomes.append((key, n, outcome))

        async with anyio.create_task_group() as tg:
            for n in range(30):
                for key in ("k1", "k2", "k3"):
                    tg.start_soon(cas, stores[n % len(stores)], key, n)
        for key in ("k1", "k2", "k3"):
            won = [n for k, n, o in outcomes if k == key and o.applied]
            assert len(won) == 1, key
            assert all(o.version == 1 for k, _, o in outcomes if k == key)
            assert await stores[0].get_value(key) == f"{key}:{won[0]}".encode()

    async def test_claims_in_several_instances_never_share_a_version(
        self, backend: StorageBackend, open_more: MakeBackend
    ) -> None:
        self.needs("shared")
        instances = [backend, open_more(), open_more()]
        kvs = await KeyValueStore.open(name="claimed", storage=backend)
        await kvs.put_record("k", b"v", BYTES)
        seen: list[int | None] = []

        async def claim(storage: StorageBackend) -> None:
            for _ in range(5):
                (found,) = await read(storage, [RecordRead(kvs.id, "k", claim=True)])
                seen.append(version_of(found))

        async with anyio.create_task_group() as tg:
            for storage in instances:
                tg.start_soon(claim, storage)
        assert sorted(v for v in seen if v is not None) == list(range(2, 17))
