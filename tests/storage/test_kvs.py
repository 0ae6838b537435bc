"""KeyValueStore as Crawlee users know it, on all five stores and both loops.

- Opening a store that is already open hands back the same object (by name or
  by id); dropping it forgets it, and the name then opens a new, empty store.
- `list_keys` / `iterate_keys` take `limit` and `exclusive_start_key`: keys in
  code point order, starting after the given key, at most `limit` of them.
- `drop()` deletes a store with its records; `purge()` empties it and keeps it.
- `purge_on_start` empties the default store when the first store is opened,
  and never a named store.
"""

from __future__ import annotations

import random
import uuid
from pathlib import Path

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recoverable_state import InvalidKeyError, StoreNotFoundError, service_locator
from recoverable_state.storage import (
    DEFAULT_STORE_NAME,
    JSON_CONTENT_TYPE,
    KeyValueStore,
    StorageBackend,
    check_key,
    open_backend,
)
from recoverable_state.storage._kvs import MAX_KEY_LENGTH

pytestmark = pytest.mark.anyio


def fresh_name() -> str:
    return f"store-{uuid.uuid4().hex[:12]}"


# Keys whose code point order differs from UTF-16 order (U+E000 and U+FFFF sort
# after the astral 🙂 in UTF-16, before it in code points), from case-folded or
# locale order ("B" < "a", "Z" < "ä"), and keys that differ only past their
# 200th character or are long in bytes.
ORDER_KEYS = [
    "a",
    "B",
    "b",
    "Z",
    "ä",
    "é",
    "a b",
    "a-b",
    "a.b",
    "a/b",
    "a%b",
    "a~b",
    "10",
    "9",
    "日本",
    "\ud7ff",
    "\ue000",
    "\uffff",
    "🙂",
    "𝄞",
    "x" * 250 + "a",
    "x" * 250 + "b",
    "x" * 250,
    "🙂" * 1024,
    "é" * 700 + "z",
]


async def _fill(kvs: KeyValueStore, keys: list[str]) -> None:
    """Store a small value under each key, in random order, concurrently."""
    async with anyio.create_task_group() as tg:
        for key in random.sample(keys, len(keys)):
            tg.start_soon(kvs.set_value, key, {"k": len(key)})


# -- one object per open store -------------------------------------------------


async def test_opening_an_open_store_again_returns_the_same_object(backend: StorageBackend) -> None:
    name = fresh_name()
    first = await KeyValueStore.open(name=name, storage=backend)
    assert await KeyValueStore.open(name=name, storage=backend) is first
    assert await KeyValueStore.open(id=first.id, storage=backend) is first

    default = await KeyValueStore.open(storage=backend)
    assert await KeyValueStore.open(storage=backend) is default
    assert await KeyValueStore.open(name=DEFAULT_STORE_NAME, storage=backend) is default
    assert await KeyValueStore.open(id=default.id, storage=backend) is default
    assert default is not first


async def test_a_store_first_opened_by_id_is_the_object_its_name_opens(backend: StorageBackend) -> None:
    name = fresh_name()
    store_id = (await backend.open_store(name=name)).id  # made without the facade
    by_id = await KeyValueStore.open(id=store_id, storage=backend)
    assert by_id.name == name
    assert await KeyValueStore.open(name=name, storage=backend) is by_id


async def test_concurrent_opens_of_one_store_get_one_object(backend: StorageBackend) -> None:
    name = fresh_name()
    opened: list[KeyValueStore] = []

    async def open_it() -> None:
        opened.append(await KeyValueStore.open(name=name, storage=backend))

    async with anyio.create_task_group() as tg:
        for _ in range(20):
            tg.start_soon(open_it)
    assert len(opened) == 20
    assert all(kvs is opened[0] for kvs in opened)


async def test_each_storage_backend_has_its_own_objects(storage_url: str) -> None:
    async with open_backend(storage_url) as one, open_backend(storage_url) as two:
        name = fresh_name()
        a = await KeyValueStore.open(name=name, storage=one)
        b = await KeyValueStore.open(name=name, storage=two)
        assert a is not b
        assert a.storage is one and b.storage is two


async def test_the_default_storage_hands_out_one_object(backend: StorageBackend) -> None:
    service_locator.set_storage(backend)
    first = await KeyValueStore.open(name="shared")
    assert await KeyValueStore.open(name="shared") is first
    assert await KeyValueStore.open(name="shared", storage=backend) is first


