"""recoverable_state.run: main runs inside a signal-handling EventManager, on asyncio and trio.

Exiting with 143/130 is shown with real processes in test_shutdown.py (worker.py
uses run()); here run() is called in the test process, and the signals it is sent
are real ones (os.kill of this process) with on_signal "return" and "raise".
"""

from __future__ import annotations

import os
import signal
import threading
from datetime import timedelta
from typing import Any

import anyio
import pytest
from harness import BACKENDS
from pydantic import BaseModel

import recoverable_state
from recoverable_state import (
    Event,
    EventManager,
    EventPersistStateData,
    KeyValueStore,
    RecoverableState,
    ShutdownSignalReceived,
    service_locator,
)

pytestmark = pytest.mark.parametrize("backend", BACKENDS)


class Tally(BaseModel):
    count: int = 0


def stored(key: str, backend: str) -> Any:
    async def read() -> Any:
        kvs = await KeyValueStore.open()
        return await kvs.get_value(key)

    return anyio.run(read, backend=backend)


def test_run_returns_what_main_returns_and_persists_on_the_way_out(backend: str) -> None:
    seen: dict[str, Any] = {}

    async def main(start: int, step: int) -> int:
        manager = service_locator.get_event_manager()
        seen["manager"] = manager
        seen["active"] = manager.active
        seen["interval"] = manager.persist_state_interval
        seen["timeout"] = manager.close_timeout
        state = RecoverableState(default_state=Tally(), persist_state_key="tally", persistence_enabled=True)
        tally = await state.initialize()
        tally.count = start + step
        return tally.count * 10

    result = recoverable_state.run(
        main, 3, 4, backend=backend, persist_state_interval=600, close_timeout=timedelta(seconds=7)
    )
    assert result == 70
    assert isinstance(seen["manager"], EventManager)
    assert seen["active"] is True
    assert seen["interval"] == timedelta(seconds=600)
    assert seen["timeout"] == timedelta(seconds=7)
    assert not seen["manager"].active
    assert stored("tally", backend) == {"count": 7}


def test_an_error_in_main_propagates_after_the_states_are_persisted(backend: str) -> None:
    async def main() -> None:
        state = RecoverableState(default_state=Tally(), persist_state_key="tally", persistence_enabled=True)
        (await state.initialize()).count = 5
        raise LookupError("the work failed")

    with pytest.raises(LookupError, match="the work failed"):
        recoverable_state.run(main, backend=backend)
    assert stored("tally", backend) == {"count": 5}


async def count_until_signalled(seen: list[Any], signum: int) -> None:
    """Count, send this process `signum` at 3, and keep counting until cancelled.

    `seen` gets each PERSIST_STATE's data, and the count main ended with.
    """
    manager = service_locator.get_event_manager()
    manager.on(event=Event.PERSIST_STATE, listener=seen.append)
    state = RecoverableState(default_state=Tally(), persist_state_key="tally", persistence_enabled=True)
    tally = await state.initialize()
    try:
        while True:
            tally.count += 1
            if tally.count == 3:
                os.kill(os.getpid(), signum)
            await anyio.sleep(0.01)
            if tally.count > 500:
                raise AssertionError("the signal did not stop main")
    finally:
        seen.append(tally.count)


@pytest.mark.parametrize(
    "signum", [pytest.param(signal.SIGTERM, id="SIGTERM"), pytest.param(signal.SIGINT, id="SIGINT")]
)
def test_on_signal_return_persists_as_migrating_and_returns_none(backend: str, signum: int) -> None:
    seen: list[Any] = []
    result = recoverable_state.run(
        count_until_signalled, seen, signum, backend=backend, on_signal="return", persist_state_interval=600
    )
    assert result is None
    first_tick, final_count, persist = seen  # the first tick comes as the manager's sources start
    assert first_tick == EventPersistStateData(is_migrating=False)
    assert persist == EventPersistStateData(is_migrating=True)
    assert 3 <= final_count < 500
    assert stored("tally", backend) == {"count": final_count}


def test_on_signal_raise_raises_after_persisting(backend: str) -> None:
    seen: list[Any] = []
    with pytest.raises(ShutdownSignalReceived) as caught:
        recoverable_state.run(count_until_signalled, seen, signal.SIGTERM, backend=backend, on_signal="raise")
    assert caught.value.signum == signal.SIGTERM
    _, final_count, persist = seen
    assert persist == EventPersistStateData(is_migrating=True)
    assert stored("tally", backend) == {"count": final_count}


def test_handling_signals_outside_the_main_thread_is_a_clear_error(backend: str) -> None:
    outcome: dict[str, Any] = {}

    async def enter() -> None:
        manager = EventManager(handle_signals=True)
        with pytest.raises(RuntimeError, match="main thread") as caught:
            async with manager:
                pass
        outcome["error"] = caught.value
        outcome["active"] = manager.active
        # Nothing was left half-entered: entering again tries again (and fails the same way).
        with pytest.raises(RuntimeError, match="main thread"):
            async with manager:
                pass
        outcome["again"] = manager.active

    async def enter_without_signals() -> None:
        async with EventManager() as manager:
            outcome["plain"] = manager.active

    def in_thread() -> None:
        try:
            anyio.run(enter, backend=backend)
        except BaseException as exc:
            outcome["crash"] = exc
        anyio.run(enter_without_signals, backend=backend)

    thread = threading.Thread(target=in_thread)
    thread.start()
    thread.join(10)
    assert "crash" not in outcome, outcome
    assert outcome["active"] is False
    assert outcome["again"] is False
    assert outcome["plain"] is True


def test_run_can_be_called_again_in_the_same_process(backend: str) -> None:
    managers: list[EventManager] = []

    async def main() -> None:
        managers.append(service_locator.get_event_manager())
        assert managers[-1].active

    recoverable_state.run(main, backend=backend)
    recoverable_state.run(main, backend=backend)  # no ServiceConflictError: the first run let go
    assert managers[0] is not managers[1]


def test_run_refuses_when_states_already_use_another_default_manager(backend: str) -> None:
    service_locator.get_event_manager()  # handed out before run(): states made now would never persist

    async def main() -> None:
        raise AssertionError("main must not run")

    with pytest.raises(recoverable_state.ServiceConflictError, match=r"EventManager is already in use\."):
        recoverable_state.run(main, backend=backend)


def test_a_signal_reaches_the_migrating_and_aborting_listeners(backend: str) -> None:
    heard: list[Any] = []

    async def main(signum: int) -> None:
        manager = service_locator.get_event_manager()
        manager.on(event=Event.MIGRATING, listener=heard.append)
        manager.on(event=Event.ABORTING, listener=heard.append)
        os.kill(os.getpid(), signum)
        await anyio.sleep(10)  # cancelled by the signal

    for signum in (signal.SIGTERM, signal.SIGINT):
        assert recoverable_state.run(main, signum, backend=backend, on_signal="return") is None
    assert [type(event).__name__ for event in heard] == ["EventMigratingData", "EventAbortingData"]
