"""run(): start a worker's main coroutine inside an EventManager that handles shutdown."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any, TypeVar

import anyio

from ._locator import service_locator
from .events import EventManager
from .events._manager import OnSignal, PreemptionNoticeKind

T = TypeVar("T")


def _duration(value: timedelta | float | None) -> timedelta | None:
    if value is None or isinstance(value, timedelta):
        return value
    return timedelta(seconds=value)


def run(
    main: Callable[..., Awaitable[T]],
    *args: Any,
    backend: str = "asyncio",
    backend_options: dict[str, Any] | None = None,
    handle_signals: bool = True,
    on_signal: OnSignal = "exit",
    persist_state_interval: timedelta | float | None = None,
    close_timeout: timedelta | float | None = None,
    preemption_notice_url: str | None = None,
    preemption_notice_kind: PreemptionNoticeKind | None = None,
    preemption_poll_interval: timedelta | float | None = None,
) -> T | None:
    """Run `await main(*args)` on `backend` ("asyncio" or "trio") inside an EventManager; return its result.

    The manager is made the service locator's default (states made without an
    `event_manager=` listen on it), and `main` runs as the body a shutdown
    signal cancels. On SIGTERM (SIGINT) every state is persisted, then the
    process exits with 143 (130); with `on_signal="raise"` ShutdownSignalReceived
    is raised instead, with `"return"` run() returns None. A preemption notice
    (when polled) persists every state and lets `main` go on.

    Durations are timedeltas or seconds; left out, they come from the
    configuration (RECOVERABLE_STATE_PERSIST_STATE_INTERVAL,
    RECOVERABLE_STATE_SHUTDOWN_TIMEOUT, RECOVERABLE_STATE_PREEMPTION_*).
    """
    manager = EventManager(
        persist_state_interval=_duration(persist_state_interval),
        close_timeout=_duration(close_timeout),
        handle_signals=handle_signals,
        on_signal=on_signal,
        preemption_notice_url=preemption_notice_url,
        preemption_notice_kind=preemption_notice_kind,
        preemption_poll_interval=_duration(preemption_poll_interval),
    )

    async def body() -> T | None:
        service_locator.set_event_manager(manager)
        result: T | None = None
        async with manager:
            result = await main(*args)
        return result

    return anyio.run(body, backend=backend, backend_options=backend_options)
