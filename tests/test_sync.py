"""run_sync() and the sync side of RecoverableState, in this process (signals: tests/process)."""

from __future__ import annotations

import threading
from typing import Any

import anyio
import pytest
from pydantic import BaseModel

from recoverable_state import (
    KeyValueStore,
    RecoverableState,
    run_sync,
    stop_requested,
    use_state_sync,
)
from recoverable_state.storage import MemoryBackend

BACKENDS = ["asyncio", "trio"]


class Pair(BaseModel):
    a: int = 0
    b: int = 0


def stored(key: str) -> Any:
    async def read() -> Any:
        return await (await KeyValueStore.open()).get_value(key)

    return anyio.run(read)


@pytest.mark.parametrize("backend", BACKENDS)
def test_run_sync_runs_the_worker_in_this_thread_and_saves_its_states(
    memory_storage: MemoryBackend, backend: str
) -> None:
    def main(n: int) -> str:
        assert threading.current_thread() is threading.main_thread()
        with RecoverableState(default_state=Pair(), persist_state_key="pair", persistence_enabled=True) as p:
            p.a = p.b = n
        return "done"

    assert run_sync(main, 5, backend=backend) == "done"
    assert stored("pair") == {"a": 5, "b": 5}


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_state_resumes_from_what_the_last_run_saved(memory_storage: MemoryBackend, backend: str) -> None:
    def main() -> int:
        with RecoverableState(default_state=Pair(), persist_state_key="pair", persistence_enabled=True) as p:
            p.a += 1
            p.b += 1
            return p.a

    assert [run_sync(main, backend=backend) for _ in range(3)] == [1, 2, 3]


@pytest.mark.parametrize("backend", BACKENDS)
def test_persist_state_sync_writes_at_once(memory_storage: MemoryBackend, backend: str) -> None:
    def main() -> Any:
        state = RecoverableState(
            default_state=Pair(), persist_state_key="pair", persistence_enabled="explicit_only"
        )
        with state as p:
            p.a = 3
            state.persist_state_sync()
            return stored_from_worker("pair")

    assert run_sync(main, backend=backend) == {"a": 3, "b": 0}


def stored_from_worker(key: str) -> Any:
    """Read the store from a worker's thread (its loop is busy in another thread)."""
    result: list[Any] = []
    reader = threading.Thread(target=lambda: result.append(stored(key)))
    reader.start()
    reader.join()
    return result[0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_use_state_sync_gives_a_saved_dict(memory_storage: MemoryBackend, backend: str) -> None:
    def main() -> int:
        value = use_state_sync("counts", {"n": 0})
        value["n"] += 1
        assert use_state_sync("counts") is value
        return int(value["n"])

    assert run_sync(main, backend=backend) == 1
    assert stored("counts") == {"n": 1}


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_worker_s_exception_propagates_after_every_state_is_saved(
    memory_storage: MemoryBackend, backend: str
) -> None:
    def main() -> None:
        with RecoverableState(default_state=Pair(), persist_state_key="pair", persistence_enabled=True) as p:
            p.a = p.b = 9
            raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        run_sync(main, backend=backend)
    assert stored("pair") == {"a": 9, "b": 9}


def test_sync_with_outside_run_sync_says_where_it_works(memory_storage: MemoryBackend) -> None:
    state = RecoverableState(default_state=Pair(), persist_state_key="pair", persistence_enabled=True)
    with pytest.raises(RuntimeError, match=r"run_sync\(\)"), state:
        pass
    assert not stop_requested()


@pytest.mark.parametrize("backend", BACKENDS)
def test_persisting_inside_editing_is_refused_not_deadlocked(
    memory_storage: MemoryBackend, backend: str
) -> None:
    def main() -> None:
        state = RecoverableState(default_state=Pair(), persist_state_key="pair", persistence_enabled=True)
        with state, state.editing(), pytest.raises(RuntimeError, match=r"'pair'.*editing"):
            state.persist_state_sync()

    run_sync(main, backend=backend)


def test_run_sync_refuses_to_nest(memory_storage: MemoryBackend) -> None:
    def main() -> None:
        with pytest.raises(RuntimeError, match="already running"):
            run_sync(lambda: None)

    run_sync(main)


@pytest.mark.anyio
async def test_a_persist_waits_while_another_thread_holds_editing(memory_storage: MemoryBackend) -> None:
    state = RecoverableState(
        default_state=Pair(), persist_state_key="pair", persistence_enabled="explicit_only"
    )
    pair = await state.initialize()
    entered, release = threading.Event(), threading.Event()

    def worker() -> None:
        with state.editing():
            pair.a = 1
            entered.set()
            release.wait(10)
            pair.b = 1

    thread = threading.Thread(target=worker)
    thread.start()
    entered.wait(10)
    saved = anyio.Event()

    async def persist() -> None:
        await state.persist_state()
        saved.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(persist)
        await anyio.sleep(0.3)
        assert not saved.is_set()  # the worker is mid-update: no snapshot yet
        release.set()
        with anyio.fail_after(10):
            await saved.wait()
    thread.join()
    assert await (await KeyValueStore.open()).get_value("pair") == {"a": 1, "b": 1}


@pytest.mark.anyio
async def test_editing_is_reentrant_in_one_thread(memory_storage: MemoryBackend) -> None:
    state = RecoverableState(
        default_state=Pair(), persist_state_key="pair", persistence_enabled="explicit_only"
    )
    pair = await state.initialize()

    def nested() -> None:
        with state.editing(), state.editing():
            pair.a = pair.b = 2

    await anyio.to_thread.run_sync(nested)
    with anyio.fail_after(30):  # a guard left held would make the persist wait forever
        await state.persist_state()
    assert await (await KeyValueStore.open()).get_value("pair") == {"a": 2, "b": 2}
