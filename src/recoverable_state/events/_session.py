"""One entering of an EventManager: from its first `__aenter__` to its last `__aexit__`.

What a session holds: the loop it runs on, the signal handlers it installed,
the cancel scope of the body of `async with` (which a shutdown signal cancels),
the scope its event sources run in, the signal it got and the deadline it
sets, and the watchdog that ends the process if the shutdown hangs.
"""

from __future__ import annotations

import logging
import signal
import time
from types import TracebackType

import anyio

from .._concurrency import LoopHandle
from ._shutdown import ExitWatchdog, SignalHandlers, exit_code

logger = logging.getLogger("recoverable_state")


class Session:
    """The live part of an entered manager; a new one each time it is entered from outside."""

    def __init__(
        self,
        loop: LoopHandle,
        handlers: SignalHandlers | None,
        *,
        close_timeout: float,
        exit_on_signal: bool,
    ) -> None:
        self.loop = loop
        self.handlers = handlers
        self.close_timeout = close_timeout
        self.exit_on_signal = exit_on_signal
        self.entered_by = anyio.get_current_task().id
        """The task that entered: the body's cancel scope lives there."""
        self.body_scope: anyio.CancelScope | None = None
        self.sources_scope = anyio.CancelScope()
        self.sources_done = anyio.Event()
        self.sources_started = False
        """Whether the sources emitted their first events (the first PERSIST_STATE and SYSTEM_INFO)."""
        self.signal: int | None = None
        self.deadline: float | None = None  # time.monotonic() by which the shutdown must be done
        self.watchdog: ExitWatchdog | None = None
        self.closing = False
        self.left_by_other_task = False

    def open_body_scope(self) -> None:
        """Enter the scope a signal cancels (from the entering task, in `__aenter__`)."""
        self.body_scope = anyio.CancelScope()
        self.body_scope.__enter__()

    def close_body_scope(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        """Leave the body's scope; whether it swallowed `exc` (the cancellation a signal caused)."""
        body_scope, self.body_scope = self.body_scope, None
        if body_scope is None:
            return False
        return bool(body_scope.__exit__(exc_type, exc, tb))

    def take_signal(self, signum: int, received: float) -> bool:
        """Take the first shutdown signal: set the deadline, arm the watchdog, cancel the body.

        Returns False for a signal after the first (it changes nothing).
        """
        if self.signal is not None:
            return False
        self.signal = signum
        self.deadline = received + self.close_timeout
        logger.warning(
            "%s received: persisting every state (at most %.1f s)",
            signal.Signals(signum).name,
            self.close_timeout,
        )
        if self.exit_on_signal:  # a backstop: whatever hangs, the process is gone shortly after the timeout
            self.watchdog = ExitWatchdog(128 + signum, self.deadline)
            self.watchdog.start()
        if self.body_scope is not None:
            self.body_scope.cancel()
        return True

    def time_left(self) -> float:
        """The last persist's time: the close timeout, or what is left of it since a signal."""
        if self.deadline is None:
            return self.close_timeout
        return min(self.close_timeout, max(self.deadline - time.monotonic(), 0.0))

    def end(self, *, persisted_all: bool, left_behind: bool) -> None:
        """The last exit is done: put the signal handlers back, tell the watchdog how it went."""
        if self.handlers is not None:
            self.handlers.remove()
            self.handlers = None
        watchdog, self.watchdog = self.watchdog, None
        if watchdog is None:
            return
        code = exit_code(self.signal, persisted_all=persisted_all)
        if self.signal is not None and self.exit_on_signal and code is not None:
            watchdog.persisted(complete=not left_behind, code=code)  # on guard until the process is gone
        else:
            watchdog.cancel()
