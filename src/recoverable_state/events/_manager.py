"""EventManager: a pyee event bus whose listeners run as tasks of their own on anyio."""

from __future__ import annotations

import logging
import signal
import threading
import time
from datetime import timedelta
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Self

import anyio

from .._concurrency import LoopHandle
from .._config import as_timedelta
from .._forks import watch_forks
from .._metrics import PersistMetrics, PersistStats
from ._bus import _CANCEL_GRACE, Listener, ListenerBus, _Call, unfinished_work
from ._preemption import poller_for
from ._rounds import PersistRounds
from ._session import Session
from ._shutdown import EventLoopStarved, ShutdownSignalReceived, SignalHandlers, exit_code, shutdown_signals
from ._sources import run_sources, system_info
from ._types import (
    Event,
    EventAbortingData,
    EventMigratingData,
    EventPersistedData,
    EventPersistStateData,
    EventSystemInfoData,
)

if TYPE_CHECKING:
    from ._preemption import PreemptionNotice

logger = logging.getLogger("recoverable_state")

OnSignal = Literal["exit", "raise", "return"]
"""What leaving the manager does after a shutdown signal: exit the process, raise, or return."""

HandleSignals = bool | Literal["auto"]
"""Whether a manager handles shutdown signals while entered: always, never, or "auto" (when
entered in the main thread)."""

PreemptionNoticeKind = Literal["auto", "aws", "gcp"]

NOT_ACTIVE = "the EventManager is not active: enter it first (`async with EventManager(...)`)"
"""The message of every RuntimeError raised for using a manager that is not entered."""

DEFAULT_PERSIST_STATE_INTERVAL = timedelta(seconds=60)
DEFAULT_CLOSE_TIMEOUT = timedelta(seconds=25)


