"""A big load and a big persist leave the garbage collector nothing young to scan.

The event loop waits while Python's collector scans: a load of 100,000 states
used to leave its millions of objects young (the collector is paused while they
are made), and the first persist after it waited for three scans of all of them
(young, middle, then the whole heap), 0.1 to 1.4 s. A load now ends with one full
collection, the containers its change tracking needs are made inside it, and a
persist leaves nothing behind per state. Checked by counting what the collector
holds as young, on asyncio and trio; no timing is asserted.
"""

from __future__ import annotations

import gc

import pytest
from pydantic import BaseModel

from recoverable_state import Event, EventManager, EventPersistStateData, RecoverableState
from recoverable_state.state._collector import PAUSE_COLLECTOR_AT

pytestmark = pytest.mark.anyio

N = PAUSE_COLLECTOR_AT  # the smallest batch the collector is paused for


class Page(BaseModel):
    url: str
    status: int


class Worker(BaseModel):
    n: int = 0
    tags: list[str] = []
    seen: dict[str, int] = {}
    recent: list[Page] = []


def young() -> int:
    """Objects the collector has not yet moved to its oldest generation."""
    return len(gc.get_objects(generation=0)) + len(gc.get_objects(generation=1))


def states(manager: EventManager) -> list[RecoverableState[Worker]]:
    default = Worker(tags=["a", "b"], seen={"x": 1}, recent=[Page(url="u", status=200)])
    return [
        RecoverableState(
            default_state=default,
            persist_state_key=f"w{i}",
            persistence_enabled=True,
            event_manager=manager,
        )
        for i in range(N)
    ]


async def persist(manager: EventManager) -> None:
    manager.emit(event=Event.PERSIST_STATE, event_data=EventPersistStateData(is_migrating=False))
    await manager.wait_for_all_listeners_to_complete()


async def test_a_big_load_then_its_first_persist_leave_nothing_young() -> None:
    assert gc.isenabled()
    async with EventManager(persist_state_interval=3600) as manager:
        first = states(manager)
        await RecoverableState.initialize_many(first)
        for s in first:
            s.current_value.n = 1
        await persist(manager)  # every record stored
        for s in first:
            await s.teardown()
        del first, s
        again = states(manager)
        await RecoverableState.initialize_many(again)
        values = [s.current_value for s in again]  # watched: each model's dicts and lists replaced
        assert values[-1].n == 1 and values[-1].recent[0].status == 200
        assert young() < N // 10, "the load left its objects young"
        for value in values:
            value.n += 1
            value.seen["y"] = 2  # a tracked container changes too
        await persist(manager)
        assert young() < N // 10, "the persist left objects young, one or more per state"
        for s in again:
            await s.teardown()


@pytest.mark.parametrize("fault", ["hang", "fail"])
async def test_a_big_load_that_hangs_or_fails_gives_the_collector_back_and_can_be_retried(fault: str) -> None:
    """The collector is paused from the making of a big batch's slots on: a load that times
    out or fails must end the pause, leave every state uninitialized, and free its keys."""
    from recoverable_state import KeyValueStore, PersistenceTimeoutError, StorageError
    from recoverable_state.storage import MemoryBackend
    from recoverable_state.testing import FaultInjectingBackend

    storage = FaultInjectingBackend(MemoryBackend())
    kvs = await KeyValueStore.open(name="big", storage=storage)

    async def factory() -> KeyValueStore:
        return kvs

    def batch(manager: EventManager) -> list[RecoverableState[Worker]]:
        return [
            RecoverableState(
                default_state=Worker(),
                persist_state_key=f"w{i}",
                persistence_enabled=True,
                persist_state_kvs_factory=factory,
                event_manager=manager,
                persistence_timeout=0.5,
            )
            for i in range(N)
        ]

    assert gc.isenabled()
    async with EventManager(persist_state_interval=3600) as manager:
        first = batch(manager)
        if fault == "hang":
            storage.hang_next(on="read")
        else:
            storage.fail_next(on="read")
        with pytest.raises(BaseException) as raised:  # noqa: PT011 - one error per state, grouped
            await RecoverableState.initialize_many(first)
        found = raised.value.exceptions if isinstance(raised.value, BaseExceptionGroup) else (raised.value,)
        expected = PersistenceTimeoutError if fault == "hang" else StorageError
        assert found and all(isinstance(e, expected) for e in found), found[:3]
        assert gc.isenabled(), "the failed load left the collector paused"
        assert not any(s.is_initialized for s in first)
        again = batch(manager)  # the same keys: the failed batch holds none of them
        await RecoverableState.initialize_many(again)
        assert gc.isenabled()
        assert all(s.is_initialized for s in again)
        for s in again:
            await s.teardown()
