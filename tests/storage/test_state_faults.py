"""States under injected storage faults, on every store.

After every kind of failure, a reload sees what each state was told, no state
is told another process took it over, and the next persist lands.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import anyio
import pytest
from pydantic import BaseModel

from recoverable_state import KeyValueStore, RecoverableState, StorageError
from recoverable_state.storage import open_backend
from recoverable_state.testing import FaultInjectingBackend

pytestmark = pytest.mark.anyio


class Pair(BaseModel):
    a: int = 0
    b: int = 0


@pytest.fixture
async def faulty(storage_url: str) -> AsyncIterator[FaultInjectingBackend]:
    async with FaultInjectingBackend(open_backend(storage_url)) as backend:
        yield backend


def states(kvs: KeyValueStore) -> list[RecoverableState[Pair]]:
    async def factory() -> KeyValueStore:
        return kvs

    return [
        RecoverableState(
            default_state=Pair(),
            persist_state_key=key,
            persistence_enabled="explicit_only",
            persist_state_kvs_factory=factory,
        )
        for key in ("one", "two")
    ]


async def reload(storage_url: str, faulty: FaultInjectingBackend, kvs: KeyValueStore) -> dict[str, object]:
    reader = faulty.inner if storage_url.startswith("memory") else open_backend(storage_url)
    seen = await KeyValueStore.open(id=kvs.id, storage=reader)
    return {key: await seen.get_value(key) for key in ("one", "two")}


@pytest.mark.parametrize("fault", ["requests", "before", "after", "delay", "hang"])
async def test_after_any_fault_a_reload_agrees_and_the_next_persist_lands(
    faulty: FaultInjectingBackend, storage_url: str, fault: str
) -> None:
    kvs = await KeyValueStore.open(name="jobs", storage=faulty)
    one, two = states(kvs)
    await RecoverableState.initialize_many([one, two])
    for n, state in enumerate((one, two), 1):
        state.current_value.a = state.current_value.b = n
    await RecoverableState.persist_many([one, two])

    one.current_value.a = one.current_value.b = 10
    two.current_value.a = two.current_value.b = 20
    if fault == "requests":
        faulty.fail_next(when="requests", match=lambda r: r.key == "two")
    elif fault in ("before", "after"):
        faulty.fail_next(when=fault)  # type: ignore[arg-type]
    elif fault == "delay":
        faulty.delay_next(0.1)
    else:
        faulty.hang_next()
    with anyio.move_on_after(1):
        with contextlib.suppress(StorageError, ExceptionGroup):
            await RecoverableState.persist_many([one, two])
    held = await reload(storage_url, faulty, kvs)
    expected = {
        "requests": {"one": {"a": 10, "b": 10}, "two": {"a": 2, "b": 2}},
        "before": {"one": {"a": 1, "b": 1}, "two": {"a": 2, "b": 2}},
        "after": {"one": {"a": 10, "b": 10}, "two": {"a": 20, "b": 20}},
        "delay": {"one": {"a": 10, "b": 10}, "two": {"a": 20, "b": 20}},
        "hang": {"one": {"a": 1, "b": 1}, "two": {"a": 2, "b": 2}},
    }[fault]
    assert held == expected

    one.current_value.a = one.current_value.b = 11
    two.current_value.a = two.current_value.b = 21
    await RecoverableState.persist_many([one, two])
    assert not one.ownership_lost and not two.ownership_lost
    assert await reload(storage_url, faulty, kvs) == {"one": {"a": 11, "b": 11}, "two": {"a": 21, "b": 21}}
    for state in (one, two):
        await state.teardown()


@pytest.mark.parametrize("fault", ["before", "after", "hang", "late"])
async def test_a_reset_whose_delete_failed_or_timed_out_still_writes_its_next_persist(
    faulty: FaultInjectingBackend, storage_url: str, fault: str
) -> None:
    """A delete in doubt (refused, applied but unanswered, hung, landing late) is settled.

    Whatever became of the delete, the state does not take its own record for
    another process's, and its next persist stores the value it holds.
    """
    kvs = await KeyValueStore.open(name="jobs", storage=faulty)

    async def factory() -> KeyValueStore:
        return kvs

    state = RecoverableState(
        default_state=Pair(),
        persist_state_key="one",
        persistence_enabled="explicit_only",
        persist_state_kvs_factory=factory,
        persistence_timeout=0.5,
    )
    await state.initialize()
    state.current_value.a = 5
    await state.persist_state()
    if fault == "hang":
        faulty.hang_next()
    elif fault == "late":  # the delete outlives the timeout, then lands
        faulty.delay_next(1.0)
    else:
        faulty.fail_next(when=fault)  # type: ignore[arg-type]
    with contextlib.suppress(StorageError, ExceptionGroup):
        await state.reset()
    assert state.current_value == Pair()  # the value is reset in place whatever the store said
    if fault == "late":
        await anyio.sleep(1.2)

    state.current_value.b = 7
    await state.persist_state()
    assert not state.ownership_lost
    assert (await reload(storage_url, faulty, kvs))["one"] == {"a": 0, "b": 7}
    await state.teardown()
