"""Conformance checks of stores and listings: names and ids, drop, purge, pages in key order."""

from __future__ import annotations

import random
import uuid

import pytest

from .._errors import StoreNotFoundError
from ..storage import (
    DEFAULT_STORE_NAME,
    KeyValueStore,
    RecordDelete,
    RecordRead,
    RecordWrite,
    StorageBackend,
    WriteOutcome,
)
from ._suite import BYTES, Suite, fresh_name, open_store, read, write


class StoreChecks(Suite):
    """Stores by name and id, their lifetime, and listing their records a page at a time."""

    async def test_named_stores_and_ids(self, backend: StorageBackend) -> None:
        first = await KeyValueStore.open(name="orders", storage=backend)
        other = await KeyValueStore.open(name="customers", storage=backend)
        assert (await backend.open_store(name="orders")).id == first.id
        assert first.id != other.id
        assert first.name == "orders"
        await first.set_value("k", "in orders")
        await other.set_value("k", "in customers")
        by_id = await backend.open_store(id=first.id)
        assert (by_id.id, by_id.name) == (first.id, "orders")
        assert await first.get_value("k") == "in orders"
        assert await other.get_value("k") == "in customers"
        stores = {s.id: s.name for s in await backend.list_stores()}
        assert stores[first.id] == "orders"
        assert stores[other.id] == "customers"
        listed = await backend.list_stores()
        assert listed == sorted(listed, key=lambda s: (s.name or "", s.id))

    async def test_opening_a_missing_id_names_it(self, backend: StorageBackend) -> None:
        missing = uuid.uuid4().hex
        with pytest.raises(StoreNotFoundError) as caught:
            await backend.open_store(id=missing)
        assert missing in str(caught.value)
        assert missing not in {s.id for s in await backend.list_stores()}

    async def test_the_default_store(self, backend: StorageBackend) -> None:
        default = await KeyValueStore.open(storage=backend)
        assert default.name == DEFAULT_STORE_NAME
        await default.set_value("k", 1)
        assert (await backend.open_store(name=DEFAULT_STORE_NAME)).id == default.id

    async def test_drop_deletes_the_store_with_its_records_and_history(self, backend: StorageBackend) -> None:
        doomed, kept = await open_store(backend, "doomed"), await open_store(backend, "kept")
        await doomed.put_record("k", b"v", BYTES, keep_history=2 if self.keeps_history else 0)
        await kept.set_value("k", "kept value")
        await backend.drop_store(doomed.id)
        await backend.drop_store(doomed.id)  # dropping what is gone is no error
        assert doomed.id not in {s.id for s in await backend.list_stores()}
        with pytest.raises(StoreNotFoundError):
            await backend.open_store(id=doomed.id)
        with pytest.raises(StoreNotFoundError):
            await backend.list_records(doomed.id)
        with pytest.raises(StoreNotFoundError):
            await backend.read_history(doomed.id, "k")
        assert await kept.get_value("k") == "kept value"
        reborn = await backend.open_store(name="doomed")
        assert reborn.id != doomed.id
        assert await backend.list_records(reborn.id) == []
        assert await backend.read_history(reborn.id, "k") == []

    async def test_every_request_to_an_unknown_store_names_it(self, backend: StorageBackend) -> None:
        missing = uuid.uuid4().hex
        (found,) = await read(backend, [RecordRead(missing, "k", claim=True)])
        outcomes = await write(backend, [RecordWrite(missing, "k", b"v", BYTES), RecordDelete(missing, "k")])
        assert isinstance(found, StoreNotFoundError)
        assert all(isinstance(o, StoreNotFoundError) for o in outcomes)
        for call in (
            lambda: backend.list_records(missing),
            lambda: backend.read_history(missing, "k"),
            lambda: backend.purge_store(missing),
        ):
            with pytest.raises(StoreNotFoundError):
                await call()

    async def test_purge_empties_the_store_and_keeps_it(self, backend: StorageBackend) -> None:
        kvs, bystander = await open_store(backend), await open_store(backend)
        # More than a page of the default purge.
        await write(backend, [RecordWrite(kvs.id, f"k{i:04d}", b"v", BYTES) for i in range(1200)])
        await kvs.put_record("h", b"v", BYTES, keep_history=2 if self.keeps_history else 0)
        await bystander.set_value("stays", 1)
        await backend.purge_store(kvs.id)
        assert await backend.list_records(kvs.id) == []
        assert await backend.read_history(kvs.id, "h") == []
        assert kvs.id in {s.id for s in await backend.list_stores()}
        assert await bystander.get_value("stays") == 1
        assert await kvs.put_record("k0000", b"again", BYTES, expected_version=0) == WriteOutcome(True, 1)

    async def test_keys_are_listed_in_code_point_order(self, backend: StorageBackend) -> None:
        kvs = await open_store(backend)
        keys = ["b", "a", "B", "a/b", "a.b", "ä", "z", "日本", "10", "9", "🙂", "\ue000", "\uffff", "𝄞"]
        values = {k: f"value of {k}".encode() * (i + 1) for i, k in enumerate(keys)}
        for key in random.sample(keys, len(keys)):
            await kvs.set_value(key, values[key])
        await kvs.set_value("z", values["z"])  # version 2
        listed = await kvs.list_keys()
        assert [i.key for i in listed] == sorted(keys)
        for info in listed:
            assert (info.size, info.content_type) == (len(values[info.key]), BYTES)
            assert info.version == (2 if info.key == "z" else 1)
        assert [i async for i in kvs.iterate_keys()] == listed

    async def test_listing_pages_and_purges_behave_like_a_sorted_dict(self, backend: StorageBackend) -> None:
        """Random writes, deletes and purges; after each step every page of every listing matches a model."""
        rng = random.Random(12)
        alphabet = ["a", "b", "A", "Z", "0", "-", ".", "/", "%", " ", "é", "ß", "日", "\uffff", "🙂", "𝄞"]
        pool = list({"".join(rng.choices(alphabet, k=rng.randint(1, 4))) for _ in range(60)})
        kvs = await open_store(backend, fresh_name())
        model: dict[str, int] = {}
        for step in range(12):
            if step % 5 == 4:
                await backend.purge_store(kvs.id)
                model.clear()
            else:
                for key in rng.sample(pool, 15):
                    await kvs.set_value(key, step)
                    model[key] = model.get(key, 0) + 1
                for key in rng.sample(sorted(model), min(3, len(model))):
                    await kvs.delete_value(key)
                    del model[key]
            ordered = sorted(model)
            for start in [None, *rng.sample(pool, 4)]:
                limit = rng.choice([None, 0, 1, 4, 100])
                infos = await backend.list_records(kvs.id, exclusive_start_key=start, limit=limit)
                want = [k for k in ordered if start is None or k > start]
                assert [i.key for i in infos] == (want if limit is None else want[:limit]), (
                    step,
                    start,
                    limit,
                )
                assert all(i.version == model[i.key] for i in infos)
            walked: list[str] = []
            while page := await backend.list_records(
                kvs.id, exclusive_start_key=walked[-1] if walked else None, limit=7
            ):
                walked += [i.key for i in page]
            assert walked == ordered
