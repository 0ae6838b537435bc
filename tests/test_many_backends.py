"""One manager whose states live on several backends: each batch goes to its own backend.

A persist or a load of states spread over backends travels as one batch per
backend; a backend that fails takes down its own states' writes and no other's.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel

from recoverable_state import Event, EventManager, EventPersistStateData, KeyValueStore, RecoverableState
from recoverable_state.storage import StorageBackend, open_backend
from recoverable_state.testing import FaultInjectingBackend

pytestmark = pytest.mark.anyio


class Progress(BaseModel):
    done: int = 0


def _states(manager: EventManager, backends: dict[str, StorageBackend]) -> list[RecoverableState[Progress]]:
    """Three states on each backend, in two stores, interleaved: no backend's states are adjacent.

    The states' keys are `<backend name>-<i>`, in the order of the list returned.
    """
    states = []
    for i in range(3):
        for name, backend in backends.items():

            async def store(backend: StorageBackend = backend, i: int = i) -> KeyValueStore:
                return await KeyValueStore.open(name=f"jobs-{i % 2}", storage=backend)

            states.append(
                RecoverableState(
                    default_state=Progress(),
                    persist_state_key=f"{name}-{i}",
                    persistence_enabled=True,
                    persist_state_kvs_factory=store,
                    event_manager=manager,
                )
            )
    return states


async def _persist(manager: EventManager) -> None:
    manager.emit(event=Event.PERSIST_STATE, event_data=EventPersistStateData(is_migrating=False))
    await manager.wait_for_all_listeners_to_complete()


async def _stored(backend: StorageBackend, key: str) -> object:
    i = int(key.rsplit("-", 1)[1])
    return await (await KeyValueStore.open(name=f"jobs-{i % 2}", storage=backend)).get_value(key)


async def test_states_on_several_backends_persist_and_load_each_on_its_own(tmp_path: Path) -> None:
    backends = {
        "memory": open_backend("memory://"),
        "sqlite": open_backend(f"sqlite:///{tmp_path}/s.sqlite3"),
        "file": open_backend(f"file://{tmp_path}/files"),
    }
    try:
        async with EventManager(persist_state_interval=3600) as manager:
            states = _states(manager, backends)
            await RecoverableState.initialize_many(states)
            for n, state in enumerate(states, 1):
                state.current_value.done = n
            await _persist(manager)
            keys = [f"{name}-{i}" for i in range(3) for name in backends]
            for n, key in enumerate(keys, 1):
                assert await _stored(backends[key.rsplit("-", 1)[0]], key) == {"done": n}
            for state in states:
                await state.teardown()
        async with EventManager(persist_state_interval=3600) as manager:
            again = _states(manager, backends)
            await RecoverableState.initialize_many(again)  # one claiming read per backend
            assert [s.current_value.done for s in again] == list(range(1, len(again) + 1))
            for state in again:
                await state.teardown()
    finally:
        for backend in backends.values():
            await backend.aclose()


async def test_a_failing_backend_spoils_only_its_own_states(tmp_path: Path) -> None:
    faulty = FaultInjectingBackend(open_backend(f"sqlite:///{tmp_path}/bad.sqlite3"))
    backends: dict[str, StorageBackend] = {
        "good": open_backend(f"sqlite:///{tmp_path}/good.sqlite3"),
        "bad": faulty,
    }
    try:
        async with EventManager(persist_state_interval=3600) as manager:
            states = _states(manager, backends)
            await RecoverableState.initialize_many(states)
            for state in states:
                state.current_value.done = 7
            faulty.fail_next(on="write", when="before")
            await _persist(manager)
            for i in range(3):
                assert await _stored(backends["good"], f"good-{i}") == {"done": 7}
                assert await _stored(faulty, f"bad-{i}") is None
            await _persist(manager)  # the next persist lands the failed ones; no ownership was lost
            for i in range(3):
                assert await _stored(faulty, f"bad-{i}") == {"done": 7}
            for state in states:
                await state.teardown()
    finally:
        for backend in backends.values():
            await backend.aclose()