class EventManager:
    """Emits events to listeners, each listener call a task of its own.

    Enter it (`async with EventManager() as events:`) to start the sources: the
    PERSIST_STATE timer (its first tick as the sources start), SYSTEM_INFO when
    asked for, and with `handle_signals` SIGTERM, SIGINT and SIGHUP. Leaving it
    stops them, emits one last PERSIST_STATE and waits for the listeners,
    shielded from cancellation and bounded by `close_timeout`; listeners still
    running after it (and a second of grace) are left behind and logged.
    Entering it again while entered nests: every exit emits PERSIST_STATE and
    waits for the running listeners, only the last exit tears down (and forgets
    the listeners registered while entered). The manager may be left from any
    task, also from inside one of its listeners. `emit` may be called from any
    thread (a sync listener's included).

    PERSIST_STATE coalesces: while one is running, further ones (timer ticks,
    emits, MIGRATING) fold into at most one pending, however long a store
    stalls; the pending one is migrating if any of them was.

    On the first SIGTERM or SIGHUP (SIGINT) the manager emits MIGRATING
    (ABORTING), cancels the body of the `async with` block, persists with
    `is_migrating=True`, and then, by `on_signal`: ends the process with 128 +
    the signal number (`"exit"`, the default; EXIT_NOT_PERSISTED, 75, when the
    last persist did not save every state), raises ShutdownSignalReceived
    (`"raise"`), or lets the block end normally (`"return"`). The shutdown is
    bounded by `close_timeout`, counted from the signal. A second SIGINT ends the
    process at once; other repeated signals are ignored. With `"exit"`, a
    watchdog thread ends the process if anything keeps it alive past the timeout
    plus a grace of 2 s. A signal is noticed even when the loop never yields: the
    running code is interrupted with EventLoopStarved after a second.

    With a preemption notice URL the manager polls the cloud's metadata service
    and, on the first notice, emits MIGRATING once, which persists every state
    with `is_migrating=True`. The body goes on: the platform's SIGTERM ends it.
    """

    def __init__(
        self,
        *,
        persist_state_interval: timedelta | float | None = None,
        close_timeout: timedelta | float | None = None,
        handle_signals: HandleSignals = False,
        handle_sighup: bool = True,
        on_signal: OnSignal = "exit",
        system_info_interval: timedelta | float | None = None,
        preemption_notice_url: str | None = None,
        preemption_notice_kind: PreemptionNoticeKind = "auto",
        preemption_poll_interval: timedelta | float | None = None,
    ) -> None:
        """Make a manager. Durations are timedeltas or seconds.

        The manager reads no configuration: `service_locator.get_event_manager()`
        and `run()` build it from RECOVERABLE_STATE_* settings.

        Args:
            persist_state_interval: how often PERSIST_STATE is emitted on its own (60 s).
            close_timeout: how long the last persist on leaving, or on a signal, may take (25 s).
            handle_signals: handle SIGTERM, SIGINT (and SIGHUP) while entered: True (the manager
                must then be entered in the main thread), False, or "auto": when entered in the
                main thread (the service locator's default manager does this).
            handle_sighup: with handle_signals, handle SIGHUP like SIGTERM (exit 129), unless
                SIGHUP is ignored when the manager is entered (`nohup`).
            on_signal: what leaving the manager does after a signal: "exit", "raise" or "return".
            system_info_interval: emit SYSTEM_INFO this often, the first as the sources start
                (None: never).
            preemption_notice_url: poll this metadata URL for a preemption notice;
                `"aws"` and `"gcp"` stand for the clouds' well-known URLs (None or "": off).
            preemption_notice_kind: `"aws"`, `"gcp"`, or `"auto"` to tell it from the URL.
            preemption_poll_interval: how often to poll (5 s).
        """
        self._persist_state_interval = as_timedelta(
            DEFAULT_PERSIST_STATE_INTERVAL if persist_state_interval is None else persist_state_interval,
            name="persist_state_interval",
        )
        self._close_timeout = as_timedelta(
            DEFAULT_CLOSE_TIMEOUT if close_timeout is None else close_timeout, name="close_timeout"
        )
        self._system_info_interval = (
            None
            if system_info_interval is None
            else as_timedelta(system_info_interval, name="system_info_interval")
        )
        if on_signal not in ("exit", "raise", "return"):
            raise ValueError(f"on_signal must be 'exit', 'raise' or 'return', not {on_signal!r}")
        if handle_signals not in (True, False, "auto"):
            raise ValueError(f"handle_signals must be True, False or 'auto', not {handle_signals!r}")
        self._handle_signals = handle_signals
        self._handle_sighup = handle_sighup
        self._on_signal: OnSignal = on_signal
        self._preemption = poller_for(preemption_notice_url, preemption_notice_kind, preemption_poll_interval)
        self._bus = ListenerBus(self._call_done)
        self._rounds = PersistRounds(self._bus, self._coalesced)
        self._bus.pending_work = self._pending_work
        self._metrics = PersistMetrics()
        self._depth = 0
        self._session: Session | None = None
        self._last: Session | None = None  # the session the last exit ended (its signal, its outcome)
        self._unfinished: list[str] = []
        self._persisted_all = True
        self._coalesced_logged = False
        watch_forks(self)

    def after_fork_in_child(self) -> None:
        """A forked child is not inside its parent's `async with` (its bus and rounds forget it too)."""
        self._depth, self._session, self._last = 0, None, None

    # -- state ---------------------------------------------------------------

    @property
    def active(self) -> bool:
        """Whether the manager is entered (and not yet left for the last time)."""
        return self._session is not None

    @property
    def persist_state_interval(self) -> timedelta:
        """How often PERSIST_STATE is emitted on its own."""
        return self._persist_state_interval

    @property
    def close_timeout(self) -> timedelta:
        """How long the last persist on leaving (or on a signal) may take."""
        return self._close_timeout

    @property
    def preemption_notice_url(self) -> str | None:
        """The metadata URL polled for a preemption notice, or None when not polling."""
        return self._preemption.url if self._preemption is not None else None

    @property
    def received_signal(self) -> int | None:
        """The shutdown signal received while entered (or in the last entering), if any."""
        session = self._session or self._last
        return session.signal if session is not None else None

    @property
    def unfinished_listeners(self) -> list[str]:
        """Listeners still running when the last exit stopped waiting for them (left behind)."""
        return list(self._unfinished)

    @property
    def persisted_all(self) -> bool:
        """Whether the last exit's PERSIST_STATE saved every state (no listener failed or was left)."""
        return self._persisted_all

    @property
    def stats(self) -> PersistStats:
        """A plain snapshot of this manager's persist figures (also recorded to OpenTelemetry)."""
        return self._metrics.stats

    @property
    def metric_attributes(self) -> dict[str, int]:
        """The attributes this manager's OpenTelemetry measurements carry, telling managers apart."""
        return self._metrics.attributes

    def last_persist_age(self) -> timedelta | None:
        """How long ago a PERSIST_STATE last saved every state of this manager (None: never yet).

        For a liveness probe: unhealthy when it is None long after start, or more
        than a few `persist_state_interval`s (see the observability guide).
        """
        return self._metrics.last_success_age()

    # -- listeners -----------------------------------------------------------

    def on(self, *, event: Event, listener: Listener) -> None:
        """Call `listener` on every `event`; registered twice, it is called twice."""
        self._bus.add(Event(event), listener, once=False, while_entered=self.active)

    def once(self, *, event: Event, listener: Listener) -> None:
        """Call `listener` on the next `event` only."""
        self._bus.add(Event(event), listener, once=True, while_entered=self.active)

    def off(self, *, event: Event, listener: Listener | None = None) -> None:
        """Stop calling `listener` on `event` (every registration of it); without one, any."""
        self._bus.remove(Event(event), listener)

    def is_listening(self, *, event: Event, listener: Listener) -> bool:
        """Whether `listener` is registered for `event` (the last exit forgets those added while entered)."""
        return self._bus.registered(Event(event), listener)

    def listener_count(self, event: Event) -> int:
        """How many listeners `event` has (a listener registered twice counts twice)."""
        return self._bus.count(Event(event))

    # -- emitting ------------------------------------------------------------

    def emit(self, *, event: Event, event_data: Any = None) -> None:
        """Start every listener of `event` as a task; returns without waiting for them.

        PERSIST_STATE coalesces with one already running (see the class). Emitting
        MIGRATING also asks for a PERSIST_STATE with `is_migrating=True`, so a
        migration a user announces is handled like one a signal announces. Safe
        from any thread: from outside the loop's thread, the emit is handed over.
        """
        event = Event(event)
        session = self._session
        if session is None:
            raise RuntimeError(NOT_ACTIVE)
        if not session.loop.in_loop_thread():
            if event is Event.PERSIST_STATE:  # folded with the others handed over meanwhile
                data = event_data if event_data is not None else EventPersistStateData()
                self._rounds.request_threadsafe(data, session.loop)
                return
            session.loop.call_soon_threadsafe(lambda: self._emit_in(session, event, event_data))
            return
        self._emit_in(session, event, event_data)

    def _emit_in(self, session: Session, event: Event, event_data: Any) -> None:
        if session is not self._session:
            return  # handed over from a thread, and the manager was left meanwhile
        if event is Event.PERSIST_STATE:
            self._rounds.request(event_data if event_data is not None else EventPersistStateData())
            return
        self._emit(event, event_data)
        if event is Event.MIGRATING:
            self._rounds.request(EventPersistStateData(is_migrating=True))

    def _emit(self, event: Event, event_data: Any) -> list[_Call]:
        if event is Event.STATE_OWNERSHIP_LOST:
            self._metrics.ownership_lost()
        return self._bus.emit(event, event_data)

    def _call_done(self, call: _Call) -> None:
        """A listener call ended: a persist's figures go to the stats and out as PERSISTED."""
        figures = call.result
        if call.listener.event is not Event.PERSIST_STATE or not isinstance(figures, EventPersistedData):
            return
        if call.session != self._bus.session:
            return  # left behind by an earlier entering
        self._metrics.persisted(figures)
        if not figures.complete:
            call.failed = True  # a state was not saved: a shutdown ending here exits 75
        if self._session is not None:
            self._emit(Event.PERSISTED, figures)

    def _coalesced(self, slow: bool) -> None:
        self._metrics.tick_skipped()
        if slow and not self._coalesced_logged:
            self._coalesced_logged = True
            logger.warning(
                "a PERSIST_STATE is still running; timer ticks are coalesced while it runs (at most "
                "one pending); logged once per entering"
            )

    def _pending_work(self) -> bool:
        session = self._session
        return self._rounds.pending or (session is not None and not session.sources_started)

    async def wait_for_all_listeners_to_complete(self, *, timeout: timedelta | float | None = None) -> None:
        """Wait until no listener runs; after `timeout`, cancel those still running and log them.

        A PERSIST_STATE coalesced behind a running one counts as running. Called
        from inside a listener, it does not wait for that listener, nor for any
        other listener that is itself waiting.

        Raises:
            RuntimeError: the manager is not active.
        """
        if self._session is None:
            raise RuntimeError(NOT_ACTIVE)
        seconds = None if timeout is None else as_timedelta(timeout, name="timeout").total_seconds()
        await self._bus.wait(seconds)

    # -- sources and signals -------------------------------------------------------

    def handle_shutdown_signal(self, signum: int, *, received_at: float | None = None) -> None:
        """Take a shutdown signal as the manager's own handler would (for runners that take signals).

        Emits MIGRATING (SIGTERM, SIGHUP) or ABORTING (SIGINT) and cancels the body;
        the shutdown deadline is counted from `received_at` (time.monotonic()),
        now when left out. Only the first signal counts. Call it in the loop's thread.
        """
        session = self._session
        received = time.monotonic() if received_at is None else received_at
        if session is None or not session.take_signal(signum, received):
            return
        if signum == signal.SIGINT:
            self._emit(Event.ABORTING, EventAbortingData())
        else:
            self._emit(Event.MIGRATING, EventMigratingData(time_remaining=self._close_timeout))

    async def _run_sources(self, session: Session) -> None:
        def started() -> None:
            session.sources_started = True
            self._bus.notify_changed()

        try:
            with session.sources_scope:
                await run_sources(
                    persist_state_interval=self._persist_state_interval,
                    on_persist_tick=lambda: self._rounds.request(EventPersistStateData(), from_timer=True),
                    system_info_interval=self._system_info_interval,
                    on_system_info=self._emit_system_info,
                    preemption=self._preemption,
                    on_notice=self._on_preemption_notice,
                    started=started,
                )
        except Exception:
            logger.exception("an event source of the EventManager failed")
        finally:
            started()
            session.sources_done.set()

    def _emit_system_info(self) -> None:
        self._emit(Event.SYSTEM_INFO, EventSystemInfoData(info=system_info()))

    def _on_preemption_notice(self, notice: PreemptionNotice) -> None:
        if self._session is None:
            return
        left = notice.time_remaining
        remaining = f"{left.total_seconds():.0f} s left" if left is not None else "time left unknown"
        logger.warning("preemption notice from %s (%s): persisting every state", notice.kind, remaining)
        self.emit(event=Event.MIGRATING, event_data=EventMigratingData(time_remaining=left))

    def _signal_handlers(self, loop: LoopHandle) -> SignalHandlers | None:
        wanted = self._handle_signals
        main = threading.current_thread() is threading.main_thread()
        if wanted is False or (wanted == "auto" and not main):
            return None
        handlers = SignalHandlers(
            shutdown_signals(handle_sighup=self._handle_sighup),
            lambda signum, received: self.handle_shutdown_signal(signum, received_at=received),
            loop,
            deadline_after=self._close_timeout.total_seconds(),
        )
        handlers.install()
        return handlers

    # -- entering and leaving --------------------------------------------------

    async def __aenter__(self) -> Self:
        self._depth += 1
        if self._depth > 1:
            return self
        try:
            loop = LoopHandle()
            handlers = self._signal_handlers(loop)
        except BaseException:
            self._depth -= 1
            raise
        session = Session(
            loop,
            handlers,
            close_timeout=self._close_timeout.total_seconds(),
            exit_on_signal=self._on_signal == "exit",
        )
        self._session = session
        self._unfinished = []
        self._persisted_all = True
        self._coalesced_logged = False
        self._bus.open(loop)
        self._rounds.open(loop)
        loop.spawn(lambda: self._run_sources(session))
        if handlers is not None:
            session.open_body_scope()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        session = self._session
        if self._depth == 0 or session is None:
            last = self._last
            if (
                last is not None
                and last.left_by_other_task
                and anyio.get_current_task().id == last.entered_by
            ):
                # Left from a listener already: close what belongs to this task, nothing else.
                last.left_by_other_task = False
                return last.close_body_scope(exc_type, exc, tb)
            raise RuntimeError(NOT_ACTIVE)
        self._depth -= 1
        if self._depth > 0:
            # A nested exit: the component that shared the manager saves as it finishes.
            with anyio.CancelScope(shield=True):
                self._rounds.request(EventPersistStateData(is_migrating=session.signal is not None))
                await self._bus.wait(session.time_left())
            return False
        swallowed = False
        if anyio.get_current_task().id == session.entered_by:
            swallowed = session.close_body_scope(exc_type, exc, tb)
        else:
            session.left_by_other_task = True  # the entering task's own `async with` still ends
        if isinstance(exc, EventLoopStarved):
            # The loop never took the signal: handle it now, its deadline counted from its arrival.
            received = session.handlers.received_at if session.handlers is not None else None
            self.handle_shutdown_signal(exc.signum, received_at=received)
        await self._last_persist(session)
        return self._after_signal(session) or swallowed

    async def _last_persist(self, session: Session) -> None:
        """Stop the sources, persist after the round in flight, wait for the listeners; then close."""
        final: list[_Call] = []
        left_behind: list[_Call] = []
        try:
            with anyio.CancelScope(shield=True):
                session.closing = True
                self._rounds.close()  # no more timer rounds: the last persist follows
                session.sources_scope.cancel()
                await self._rounds.wait_running(session.time_left())
                data = EventPersistStateData(is_migrating=session.signal is not None)
                final = self._emit(Event.PERSIST_STATE, data)
                left_behind = await self._bus.wait(session.time_left())
                with anyio.move_on_after(_CANCEL_GRACE):
                    await session.sources_done.wait()
        finally:
            self._close(session, final, left_behind)

    def _close(self, session: Session, final: list[_Call], left_behind: list[_Call]) -> None:
        """The last exit's teardown: judge the last persist, forget this entering's listeners."""
        self._persisted_all = not left_behind and all(c.done.is_set() and not c.failed for c in final)
        self._unfinished = [f"{c.listener.name} ({c.listener.event.value})" for c in left_behind]
        if left_behind:
            logger.error(
                "left behind, still running %.1f s after the close timeout: %s; not every state may be "
                "persisted",
                _CANCEL_GRACE,
                ", ".join(self._unfinished),
            )
            for call in left_behind:  # a listener may say what it has not finished (the states' keys)
                for what in unfinished_work(call.listener.target):
                    logger.error("not persisted (left behind): %s", what)
        elif not self._persisted_all:
            logger.error(
                "the last PERSIST_STATE did not finish for every listener; not every state was persisted"
            )
        self._bus.forget_entered()
        self._bus.close()
        self._rounds.forget()
        self._session, self._last = None, session
        session.end(persisted_all=self._persisted_all, left_behind=bool(left_behind))

    def _after_signal(self, session: Session) -> bool:
        """After a signal: exit, raise, or let the block end (True), as `on_signal` says."""
        signum = session.signal
        if signum is None:
            return False
        if self._on_signal == "exit":
            raise SystemExit(exit_code(signum, persisted_all=self._persisted_all))
        if self._on_signal == "raise":
            raise ShutdownSignalReceived(signum)
        return True  # "return": the block ends as if it had finished
