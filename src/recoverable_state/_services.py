"""One slot per process-wide default service: set before use, or built on first use.

A process has one default configuration, one default storage and one default
event manager; each lives in a `Service` slot owned by the layer that builds it
(`_config.configuration_service`, `storage.default_storage`,
`events.default_event_manager`). The service locator is a front over these
slots. Nothing is built at import: a slot builds its value on the first `get()`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, TypeVar

from ._errors import ServiceConflictError

T = TypeVar("T")


class Service(Generic[T]):
    """One process-wide default: the object set, or the one `build()` made on first use.

    Setting another object while one is in place (set, or built and handed out)
    raises ServiceConflictError, as Crawlee's service locator does: whoever got the
    first one would keep using it while others used the second. Setting the same
    object again is allowed; `release()` and `reset()` empty the slot.
    """

    def __init__(self, name: str, build: Callable[[], T]) -> None:
        self.name = name
        """The service's name in messages, as Crawlee names it ("EventManager")."""
        self._build = build
        self._value: T | None = None
        self._lock = threading.Lock()

    @property
    def current(self) -> T | None:
        """The object in the slot, or None when none was set or built yet (never builds)."""
        return self._value

    def get(self) -> T:
        """The object in the slot, built on first use."""
        value = self._value
        if value is None:
            with self._lock:
                value = self._value
                if value is None:
                    value = self._value = self._build()
        return value

    def set(self, value: T) -> None:
        """Put `value` in the slot.

        Raises:
            ServiceConflictError: another object is in the slot already.
        """
        with self._lock:
            current = self._value
            if current is not None and current is not value:
                raise ServiceConflictError(
                    f"{self.name} is already in use. Another {self.name} was set or handed out "
                    f"before ({current!r}); set yours before anything uses the default "
                    "(or call service_locator.reset() in tests)"
                )
            self._value = value

    def release(self, value: T) -> None:
        """Empty the slot if `value` is in it (a runner that set its own manager, ending)."""
        with self._lock:
            if self._value is value:
                self._value = None

    def reset(self) -> None:
        """Empty the slot: the next `get()` builds a fresh default."""
        with self._lock:
            self._value = None
