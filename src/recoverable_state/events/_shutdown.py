"""The way out of a process: shutdown signals, exit codes, and the watchdogs that bound it.

Signals are taken by a plain Python handler, which runs in the main thread
between two bytecodes even when the event loop never gets control back (a
worker loop that does not await). The handler hands the signal to the loop;
a watchdog thread notices when the loop does not take it, and interrupts the
running code the way Ctrl-C interrupts a script.
"""

from __future__ import annotations

import _thread
import collections
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

from .._concurrency import LoopHandle
from .._errors import RecoverableStateError

logger = logging.getLogger("recoverable_state")

EXIT_NOT_PERSISTED = 75
"""Exit code of a shutdown that could not persist every state (a listener failed or timed out)."""

EXIT_GRACE = 2.0
"""Seconds allowed past the shutdown timeout before the process is ended without unwinding."""

STARVED_AFTER = 1.0
"""Seconds the event loop may leave a shutdown signal untaken before the running code is interrupted."""


def exit_code(signum: int | None, *, persisted_all: bool) -> int | None:
    """The code a process ends with after its last persist; None when no exit is due.

    EXIT_NOT_PERSISTED (75) when not every state was saved, else 128 + the
    signal after a shutdown signal. The one rule, shared by the manager's
    `on_signal="exit"`, run() and run_sync().
    """
    if not persisted_all:
        return EXIT_NOT_PERSISTED
    if signum is not None:
        return 128 + signum
    return None


def shutdown_signals(*, handle_sighup: bool) -> tuple[signal.Signals, ...]:
    """The signals a manager handles: SIGTERM; SIGINT and SIGHUP unless they are ignored as it starts.

    A process started under `nohup` ignores SIGHUP, and one started in the
    background by a shell ignores SIGINT: those wishes are kept (CPython keeps an
    ignored SIGINT too). SIGTERM, a supervisor's stop, is always handled.
    `handle_sighup=False` leaves SIGHUP alone in any case.
    """
    handled = [signal.SIGTERM]
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        handled.append(signal.SIGINT)
    if handle_sighup and signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:
        handled.append(signal.SIGHUP)
    return tuple(handled)


def hard_exit(code: int, message: str, *args: object) -> None:
    """Log `message` and end the process now, without unwinding.

    The message is logged from a helper thread given half a second: a log
    handler stuck on a full pipe (held by a thread that hangs) must not stop
    the exit, which is all that matters here.
    """
    logging_thread = threading.Thread(target=logger.error, args=(message, *args), daemon=True)
    try:
        logging_thread.start()
    except RuntimeError:  # CPython 3.12.0-3.12.2 start no thread once the main thread ended (gh-113964)
        pass
    else:
        logging_thread.join(0.5)
    os._exit(code)


class ShutdownSignalReceived(RecoverableStateError):
    """The process got a shutdown signal; raised on leaving the manager with on_signal='raise'."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"received {signal.Signals(signum).name}; every state was persisted")
        self.signum = signum


class EventLoopStarved(BaseException):
    """Raised into code that kept the event loop from taking a shutdown signal.

    A BaseException, as KeyboardInterrupt is, so that `except Exception` in the
    busy code does not swallow it. It unwinds to `async with EventManager(...)`,
    which persists every state and exits as for the signal.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(
            f"{signal.Signals(signum).name} received while the event loop did not yield; "
            "the running code was interrupted"
        )
        self.signum = signum


