"""`editing()`: a persist never serialises a state while a worker holds it, and holds no other state up.

On asyncio and trio, with a worker thread holding one state's editing() across persists.
"""

from __future__ import annotations

import threading
import time

import anyio
import pytest
from pydantic import BaseModel

from recoverable_state import KeyValueStore, PersistenceTimeoutError, RecoverableState
from recoverable_state.storage import MemoryBackend

pytestmark = pytest.mark.anyio


class Pair(BaseModel):
    a: int = 0
    b: int = 0


def pair(key: str, **options: object) -> RecoverableState[Pair]:
    return RecoverableState(
        default_state=Pair(),
        persist_state_key=key,
        persistence_enabled="explicit_only",
        **options,  # type: ignore[arg-type]
    )


async def test_a_state_held_in_editing_holds_no_other_state_up(memory_storage: MemoryBackend) -> None:
    held, free = pair("held"), pair("free")
    await RecoverableState.initialize_many([held, free])
    inside, release = threading.Event(), threading.Event()

    def worker() -> None:
        with held.editing():
            held.current_value.a = 1
            inside.set()
            release.wait(10)
            held.current_value.b = 1

    thread = threading.Thread(target=worker)
    thread.start()
    await anyio.to_thread.run_sync(inside.wait)
    free.current_value.a = free.current_value.b = 7
    kvs = await KeyValueStore.open()
    async with anyio.create_task_group() as tg:
        tg.start_soon(RecoverableState.persist_many, [held, free])
        with anyio.fail_after(5):
            while await kvs.get_value("free") is None:  # written while `held` is still held
                await anyio.sleep(0.01)
        assert await kvs.get_value("held") is None
        release.set()
    thread.join()
    assert await kvs.get_value("held") == {"a": 1, "b": 1}  # whole, once let go


async def test_a_state_held_past_its_timeout_is_named_and_the_others_are_saved(
    memory_storage: MemoryBackend,
) -> None:
    held, free = pair("held", persistence_timeout=0.3), pair("free", persistence_timeout=0.3)
    await RecoverableState.initialize_many([held, free])
    inside, release = threading.Event(), threading.Event()

    def worker() -> None:
        with held.editing():
            held.current_value.a = 1
            inside.set()
            release.wait(10)

    thread = threading.Thread(target=worker)
    thread.start()
    await anyio.to_thread.run_sync(inside.wait)
    free.current_value.a = 3
    began = time.monotonic()
    with pytest.raises(PersistenceTimeoutError, match=r"key 'held'.*editing\(\)"):
        await RecoverableState.persist_many([held, free])
    assert time.monotonic() - began < 2
    release.set()
    thread.join()
    assert await (await KeyValueStore.open()).get_value("free") == {"a": 3, "b": 0}
