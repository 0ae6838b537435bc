"""What persisting costs and how it goes: plain figures per manager, and OpenTelemetry instruments.

Only the OpenTelemetry *API* is used, and only when it is installed (the
`[otel]` extra): the application chooses the SDK and the exporter. Without
it, the same figures are read from `manager.stats`.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from types import MappingProxyType
from typing import Any, Protocol


class PersistFigures(Protocol):
    """What one persist did, as the metrics read it (the events' EventPersistedData is one)."""

    @property
    def duration(self) -> timedelta: ...
    @property
    def states_written(self) -> int: ...
    @property
    def bytes_written(self) -> int: ...
    @property
    def failures(self) -> Mapping[str, int]: ...
    @property
    def finished_at(self) -> datetime: ...
    @property
    def succeeded(self) -> bool: ...


METER_NAME = "recoverable_state"
"""The name of the OpenTelemetry meter every instrument belongs to."""

PERSIST_DURATION = "recoverable_state.persist.duration"
PERSIST_STATES = "recoverable_state.persist.states"
PERSIST_BYTES = "recoverable_state.persist.bytes"
PERSIST_FAILURES = "recoverable_state.persist.failures"
TICKS_SKIPPED = "recoverable_state.persist.ticks_skipped"
OWNERSHIP_LOSSES = "recoverable_state.ownership.losses"
LAST_SUCCESS = "recoverable_state.persist.last_success"

MANAGER_ATTRIBUTE = "recoverable_state.manager"
"""The attribute telling managers apart (a number, unique in the process)."""
ERROR_ATTRIBUTE = "error.type"
"""The attribute naming a failure's kind (the exception's class name), as OpenTelemetry names it."""


@dataclass(frozen=True)
class PersistStats:
    """A plain snapshot of a manager's persist figures since it was made (`manager.stats`)."""

    persists: int = 0
    """PERSIST_STATE rounds of the manager's states that ended."""
    persists_failed: Mapping[str, int] = field(default_factory=dict)
    """Rounds in which some state failed, by error kind (a round counts once per kind)."""
    states_written: int = 0
    """Records written, over every round."""
    bytes_written: int = 0
    """Bytes written, over every round."""
    ticks_skipped: int = 0
    """Timer ticks coalesced because a persist was still running."""
    ownership_losses: int = 0
    """States this process lost to another one."""
    last_persist_duration: timedelta | None = None
    """How long the last round took."""
    last_success_at: datetime | None = None
    """When the last round that persisted every state ended (None: none yet)."""


class PersistMetrics:
    """One manager's figures: kept for `stats`, and recorded to OpenTelemetry when it is installed."""

    _numbers = iter(range(1, 1 << 62))

    def __init__(self) -> None:
        self.number = next(PersistMetrics._numbers)
        self._lock = threading.Lock()
        self._stats = PersistStats()
        self._last_success: float | None = None  # time.monotonic()
        self._attributes = {MANAGER_ATTRIBUTE: self.number}
        _instruments().watch(self)

    @property
    def stats(self) -> PersistStats:
        return self._stats

    @property
    def attributes(self) -> dict[str, int]:
        return dict(self._attributes)

    def last_success_age(self) -> timedelta | None:
        last = self._last_success
        return None if last is None else timedelta(seconds=time.monotonic() - last)

    def persisted(self, figures: PersistFigures) -> None:
        """Count one persist round."""
        with self._lock:
            stats = self._stats
            failed = dict(stats.persists_failed)
            for kind in figures.failures:
                failed[kind] = failed.get(kind, 0) + 1
            if figures.succeeded:
                self._last_success = time.monotonic()
            self._stats = PersistStats(
                persists=stats.persists + 1,
                persists_failed=MappingProxyType(failed),
                states_written=stats.states_written + figures.states_written,
                bytes_written=stats.bytes_written + figures.bytes_written,
                ticks_skipped=stats.ticks_skipped,
                ownership_losses=stats.ownership_losses,
                last_persist_duration=figures.duration,
                last_success_at=figures.finished_at if figures.succeeded else stats.last_success_at,
            )
        _instruments().persisted(figures, self._attributes)

    def tick_skipped(self) -> None:
        with self._lock:
            self._stats = _replace(self._stats, ticks_skipped=self._stats.ticks_skipped + 1)
        _instruments().add(TICKS_SKIPPED, 1, self._attributes)

    def ownership_lost(self) -> None:
        with self._lock:
            self._stats = _replace(self._stats, ownership_losses=self._stats.ownership_losses + 1)
        _instruments().add(OWNERSHIP_LOSSES, 1, self._attributes)

    def observe_last_success(self) -> tuple[float, dict[str, Any]] | None:
        at = self._stats.last_success_at
        return None if at is None else (at.timestamp(), self._attributes)


def _replace(stats: PersistStats, **changes: Any) -> PersistStats:
    from dataclasses import replace

    return replace(stats, **changes)


class _Instruments:
    """The OpenTelemetry instruments, made once; every call is a no-op without opentelemetry-api."""

    def __init__(self) -> None:
        self._managers: weakref.WeakSet[PersistMetrics] = weakref.WeakSet()
        self._counters: dict[str, Any] = {}
        self._duration: Any = None
        self._states: Any = None
        self._bytes: Any = None
        try:
            from opentelemetry import metrics
        except ImportError:
            self.enabled = False
            return
        self.enabled = True
        meter = metrics.get_meter(METER_NAME)
        self._duration = meter.create_histogram(
            PERSIST_DURATION, unit="s", description="How long one persist of a manager's states took."
        )
        self._states = meter.create_histogram(
            PERSIST_STATES, unit="{state}", description="States written by one persist."
        )
        self._bytes = meter.create_histogram(
            PERSIST_BYTES, unit="By", description="Bytes written by one persist."
        )
        self._counters[PERSIST_FAILURES] = meter.create_counter(
            PERSIST_FAILURES,
            unit="{persist}",
            description="Persists in which a state failed, by error kind (error.type).",
        )
        self._counters[TICKS_SKIPPED] = meter.create_counter(
            TICKS_SKIPPED,
            unit="{tick}",
            description="Timer ticks coalesced because a persist was still running.",
        )
        self._counters[OWNERSHIP_LOSSES] = meter.create_counter(
            OWNERSHIP_LOSSES, unit="{state}", description="States taken over by another process."
        )
        meter.create_observable_gauge(
            LAST_SUCCESS,
            callbacks=[self._observe_last_success],
            unit="s",
            description="When (Unix time) the last persist that saved every state ended, per manager.",
        )

    def watch(self, manager: PersistMetrics) -> None:
        self._managers.add(manager)

    def persisted(self, figures: PersistFigures, attributes: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        self._duration.record(figures.duration.total_seconds(), attributes)
        self._states.record(figures.states_written, attributes)
        self._bytes.record(figures.bytes_written, attributes)
        for kind in figures.failures:
            self._counters[PERSIST_FAILURES].add(1, {**attributes, ERROR_ATTRIBUTE: kind})

    def add(self, name: str, amount: int, attributes: Mapping[str, Any]) -> None:
        if self.enabled:
            self._counters[name].add(amount, attributes)

    def _observe_last_success(self, options: Any) -> Iterable[Any]:
        from opentelemetry.metrics import Observation

        for manager in list(self._managers):
            observed = manager.observe_last_success()
            if observed is not None:
                yield Observation(observed[0], observed[1])


_made: _Instruments | None = None
_making = threading.Lock()


def _instruments() -> _Instruments:
    global _made
    if _made is None:
        with _making:
            if _made is None:
                _made = _Instruments()
    return _made


def error_kinds(errors: Iterable[BaseException]) -> dict[str, int]:
    """How many of `errors` are of each kind (class name); an ExceptionGroup counts its members."""
    kinds: dict[str, int] = {}
    for error in errors:
        members = error.exceptions if isinstance(error, BaseExceptionGroup) else (error,)
        for member in members:
            kind = type(member).__name__
            kinds[kind] = kinds.get(kind, 0) + 1
    return kinds
