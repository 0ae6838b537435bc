"""run(): start a worker's main coroutine inside an EventManager that handles shutdown."""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any, TypeVar

import anyio

from .._config import configuration_service
from ..events import (
    EXIT_NOT_PERSISTED,
    EventManager,
    OnSignal,
    PreemptionNoticeKind,
    default_event_manager,
    event_manager_from_configuration,
    exit_code,
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
    event_manager_factory: Callable[..., EventManager] = EventManager,
) -> T | None:
    """Run `await main(*args)` on `backend` ("asyncio" or "trio") inside an EventManager; return its result.

    The manager is made the service locator's default while `main` runs (states
    made without an `event_manager=` listen on it), and `main` runs as the body
    a shutdown signal cancels. On SIGTERM (SIGINT, SIGHUP) every state is
    persisted, then the process exits with 143 (130, 129); with
    `on_signal="raise"` ShutdownSignalReceived is raised instead, with
    `"return"` run() returns None. A preemption notice (when polled) persists
    every state and lets `main` go on.

    When a state could not be saved, the process ends with EXIT_NOT_PERSISTED (75)
    within `close_timeout` plus a grace of a few seconds, also when a thread stuck
    in a store keeps it alive: when the last persist did not store every state (a
    listener failed, or was still running past `close_timeout`), and when `main`
    ends with an error that says a state was not saved (a failed `teardown()` or
    `persist_state()`, logged with its store and key). run() is then the last
    thing the process does.

    `event_manager_factory` makes the manager (an EventManager subclass such as
    `recoverable_state.integrations.crawlee.CrawleeEventManager`), given the settings.

    Durations are timedeltas or seconds; left out, they come from the
    configuration (RECOVERABLE_STATE_PERSIST_STATE_INTERVAL,
    RECOVERABLE_STATE_SHUTDOWN_TIMEOUT, RECOVERABLE_STATE_PREEMPTION_*).
    """
    check_backend(backend)
    manager = event_manager_from_configuration(
        configuration_service.get(),
        factory=event_manager_factory,
        persist_state_interval=persist_state_interval,
        close_timeout=close_timeout,
        handle_signals=handle_signals,
        handle_sighup=handle_sighup,
        on_signal=on_signal,
        preemption_notice_url=preemption_notice_url,
        preemption_notice_kind=preemption_notice_kind,
        preemption_poll_interval=preemption_poll_interval,
    )
    unsaved: list[BaseException] = []

    async def body() -> T | None:
        default_event_manager.set(manager)
        try:
            async with manager:
                try:
                    return await main(*args)
                except Exception as exc:
                    if not is_unsaved(exc):
                        raise
                    unsaved.append(exc)
                    logger.error("a state was not saved: %s", exc)
            return None
        finally:
            default_event_manager.release(manager)
            if manager.unfinished_listeners or unsaved:
                # A thread stuck in a store would keep the loop (or the interpreter) from ending.
                exit_guard(EXIT_NOT_PERSISTED)

    result = anyio.run(body, backend=backend, backend_options=backend_options)
    exit_if_not_persisted(manager, unsaved=bool(unsaved))
    return result


def check_backend(backend: str) -> None:
    """Refuse a loop whose library is not installed with the extra that brings it."""
    if backend == "trio" and importlib.util.find_spec("trio") is None:
        raise ModuleNotFoundError(
            "backend='trio' needs trio: pip install 'recoverable-state[trio]'", name="trio"
        )


def is_unsaved(error: BaseException) -> bool:
    """Whether `error` (or one in a group) says that a state's latest value was not saved."""
    if isinstance(error, BaseExceptionGroup):
        return any(is_unsaved(member) for member in error.exceptions)
    return bool(getattr(error, "unsaved", False))


def exit_if_not_persisted(manager: EventManager, *, unsaved: bool = False) -> None:
    """Raise SystemExit(EXIT_NOT_PERSISTED) when the last persist, or the worker, left a state unsaved."""
    if unsaved or exit_code(None, persisted_all=manager.persisted_all) is not None:
        logger.error("not every state was persisted on the way out; exiting with %d", EXIT_NOT_PERSISTED)
        raise SystemExit(EXIT_NOT_PERSISTED)
