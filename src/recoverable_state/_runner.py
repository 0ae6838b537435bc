"""run(): start a worker's main coroutine inside an EventManager that handles shutdown."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any, TypeVar

import anyio

from ._config import configuration_service
from ._locator import service_locator
from .events import (
    EXIT_NOT_PERSISTED,
    EventManager,
    OnSignal,
    PreemptionNoticeKind,
    event_manager_from_configuration,
    exit_guard,
)

T = TypeVar("T")

logger = logging.getLogger("recoverable_state")


def run(
    main: Callable[..., Awaitable[T]],
    *args: Any,
    backend: str = "asyncio",
    backend_options: dict[str, Any] | None = None,
    handle_signals: bool = True,
    handle_sighup: bool = True,
    on_signal: OnSignal = "exit",
    persist_state_interval: timedelta | float | None = None,
    close_timeout: timedelta | float | None = None,
    preemption_notice_url: str | None = None,
    preemption_notice_kind: PreemptionNoticeKind | None = None,
    preemption_poll_interval: timedelta | float | None = None,
) -> T | None:
    """Run `await main(*args)` on `backend` ("asyncio" or "trio") inside an EventManager; return its result.

    The manager is made the service locator's default while `main` runs (states
    made without an `event_manager=` listen on it), and `main` runs as the body
    a shutdown signal cancels. On SIGTERM (SIGINT, SIGHUP) every state is
    persisted, then the process exits with 143 (130, 129); with
    `on_signal="raise"` ShutdownSignalReceived is raised instead, with
    `"return"` run() returns None. A preemption notice (when polled) persists
    every state and lets `main` go on.

    When the last persist could not store every state (a listener failed, or
    was still running past `close_timeout`), the process ends with
    EXIT_NOT_PERSISTED (75) within `close_timeout` plus a grace of a few
    seconds, also when a thread stuck in a store keeps it alive; run() is then
    the last thing the process does.

    Durations are timedeltas or seconds; left out, they come from the
    configuration (RECOVERABLE_STATE_PERSIST_STATE_INTERVAL,
    RECOVERABLE_STATE_SHUTDOWN_TIMEOUT, RECOVERABLE_STATE_PREEMPTION_*).
    """
    manager = event_manager_from_configuration(
        configuration_service.get(),
        persist_state_interval=persist_state_interval,
        close_timeout=close_timeout,
        handle_signals=handle_signals,
        handle_sighup=handle_sighup,
        on_signal=on_signal,
        preemption_notice_url=preemption_notice_url,
        preemption_notice_kind=preemption_notice_kind,
        preemption_poll_interval=preemption_poll_interval,
    )

    async def body() -> T | None:
        service_locator.set_event_manager(manager)
        result: T | None = None
        try:
            async with manager:
                result = await main(*args)
            return result
        finally:
            service_locator.release_event_manager(manager)
            if manager.unfinished_listeners:
                # A thread stuck in a store would keep the loop (or the interpreter) from ending.
                exit_guard(EXIT_NOT_PERSISTED)

    result = anyio.run(body, backend=backend, backend_options=backend_options)
    exit_if_not_persisted(manager)
    return result


def exit_code(manager: EventManager) -> int | None:
    """The exit code a runner's process ends with after `manager` was left; None: no exit is due.

    128 + the signal after a shutdown signal, EXIT_NOT_PERSISTED (75) when the
    last persist did not store every state; shared by run() and run_sync().
    """
    if not manager.persisted_all:
        return EXIT_NOT_PERSISTED
    if manager.received_signal is not None:
        return 128 + manager.received_signal
    return None


def exit_if_not_persisted(manager: EventManager) -> None:
    """Raise SystemExit(EXIT_NOT_PERSISTED) when the last persist did not store every state."""
    if not manager.persisted_all:
        logger.error("not every state was persisted on the way out; exiting with %d", EXIT_NOT_PERSISTED)
        raise SystemExit(EXIT_NOT_PERSISTED)
