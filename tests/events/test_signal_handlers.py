"""Signal handlers of a manager: installed while entered, put back in order, from any task."""

from __future__ import annotations

import signal

import anyio
import pytest

from recoverable_state import Event, EventManager

pytestmark = pytest.mark.anyio

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def handlers() -> dict[int, object]:
    return {s: signal.getsignal(s) for s in SIGNALS}


async def test_nested_signal_handling_managers_put_the_handlers_back_in_order() -> None:
    before = handlers()
    async with EventManager(handle_signals=True):
        outer = handlers()
        assert outer != before
        async with EventManager(handle_signals=True):
            assert handlers() != outer
        assert handlers() == outer  # leaving the inner one keeps the outer one in charge
    assert handlers() == before


async def test_sighup_can_be_left_alone() -> None:
    before = signal.getsignal(signal.SIGHUP)
    async with EventManager(handle_signals=True, handle_sighup=False):
        assert signal.getsignal(signal.SIGHUP) == before
        assert signal.getsignal(signal.SIGTERM) != before


async def test_a_signal_handling_manager_left_from_a_listener_ends_its_block_quietly() -> None:
    before = handlers()

    async def exit_actor() -> None:
        await manager.__aexit__(None, None, None)

    manager = EventManager(handle_signals=True, close_timeout=5)
    async with manager:
        manager.on(event=Event.ABORTING, listener=exit_actor)
        manager.emit(event=Event.ABORTING)
        with anyio.fail_after(5):
            while manager.active:
                await anyio.sleep(0.01)
        assert handlers() == before
    assert handlers() == before
    async with manager:  # and it can be entered again
        assert manager.active
