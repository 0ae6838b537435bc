"""Deltas, through RecoverableState on every store: a big state that changed a little appends the change.

What loads is what a whole snapshot of the same value loads; compaction, fencing,
faults, damaged deltas and the switches that turn deltas off.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
from pydantic import BaseModel

from recoverable_state import (
    Event,
    EventManager,
    EventPersistedData,
    RecordCorruptError,
    RecoverableState,
    StateOwnershipLost,
    UnrepresentableStateError,
)
from recoverable_state.storage import (
    CHAIN_CONTENT_TYPE,
    KeyValueStore,
    RecordAppend,
    RecordWrite,
    StorageBackend,
    StoredRecord,
    open_backend,
    unpack_chain,
)
from recoverable_state.testing import FaultInjectingBackend

pytestmark = pytest.mark.anyio

PAD = "p" * 70_000  # past the size from which a state is followed by deltas


class Item(BaseModel):
    n: int = 0
    tags: list[str] = []
    meta: dict[str, int] = {}


class Big(BaseModel):
    pad: str = PAD
    seen: dict[str, int] = {}
    items: dict[str, Item] = {}
    lines: list[str] = []
    objs: list[Item] = []
    marks: set[int] = set()
    child: Item = Item()
    ratio: float = 0.0


@pytest.fixture
async def storage(storage_url: str) -> AsyncIterator[StorageBackend]:
    backend = open_backend(storage_url)
    try:
        yield backend
    finally:
        await backend.aclose()


async def _store(storage: StorageBackend, name: str = "deltas") -> KeyValueStore:
    return await KeyValueStore.open(name=name, storage=storage)


def _state(kvs: KeyValueStore, **options: object) -> RecoverableState[Big]:
    async def factory() -> KeyValueStore:
        return kvs

    return RecoverableState(
        default_state=Big,
        persist_state_key="big",
        persistence_enabled="explicit_only",
        persist_state_kvs_factory=factory,
        **options,  # type: ignore[arg-type]
    )


async def _pieces(kvs: KeyValueStore) -> list[tuple[bytes, str]]:
    record = await kvs.get_record("big", chain=True)
    assert record is not None
    if record.content_type != CHAIN_CONTENT_TYPE:
        return [(record.value, record.content_type)]
    return unpack_chain(record.value)


async def _reloaded(kvs: KeyValueStore) -> Big:
    """What a new process would load (a fresh state object; the old one was torn down)."""
    state = _state(kvs)
    value = await state.initialize()
    copy = value.model_copy(deep=True)
    await state.teardown()
    return copy


async def _stored(kvs: KeyValueStore) -> Big:
    """What the store holds now, made whole and validated (the state's own load, while it lives)."""
    record = await kvs.get_record("big")
    assert record is not None
    return Big.model_validate_json(record.value)


def _as_snapshot(value: Big) -> Big:
    """What a whole snapshot of `value` loads."""
    return Big.model_validate_json(value.model_dump_json(by_alias=True))


async def test_a_little_change_of_a_big_state_is_appended(storage: StorageBackend) -> None:
    kvs = await _store(storage)
    state = _state(kvs)
    value = await state.initialize()
    value.seen.update({f"u{i}": i for i in range(1000)})
    await state.persist_state()
    assert len(await _pieces(kvs)) == 1  # the first write is a snapshot
    for tick in range(5):
        value.seen[f"t{tick}"] = tick
        value.lines.append(f"line {tick}")
        value.items[f"i{tick}"] = Item(n=tick, tags=["a"])
        value.child.meta[f"m{tick}"] = tick
        await state.persist_state()
    pieces = await _pieces(kvs)
    assert len(pieces) == 6
    assert all(len(delta) < 1000 for delta, _ in pieces[1:])  # each delta is about its change
    expected = value.model_copy(deep=True)
    await state.teardown()
    reloaded = await _reloaded(kvs)
    assert reloaded == expected == _as_snapshot(expected)
    assert await kvs.get_value("big") == json.loads(expected.model_dump_json())


async def test_every_kind_of_change_loads_back_as_a_snapshot_would(storage: StorageBackend) -> None:
    kvs = await _store(storage)
    state = _state(kvs)
    value = await state.initialize()
    value.items.update({"a": Item(n=1, tags=["x"], meta={"k": 1}), "b": Item(n=2)})
    value.objs.extend([Item(n=1), Item(n=2), Item(n=3)])
    value.lines.extend(["l0", "l1", "l2"])
    value.seen.update({"s0": 0, "s1": 1, "s2": 2})
    await state.persist_state()
    steps = [
        lambda v: v.seen.pop("s0"),
        lambda v: v.seen.setdefault("s9", 9),
        lambda v: v.seen.update(s1=10),
        lambda v: v.seen.popitem(),
        lambda v: v.items["a"].tags.append("y"),
        lambda v: v.items["a"].meta.pop("k"),
        lambda v: v.items.__setitem__("c", v.items.pop("b")),  # a model moved to another key
        lambda v: v.objs[1].tags.append("in a list"),
        lambda v: v.objs.pop(0),
        lambda v: v.lines.insert(0, "first"),
        lambda v: v.lines.sort(),
        lambda v: v.marks.update({3, 1, 2}),
        lambda v: v.marks.discard(2),
        lambda v: setattr(v, "child", Item(n=7, meta={"z": 26})),
        lambda v: v.child.tags.extend(["after", "assignment"]),
        lambda v: setattr(v, "ratio", 0.25),
        lambda v: v.seen.clear(),
        lambda v: v.seen.__setitem__("again", 1),
    ]
    for step in steps:
        step(value)
        await state.persist_state()
        expected = value.model_copy(deep=True)
        assert await _stored(kvs) == expected == _as_snapshot(expected)
    assert len(await _pieces(kvs)) > 1  # deltas were written on the way
    await state.teardown()
    assert await _reloaded(kvs) == expected


async def test_deltas_are_folded_into_a_snapshot_when_they_grow(storage: StorageBackend) -> None:
    kvs = await _store(storage)
    state = _state(kvs)
    value = await state.initialize()
    await state.persist_state()
    counts = []
    for _ in range(30):
        value.lines.append("x" * 5_000)  # 30 x 5 kB: past the snapshot's 70 kB
        await state.persist_state()
        counts.append(len(await _pieces(kvs)))
    assert max(counts) > 5
    assert 1 in counts[5:]  # a snapshot again, then deltas after it
    assert sum(len(p) for p, _ in (await _pieces(kvs))[1:]) <= len((await _pieces(kvs))[0][0])
    expected = value.model_copy(deep=True)
    await state.teardown()
    assert await _reloaded(kvs) == expected


async def test_at_most_a_hundred_deltas_follow_a_snapshot(storage: StorageBackend) -> None:
    kvs = await _store(storage)
    state = _state(kvs)
    value = await state.initialize()
    await state.persist_state()
    most = 0
    for tick in range(130):
        value.child.n = tick
        await state.persist_state()
        most = max(most, len(await _pieces(kvs)) - 1)
    assert most == 100
    await state.teardown()
    assert (await _reloaded(kvs)).child.n == 129


@pytest.mark.parametrize("options", [{"deltas": False}, {"history": 2}, {"change_detection": "compare"}])
async def test_switches_that_write_whole_snapshots(
    storage: StorageBackend, options: dict[str, object]
) -> None:
    kvs = await _store(storage)
    state = _state(kvs, **options)
    value = await state.initialize()
    await state.persist_state()
    for tick in range(3):
        value.seen[str(tick)] = tick
        await state.persist_state()
        assert len(await _pieces(kvs)) == 1
    await state.teardown()
    assert (await _reloaded(kvs)).seen == {"0": 0, "1": 1, "2": 2}


async def test_a_small_state_writes_snapshots(storage: StorageBackend) -> None:
    kvs = await _store(storage)
    state = _state(kvs)
    value = await state.initialize()
    value.pad = "short"
    await state.persist_state()
    for tick in range(3):
        value.seen[str(tick)] = tick
        await state.persist_state()
        assert len(await _pieces(kvs)) == 1
    await state.teardown()


async def test_a_state_taken_over_cannot_append(storage: StorageBackend) -> None:
    kvs = await _store(storage)
    first = _state(kvs)
    value = await first.initialize()
    await first.persist_state()
    value.seen["a"] = 1
    await first.persist_state()
    assert len(await _pieces(kvs)) == 2
    # Another process takes the record over (a claim bumps its version).
    record = await kvs.get_record("big", claim=True, chain=True)
    assert record is not None
    value.seen["late"] = 2
    with pytest.raises(StateOwnershipLost):
        await first.persist_state()
    assert "late" not in (await kvs.get_value("big"))["seen"]


async def test_a_failed_append_is_followed_by_a_snapshot(storage_url: str) -> None:
    backend = FaultInjectingBackend(open_backend(storage_url))
    try:
        kvs = await _store(backend)
        state = _state(kvs)
        value = await state.initialize()
        await state.persist_state()
        value.seen["lost-with-the-batch"] = 1
        backend.fail_next(on="write", when="before")
        with pytest.raises(Exception):  # noqa: B017, PT011 - the injected failure, whatever its kind
            await state.persist_state()
        value.seen["after"] = 2
        await state.persist_state()
        assert len(await _pieces(kvs)) == 1  # the noted changes went with the failed batch: a snapshot
        value.seen["then"] = 3
        await state.persist_state()
        assert len(await _pieces(kvs)) == 2
        expected = value.model_copy(deep=True)
        await state.teardown()
        assert await _reloaded(kvs) == expected
    finally:
        await backend.aclose()


async def test_an_append_in_doubt_is_settled_from_the_chain(storage_url: str) -> None:
    backend = FaultInjectingBackend(open_backend(storage_url))
    try:
        kvs = await _store(backend)
        state = _state(kvs)
        value = await state.initialize()
        await state.persist_state()
        value.seen["landed"] = 1
        backend.fail_next(on="write", when="after")  # applied, then the answer is lost
        with pytest.raises(Exception):  # noqa: B017, PT011
            await state.persist_state()
        value.seen["next"] = 2
        await state.persist_state()  # not a takeover: the delta had landed
        expected = value.model_copy(deep=True)
        await state.teardown()
        assert await _reloaded(kvs) == expected
    finally:
        await backend.aclose()


async def test_a_damaged_delta_is_quarantined(storage: StorageBackend) -> None:
    kvs = await _store(storage)
    state = _state(kvs)
    value = await state.initialize()
    await state.persist_state()
    value.seen["a"] = 1
    await state.persist_state()
    await state.teardown()
    record = await kvs.get_record("big", chain=True)
    assert record is not None
    # A delta that does not fit its snapshot (as a bug or a bad restore would leave it).
    bad = RecordAppend(kvs.id, "big", b'[{"nowhere":{"x":1}},{"nowhere":{"x":2}}]', "x", record.version)
    await storage.write_batch([bad])
    with pytest.raises(RecordCorruptError, match="delta"):
        await _state(kvs).initialize()
    quarantined = _state(kvs, on_bad_record="quarantine")
    assert (await quarantined.initialize()).seen == {}
    await quarantined.teardown()
    copies = await (await kvs.open_quarantine()).list_keys()
    assert len(copies) == 1


async def test_a_record_written_before_deltas_loads_and_is_followed(storage: StorageBackend) -> None:
    kvs = await _store(storage)
    old = Big(seen={"a": 1})
    data = old.model_dump_json().encode()
    await storage.write_batch([RecordWrite(kvs.id, "big", data, "application/json")])
    state = _state(kvs)
    value = await state.initialize()
    assert value == old
    value.seen["b"] = 2
    await state.persist_state()
    value.seen["c"] = 3
    await state.persist_state()
    assert len(await _pieces(kvs)) >= 2
    await state.teardown()
    assert (await _reloaded(kvs)).seen == {"a": 1, "b": 2, "c": 3}


async def test_a_manager_persist_writes_deltas_of_many_states_together(storage: StorageBackend) -> None:
    kvs = await _store(storage)
    manager = EventManager(persist_state_interval=3600)
    heard: list[EventPersistedData] = []
    manager.on(event=Event.PERSISTED, listener=heard.append)
    async with manager:
        states = [
            RecoverableState(
                default_state=Big,
                persist_state_key=f"big-{n}",
                persistence_enabled=True,
                persist_state_kvs_factory=lambda: _same(kvs),
                event_manager=manager,
            )
            for n in range(5)
        ]
        values = [await s.initialize() for s in states]
        await _persist_round(manager)
        for n, v in enumerate(values):
            v.seen[str(n)] = n
        await _persist_round(manager)
        assert heard[-1].states_written == 5
        assert heard[-1].bytes_written < 5 * 1000  # five deltas, not five snapshots of 70 kB
        for s in states:
            await s.teardown()
    for n in range(5):
        record = await kvs.get_record(f"big-{n}", chain=True)
        assert isinstance(record, StoredRecord)
        assert record.content_type == CHAIN_CONTENT_TYPE
        assert (await kvs.get_value(f"big-{n}"))["seen"] == {str(n): n}


async def _same(kvs: KeyValueStore) -> KeyValueStore:
    return kvs


async def _persist_round(manager: EventManager) -> None:
    manager.emit(event=Event.PERSIST_STATE)
    await manager.wait_for_all_listeners_to_complete(timeout=10)


def test_the_delta_format_is_documented(tmp_path: Path) -> None:
    """The chain a reader gets is documented by its functions: a round trip of pack and unpack."""
    from recoverable_state.storage import DELTA_CONTENT_TYPE, pack_chain

    pieces = [(b"{}", "application/json"), (b'[{"a":1},{"a":2}]', DELTA_CONTENT_TYPE)]
    assert unpack_chain(pack_chain(pieces)) == pieces


class BigV2(BaseModel):
    """Big's next schema: `seen` became `visits`; migrated from a record kept as deltas."""

    schema_version: ClassVar[int] = 2
    pad: str = PAD
    visits: dict[str, int] = {}
    lines: list[str] = []


def _big_to_v2(old: dict[str, Any]) -> dict[str, Any]:
    return {"pad": old["pad"], "visits": old["seen"], "lines": old["lines"]}


async def test_a_migration_runs_on_the_value_its_deltas_make(storage: StorageBackend) -> None:
    kvs = await _store(storage)
    state = _state(kvs)
    value = await state.initialize()
    await state.persist_state()
    for n in range(3):
        value.seen[f"s{n}"] = n
        value.lines.append(f"l{n}")
        await state.persist_state()
    assert len(await _pieces(kvs)) == 4
    await state.teardown()

    async def factory() -> KeyValueStore:
        return kvs

    new = RecoverableState(
        default_state=BigV2,
        persist_state_key="big",
        persistence_enabled="explicit_only",
        persist_state_kvs_factory=factory,
        migrations={1: _big_to_v2},
    )
    migrated = await new.initialize()
    assert migrated.visits == {"s0": 0, "s1": 1, "s2": 2}
    assert migrated.lines == ["l0", "l1", "l2"]
    migrated.visits["s3"] = 3
    await new.persist_state()  # the migrated value is written whole first, then deltas follow it
    assert len(await _pieces(kvs)) == 1
    migrated.visits["s4"] = 4
    await new.persist_state()
    assert len(await _pieces(kvs)) == 2
    await new.teardown()
    assert (await kvs.get_value("big"))["visits"] == {f"s{n}": n for n in range(5)}


async def test_a_store_lost_by_its_server_is_made_again_and_written_whole(storage: StorageBackend) -> None:
    """A server restarted without its data: the next persist of a state kept as deltas writes a snapshot."""
    kvs = await _store(storage, "lost")
    state = _state(kvs)
    value = await state.initialize()
    await state.persist_state()
    value.seen["a"] = 1
    await state.persist_state()
    assert len(await _pieces(kvs)) == 2
    await storage.drop_store(kvs.id)  # what the server lost
    value.seen["b"] = 2
    await state.persist_state()
    again = await KeyValueStore.open(name="lost", storage=storage)
    record = await again.get_record("big", chain=True)
    assert record is not None
    assert record.content_type != CHAIN_CONTENT_TYPE
    assert Big.model_validate_json(record.value).seen == {"a": 1, "b": 2}
    await state.teardown()


async def test_threads_changing_a_state_while_it_persists_lose_nothing(storage: StorageBackend) -> None:
    """A sync worker's threads change the state (no editing()) while the loop writes deltas of it."""
    import threading
    import time

    import anyio.to_thread

    kvs = await _store(storage)
    state = _state(kvs)
    value = await state.initialize()
    value.pad = PAD * 20  # 1.4 MB: the threads' changes stay well below it, so they go as deltas
    await state.persist_state()
    done = threading.Event()
    finished: list[int] = []

    def worker(n: int) -> None:
        for i in range(4000):
            value.seen[f"w{n}-{i}"] = i
            value.lines.append(f"w{n}-{i}")
            if i % 7 == 0:
                value.seen.pop(f"w{n}-{i - 3}", None)
            if i % 100 == 0:
                time.sleep(0.0005)  # let the loop's persists fall between changes
        finished.append(n)
        if len(finished) == 3:
            done.set()

    async with anyio.create_task_group() as tg:
        for n in range(3):
            tg.start_soon(anyio.to_thread.run_sync, worker, n)
        chained = 0
        while not done.is_set():
            await state.persist_state()
            chained += len(await _pieces(kvs)) > 1
            await anyio.sleep(0.001)
    await state.persist_state()
    chained += len(await _pieces(kvs)) > 1
    assert chained  # deltas were written while (or after) the threads changed the state
    assert await _stored(kvs) == value
    await state.teardown()


class Keyed(BaseModel):
    """Dict keys that JSON spells differently from Python: integers, and strings a JSON path could trip on."""

    pad: str = PAD
    by_id: dict[int, str] = {}
    by_name: dict[str, list[int]] = {}
    ratio: float = 0.0


async def test_odd_keys_and_values_load_back_as_a_snapshot_would(storage: StorageBackend) -> None:
    kvs = await _store(storage)

    async def factory() -> KeyValueStore:
        return kvs

    state = RecoverableState(
        default_state=Keyed,
        persist_state_key="keyed",
        persistence_enabled="explicit_only",
        persist_state_kvs_factory=factory,
    )
    value = await state.initialize()
    await state.persist_state()
    hostile = ["", "0", "-1", "a.b", "a/b", '"quoted"', "\\", "é\u2028x", "k" * 300, "null"]
    for n, name in enumerate(hostile):
        value.by_id[-n] = name
        value.by_id[10**20 + n] = name  # past 64 bits
        value.by_name[name] = [n]
        await state.persist_state()
    del value.by_id[0]
    value.by_name.pop('"quoted"')
    await state.persist_state()
    record = await kvs.get_record("keyed", chain=True)
    assert record is not None
    assert record.content_type == CHAIN_CONTENT_TYPE  # all of it went as deltas
    stored = await kvs.get_record("keyed")
    assert stored is not None
    assert Keyed.model_validate_json(stored.value) == value
    # A NaN cannot be stored as JSON: refused as ever, and the stored record is left as it was.
    value.ratio = float("nan")
    with pytest.raises(UnrepresentableStateError, match="ratio"):
        await state.persist_state()
    after = await kvs.get_record("keyed", chain=True)
    assert after is not None
    assert after.version == record.version
    value.ratio = 0.5
    await state.persist_state()
    expected = value.model_copy(deep=True)
    await state.teardown()
    again = RecoverableState(
        default_state=Keyed,
        persist_state_key="keyed",
        persistence_enabled="explicit_only",
        persist_state_kvs_factory=factory,
    )
    assert await again.initialize() == expected
    await again.teardown()