async def test_a_dropped_store_is_forgotten_and_its_name_opens_a_new_empty_store(
    backend: StorageBackend,
) -> None:
    name = fresh_name()
    old = await KeyValueStore.open(name=name, storage=backend)
    await old.set_value("k", "v")
    await old.drop()

    new = await KeyValueStore.open(name=name, storage=backend)
    assert new is not old
    assert new.id != old.id
    assert new.name == name
    assert await new.list_keys() == []
    assert await new.get_value("k") is None
    assert await KeyValueStore.open(name=name, storage=backend) is new
    with pytest.raises(StoreNotFoundError):
        await KeyValueStore.open(id=old.id, storage=backend)


async def test_a_subclass_of_the_facade_opens_objects_of_its_own_class(backend: StorageBackend) -> None:
    """Another layer may subclass KeyValueStore: its `open` hands out its own objects, one per store."""

    class Layered(KeyValueStore):
        pass

    name = fresh_name()
    plain = await KeyValueStore.open(name=name, storage=backend)
    layered = await Layered.open(name=name, storage=backend)
    assert type(layered) is Layered
    assert layered.id == plain.id
    assert await Layered.open(id=plain.id, storage=backend) is layered
    assert await KeyValueStore.open(name=name, storage=backend) is layered  # a Layered is a KeyValueStore
    quarantine = await layered.open_quarantine()
    assert type(quarantine) is Layered
    assert quarantine.name == name + ".quarantine"


# -- listing keys, as Crawlee does ---------------------------------------------


async def test_keys_are_listed_in_code_point_order(backend: StorageBackend) -> None:
    kvs = await KeyValueStore.open(name=fresh_name(), storage=backend)
    await _fill(kvs, ORDER_KEYS)
    expected = sorted(ORDER_KEYS)  # Python compares str by code point
    assert expected.index("\uffff") < expected.index("🙂")  # not UTF-16 order
    assert [i.key for i in await kvs.list_keys()] == expected
    assert [i.key async for i in kvs.iterate_keys()] == expected


async def test_list_keys_takes_limit_and_exclusive_start_key(backend: StorageBackend) -> None:
    kvs = await KeyValueStore.open(name=fresh_name(), storage=backend)
    await _fill(kvs, ORDER_KEYS)
    ordered = sorted(ORDER_KEYS)
    # Start keys: none, each stored key, keys that are not stored (between two,
    # before all, after all), and keys that share a long prefix with stored ones.
    starts: list[str | None] = [None, "", " ", "a!", "Zz", "x" * 250 + "aa", "x" * 249, "\U0010ffff"]
    starts += ordered
    for start in starts:
        after = [k for k in ordered if start is None or k > start]
        for limit in (None, 0, 1, 2, 5, len(ordered) + 3):
            want = after if limit is None else after[:limit]
            listed = await kvs.list_keys(limit=limit, exclusive_start_key=start)
            assert [i.key for i in listed] == want, (start, limit)
            iterated = [i.key async for i in kvs.iterate_keys(limit=limit, exclusive_start_key=start)]
            assert iterated == want, (start, limit)


async def test_listed_records_tell_size_type_and_version(backend: StorageBackend) -> None:
    kvs = await KeyValueStore.open(name=fresh_name(), storage=backend)
    await kvs.set_value("a", b"12345")
    await kvs.set_value("b", {"x": 1})
    await kvs.set_value("b", {"x": 2})
    (info,) = await kvs.list_keys(exclusive_start_key="a", limit=1)
    assert (info.key, info.size, info.content_type, info.version) == (
        "b",
        len(b'{"x":2}'),
        JSON_CONTENT_TYPE,
        2,
    )