class ExitWatchdog:
    """Ends the process when a shutdown hangs past its deadline.

    Until the manager has persisted, it fires at `deadline` (a time.monotonic()
    value) plus `grace`, with `EXIT_NOT_PERSISTED`. Once the manager is done, it
    waits for the main thread to end and then gives the interpreter `grace`
    seconds to exit: a thread that cannot be cancelled (a listener stuck in a
    call) would otherwise keep the process alive. A main thread still running
    past the deadline caught the SystemExit: the watchdog stands down, unless the
    last persist did not finish (then nothing the program does can save it).
    """

    def __init__(self, code: int, deadline: float, grace: float = EXIT_GRACE) -> None:
        self._code = code
        self._deadline = deadline
        self._grace = grace
        self._done = threading.Event()
        self._cancelled = False
        self._complete = True
        self._thread = threading.Thread(target=self._watch, name="recoverable-state-watchdog", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def persisted(self, *, complete: bool = True, code: int | None = None) -> None:
        """The manager is done; `complete` says whether every persist finished."""
        self._complete = complete
        if code is not None:
            self._code = code
        self._done.set()

    def cancel(self) -> None:
        """The process goes on (no exit follows): stand down."""
        self._cancelled = True
        self._done.set()

    def _watch(self) -> None:
        if not self._done.wait(max(self._deadline - time.monotonic(), 0.0) + self._grace):
            hard_exit(
                EXIT_NOT_PERSISTED,
                "shutdown did not finish in time; ending the process now, not every state "
                "was persisted (exit %d)",
                EXIT_NOT_PERSISTED,
            )
        if self._cancelled:
            return
        main = threading.main_thread()
        main.join(max(self._deadline + self._grace - time.monotonic(), self._grace))
        if main.is_alive() and self._complete:
            return  # someone caught the SystemExit and goes on
        if not main.is_alive():
            time.sleep(self._grace)
        hard_exit(
            self._code,
            "the process did not end %.0f s after its shutdown (a thread or task still runs); "
            "ending it now (exit %d)",
            self._grace,
            self._code,
        )


class SignalHandlers:
    """Python-level handlers of the shutdown signals, installed while a manager is entered.

    The first shutdown signal is handed to `on_signal` in the loop. A second
    SIGINT (SIGINT pressed twice, whatever came before it) ends the process at
    once, unsaved, with 130; any other repeated signal is logged and ignored.
    When the loop has not taken the first signal `starved_after` seconds later,
    EventLoopStarved is raised into the main thread's running code, and if the
    loop still does not take it by `deadline_after` plus the grace, the process
    is ended with EXIT_NOT_PERSISTED.

    Handlers are installed with signal.signal and the previous ones put back on
    removal, so nested managers restore each other in order on both loops.
    """

    def __init__(
        self,
        signums: tuple[signal.Signals, ...],
        on_signal: Callable[[int, float], None],
        loop: LoopHandle,
        *,
        deadline_after: float,
        starved_after: float = STARVED_AFTER,
    ) -> None:
        self._signums = signums
        self._on_signal = on_signal
        self._loop = loop
        self._deadline_after = deadline_after
        self._starved_after = starved_after
        self._previous: dict[signal.Signals, Any] = {}
        self._first: tuple[int, float] | None = None
        self._sigints = 0
        self._taken = threading.Event()
        self._interrupt: int | None = None
        self._pending: collections.deque[tuple[int, float]] = collections.deque()

    @property
    def received_at(self) -> float | None:
        """When (time.monotonic()) the first shutdown signal arrived, if one did."""
        return self._first[1] if self._first is not None else None

    def install(self) -> None:
        """Install the handlers (main thread only: a RuntimeError elsewhere)."""
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError(
                "EventManager(handle_signals=True) must be entered in the main thread, "
                "where signals are delivered"
            )
        for signum in self._signums:
            self._previous[signum] = signal.signal(signum, self._handle)

    def remove(self) -> None:
        """Put the previous handlers back."""
        for signum, previous in reversed(list(self._previous.items())):
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()
        self._taken.set()  # the starvation watchdog, if any, stands down

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # Runs in the main thread between two bytecodes, possibly inside the loop's own code.
        if self._interrupt == signum:
            self._interrupt = None
            raise EventLoopStarved(signum)
        if signum == signal.SIGINT:
            self._sigints += 1
            if self._sigints >= 2:
                hard_exit(128 + signum, "SIGINT received again: exiting at once, without persisting")
        name = signal.Signals(signum).name
        if self._first is not None:
            if signum == signal.SIGINT:
                logger.warning(
                    "%s received while persisting; press Ctrl-C again to exit at once, unsaved", name
                )
            else:
                logger.warning("%s received again; still persisting before exit", name)
            return
        self._first = (signum, time.monotonic())
        self._pending.append(self._first)
        self._loop.call_soon_threadsafe(self._deliver)
        threading.Thread(
            target=self._watch_starvation, args=(signum,), name="recoverable-state-signal-watch", daemon=True
        ).start()

    def _deliver(self) -> None:
        self._taken.set()
        while self._pending:
            signum, received = self._pending.popleft()
            self._on_signal(signum, received)

    def _watch_starvation(self, signum: int) -> None:
        if self._taken.wait(self._starved_after):
            return
        name = signal.Signals(signum).name
        logger.error(
            "%s received, but the event loop did not yield for %.1f s (the running code never awaits); "
            "interrupting it to persist and exit",
            name,
            self._starved_after,
        )
        self._interrupt = signum
        _thread.interrupt_main(signal.Signals(signum))
        if self._taken.wait(self._deadline_after + EXIT_GRACE):
            return
        hard_exit(
            EXIT_NOT_PERSISTED,
            "%s received, and the event loop never yielded; ending the process unsaved (exit %d)",
            name,
            EXIT_NOT_PERSISTED,
        )


def exit_guard(code: int = EXIT_NOT_PERSISTED, grace: float = EXIT_GRACE) -> None:
    """End the process with `code` if it is still alive `grace` seconds after its main thread stops.

    For a shutdown that left a listener behind: a thread stuck in a call would
    otherwise keep the interpreter from exiting.
    """
    watchdog = ExitWatchdog(code, time.monotonic(), grace)
    watchdog.start()
    watchdog.persisted(complete=False, code=code)
