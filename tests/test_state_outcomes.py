"""A failed, partly failed or unfinished write leaves memory agreeing with the store."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import anyio
import pytest
from pydantic import BaseModel, field_serializer

from recoverable_state import (
    EventManager,
    KeyValueStore,
    PersistenceTimeoutError,
    RecoverableState,
    StorageError,
    service_locator,
)
from recoverable_state.storage import MemoryBackend, RecordWrite, SQLiteBackend, WriteOutcome

pytestmark = pytest.mark.anyio


class Count(BaseModel):
    n: int = 0


def faulty(base: type[Any]) -> Any:
    class Faulty(base):  # type: ignore[misc,valid-type]
        mode = "ok"  # "ok", "apply-then-raise", "fail-one", "hang"

        async def write_batch(self, writes: Sequence[RecordWrite]) -> Sequence[WriteOutcome | StorageError]:
            if self.mode == "hang":
                await anyio.sleep_forever()
            if self.mode == "fail-one":
                rest = await super().write_batch(writes[1:])
                return [StorageError("no space", store="default", key=writes[0].key), *rest]
            outcomes = await super().write_batch(writes)
            if self.mode == "apply-then-raise":
                raise StorageError("connection lost after commit", store="default")
            return outcomes

    return Faulty


@pytest.fixture(params=["memory", "sqlite"])
def backend(request: pytest.FixtureRequest) -> Any:
    made = faulty(MemoryBackend)() if request.param == "memory" else faulty(SQLiteBackend)("o.sqlite3")
    service_locator.set_storage(made)
    return made


async def stored(key: str) -> object:
    return await (await KeyValueStore.open()).get_value(key)


async def test_a_batch_applied_then_failing_is_not_taken_for_a_lost_ownership(backend: Any) -> None:
    async with EventManager():
        state = RecoverableState(default_state=Count(), persist_state_key="c", persistence_enabled=True)
        value = await state.initialize()
        value.n = 1
        backend.mode = "apply-then-raise"
        with pytest.raises(StorageError, match="after commit"):
            await state.persist_state()
        backend.mode = "ok"
        value.n = 2
        await state.persist_state()  # finds out the last write landed, then writes on
        assert not state.ownership_lost
        assert await stored("c") == {"n": 2}
        await state.teardown()


async def test_a_write_failing_alone_changes_nothing_and_the_others_land(backend: Any) -> None:
    async with EventManager():
        states = [
            RecoverableState(default_state=Count(), persist_state_key=k, persistence_enabled=True)
            for k in ("a", "b")
        ]
        await RecoverableState.initialize_many(states)
        for s in states:
            s.current_value.n = 1
        backend.mode = "fail-one"
        with pytest.raises(StorageError, match="no space"):
            await RecoverableState.persist_many(states)
        assert await stored("a") is None
        assert await stored("b") == {"n": 1}
        backend.mode = "ok"
        await RecoverableState.persist_many(states)
        assert not any(s.ownership_lost for s in states)
        assert await stored("a") == {"n": 1}
        for s in states:
            await s.teardown()


async def test_a_save_past_its_timeout_names_store_and_key_and_the_next_one_lands(backend: Any) -> None:
    async with EventManager():
        state = RecoverableState(
            default_state=Count(), persist_state_key="slow", persistence_enabled=True, persistence_timeout=0.1
        )
        value = await state.initialize()
        value.n = 1
        backend.mode = "hang"
        expected = r"store 'default', key 'slow'"
        with anyio.fail_after(5), pytest.raises(PersistenceTimeoutError, match=expected):
            await state.persist_state()
        backend.mode = "ok"
        value.n = 2
        await state.persist_state()
        assert not state.ownership_lost
        assert await stored("slow") == {"n": 2}
        await state.teardown()


class SlowToSerialise(BaseModel):
    n: int = 0

    @field_serializer("n")
    def _slowly(self, value: int) -> int:
        time.sleep(0.001)  # 300 states take 0.3 s to serialise, past the timeout below
        return value


async def test_a_timeout_while_serialising_names_every_state_not_saved(backend: Any) -> None:
    """States never sent, or never reached, are reported too: not one returns as saved."""
    states = [
        RecoverableState(
            default_state=SlowToSerialise(),
            persist_state_key=f"s{i}",
            persistence_enabled="explicit_only",
            persistence_timeout=0.05,
        )
        for i in range(300)
    ]
    await RecoverableState.initialize_many(states)
    for s in states:
        s.current_value.n = 1
    with anyio.fail_after(10), pytest.raises(ExceptionGroup) as caught:
        await RecoverableState.persist_many(states)
    timed_out = {e.key for e in caught.value.exceptions if isinstance(e, PersistenceTimeoutError)}
    unsaved = {s.persist_state_key for s in states if await stored(s.persist_state_key) != {"n": 1}}
    assert unsaved  # the timeout cut the persist short
    assert unsaved <= timed_out
    for s in states:  # each saved alone is within its timeout: what was not saved is saved now
        await s.teardown()
    assert all([await stored(s.persist_state_key) == {"n": 1} for s in states])


def test_a_persistence_timeout_must_be_positive() -> None:
    with pytest.raises(ValueError, match="persistence_timeout"):
        RecoverableState(default_state=Count(), persist_state_key="k", persistence_timeout=0)