async def test_iterate_keys_pages_through_the_store(
    backend: StorageBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    from recoverable_state.storage import _kvs

    monkeypatch.setattr(_kvs, "KEY_PAGE_SIZE", 7)
    kvs = await KeyValueStore.open(name=fresh_name(), storage=backend)
    keys = [f"key-{i:03d}" for i in range(40)]
    await _fill(kvs, keys)

    asked: list[tuple[str | None, int | None]] = []
    listing = backend.list_records

    async def counting(store_id: str, *, exclusive_start_key: str | None = None, limit: int | None = None):  # type: ignore[no-untyped-def]
        asked.append((exclusive_start_key, limit))
        return await listing(store_id, exclusive_start_key=exclusive_start_key, limit=limit)

    monkeypatch.setattr(backend, "list_records", counting)
    assert [i.key async for i in kvs.iterate_keys()] == keys
    assert len(asked) >= 40 // 7
    assert all(limit is not None and limit <= 7 for _, limit in asked)
    assert asked[0][0] is None and asked[1][0] == keys[6]

    asked.clear()
    assert [i.key async for i in kvs.iterate_keys(limit=10, exclusive_start_key="key-004")] == keys[5:15]
    assert [limit for _, limit in asked] == [7, 3]


async def test_iterating_while_keys_are_added_never_repeats_a_key(
    backend: StorageBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    from recoverable_state.storage import _kvs

    monkeypatch.setattr(_kvs, "KEY_PAGE_SIZE", 3)
    kvs = await KeyValueStore.open(name=fresh_name(), storage=backend)
    await _fill(kvs, ["b", "d", "f", "h", "j"])
    seen = []
    async for info in kvs.iterate_keys():
        seen.append(info.key)
        if info.key == "d":
            await kvs.set_value("a", 1)  # before the cursor: not seen
            await kvs.set_value("i", 1)  # after it: seen once
    assert seen == ["b", "d", "f", "h", "i", "j"]


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"limit": -1}, ValueError, "limit"),
        ({"limit": 2.5}, TypeError, "limit"),
        ({"limit": True}, TypeError, "limit"),
        ({"exclusive_start_key": 5}, InvalidKeyError, "str"),
        ({"exclusive_start_key": "a\x00b"}, InvalidKeyError, "NUL"),
        ({"exclusive_start_key": "a\ud800"}, InvalidKeyError, "surrogate"),
    ],
    ids=["negative-limit", "float-limit", "bool-limit", "int-start", "nul-start", "surrogate-start"],
)
async def test_bad_listing_arguments_are_refused_naming_the_store(
    backend: StorageBackend, kwargs: dict[str, object], error: type[Exception], words: str
) -> None:
    name = fresh_name()
    kvs = await KeyValueStore.open(name=name, storage=backend)
    with pytest.raises(error, match=words) as raised:
        await kvs.list_keys(**kwargs)  # type: ignore[arg-type]
    assert name in str(raised.value)
    with pytest.raises(error, match=words):
        async for _ in kvs.iterate_keys(**kwargs):  # type: ignore[arg-type]
            pass


async def test_listing_a_dropped_store_names_it(backend: StorageBackend) -> None:
    name = fresh_name()
    kvs = await KeyValueStore.open(name=name, storage=backend)
    await kvs.drop()
    with pytest.raises(StoreNotFoundError):
        await kvs.list_keys(limit=5, exclusive_start_key="a")
    with pytest.raises(StoreNotFoundError):
        async for _ in kvs.iterate_keys():
            pass


# -- drop and purge ------------------------------------------------------------


async def _with_history(kvs: KeyValueStore, keys: list[str]) -> None:
    for key in keys:
        for n in range(3):
            await kvs.put_record(key, f"{n}".encode(), JSON_CONTENT_TYPE, keep_history=5)
        assert len(await kvs.get_history(key)) == 3


async def test_drop_deletes_the_store_with_its_records_and_history(backend: StorageBackend) -> None:
    kept = await KeyValueStore.open(name=fresh_name(), storage=backend)
    doomed = await KeyValueStore.open(name=fresh_name(), storage=backend)
    await _with_history(kept, ["a", "b"])
    await _with_history(doomed, ["a", "b"])

    await doomed.drop()
    assert doomed.id not in {s.id for s in await backend.list_stores()}
    with pytest.raises(StoreNotFoundError):
        await doomed.get_value("a")
    with pytest.raises(StoreNotFoundError):
        await doomed.set_value("a", 1)

    assert [i.key for i in await kept.list_keys()] == ["a", "b"]
    assert len(await kept.get_history("a")) == 3
    again = await KeyValueStore.open(name=doomed.name, storage=backend)
    assert await again.get_history("a") == []


