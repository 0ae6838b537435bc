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