async def test_purge_empties_the_store_and_keeps_its_id_and_name(backend: StorageBackend) -> None:
    name = fresh_name()
    kept = await KeyValueStore.open(name=fresh_name(), storage=backend)
    kvs = await KeyValueStore.open(name=name, storage=backend)
    keys = ["a", "B", "日本", "x" * 300]
    await _with_history(kept, keys)
    await _with_history(kvs, keys)

    await kvs.purge()
    assert await kvs.list_keys() == []
    for key in keys:
        assert await kvs.get_value(key) is None
        assert await kvs.get_history(key) == []
    assert (kvs.id, kvs.name) in {(s.id, s.name) for s in await backend.list_stores()}
    assert await KeyValueStore.open(name=name, storage=backend) is kvs
    assert (await KeyValueStore.open(id=kvs.id, storage=backend)).name == name

    # Still usable, and versions begin again; the other store is untouched.
    await kvs.set_value("a", {"again": True})
    assert await kvs.get_value("a") == {"again": True}
    record = await kvs.get_record("a")
    assert record is not None and record.version == 1
    assert [i.key for i in await kept.list_keys()] == sorted(keys)
    assert len(await kept.get_history("a")) == 3

    await kvs.purge()
    await kvs.purge()  # an empty store purges too
    assert await kvs.list_keys() == []


async def test_purging_a_dropped_store_names_it(backend: StorageBackend) -> None:
    kvs = await KeyValueStore.open(name=fresh_name(), storage=backend)
    await kvs.drop()
    with pytest.raises(StoreNotFoundError):
        await kvs.purge()


# -- backend-specific sharp edges of paging -------------------------------------


async def test_an_unreadable_record_file_does_not_cut_a_page_short(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A damaged file is skipped and the next key fills its place, so paging goes on to the end."""
    from recoverable_state.storage import _kvs
    from recoverable_state.storage._filesystem import encode_key

    monkeypatch.setattr(_kvs, "KEY_PAGE_SIZE", 3)
    root = tmp_path / "files"
    async with open_backend(f"file://{root}") as backend:
        kvs = await KeyValueStore.open(name="jobs", storage=backend)
        keys = [f"k{i}" for i in range(10)] + ["L" * 300]  # the long one has a hashed file name
        await _fill(kvs, keys)
        (root / kvs.id / encode_key("k2")).write_bytes(b"not a header\n{}")
        (root / kvs.id / "Foreign.rec").write_bytes(b"a file this store never wrote")
        want = sorted(k for k in keys if k != "k2")
        assert [i.key async for i in kvs.iterate_keys()] == want
        assert [i.key for i in await kvs.list_keys(limit=3)] == want[:3]
        assert [i.key for i in await kvs.list_keys(exclusive_start_key="k1", limit=2)] == ["k3", "k4"]


async def test_a_postgresql_schema_made_before_the_key_index_gets_it(postgres_url: str) -> None:
    """A database made by an older version (no listing index) is given the index on first use."""
    import psycopg

    from servers import flush_postgres

    flush_postgres(postgres_url)
    async with open_backend(postgres_url) as backend:
        kvs = await KeyValueStore.open(name="old", storage=backend)
        await _fill(kvs, ["b", "a", "c"])
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("DROP INDEX recoverable_state.records_by_key")
    async with open_backend(postgres_url) as backend:
        kvs = await KeyValueStore.open(name="old", storage=backend)
        assert [i.key for i in await kvs.list_keys(exclusive_start_key="a", limit=1)] == ["b"]
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        found = conn.execute("SELECT to_regclass('recoverable_state.records_by_key')").fetchone()
    assert found is not None and found[0] is not None


@given(
    st.text(
        alphabet=st.one_of(st.characters(codec=None), st.sampled_from("\x00\x1f\x7f\ud800 a~")),
        max_size=1030,
    )
)
@settings(max_examples=400, deadline=None)
def test_a_key_is_refused_exactly_when_a_rule_says_so(key: str) -> None:
    """Keys are checked by the written rules, also where a fast path answers for the usual key."""
    broken = (
        not key
        or len(key) > MAX_KEY_LENGTH
        or any(ord(c) < 0x20 or c == "\x7f" for c in key)
        or any(0xD800 <= ord(c) <= 0xDFFF for c in key)
    )
    if broken:
        with pytest.raises(InvalidKeyError):
            check_key(key, store="s")
    else:
        assert check_key(key, store="s") == key
