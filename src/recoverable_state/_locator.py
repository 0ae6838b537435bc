"""The service locator: the default EventManager, storage backend and Configuration.

This is an assembly point: it reads the Configuration and builds the services
from it. The services themselves take their settings as arguments.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

from ._config import Configuration
from ._errors import ServiceConflictError
from .storage import use_default_storage, use_purge_on_start

if TYPE_CHECKING:
    from .events import EventManager
    from .storage import StorageBackend

_T = TypeVar("_T")


class ServiceLocator:
    """Hands out the process-wide defaults, creating each on first use.

    Set a service before it is first used to replace the default (for example a
    `memory://` backend in tests). Once one was handed out, setting another
    raises ServiceConflictError: states already made would keep using the old
    one. Setting the same object again is allowed; `reset()` forgets every service.
    """

    def __init__(self) -> None:
        self._configuration: Configuration | None = None
        self._event_manager: EventManager | None = None
        self._storage: StorageBackend | None = None
        self._handed_out: set[str] = set()

    def _check(self, what: str, current: _T | None, new: _T) -> None:
        if what in self._handed_out and current is not new:
            raise ServiceConflictError(
                f"cannot set the {what}: another {what} was already handed out and is in use; "
                f"set it before anything uses it (or call service_locator.reset() in tests)"
            )

    def get_configuration(self) -> Configuration:
        """The configuration, read from the environment on first use."""
        if self._configuration is None:
            self._configuration = Configuration()
        self._handed_out.add("configuration")
        return self._configuration

    def set_configuration(self, configuration: Configuration) -> None:
        """Use this configuration from now on.

        Raises:
            ServiceConflictError: another configuration was already handed out.
        """
        self._check("configuration", self._configuration, configuration)
        self._configuration = configuration

    def get_event_manager(self) -> EventManager:
        """The default event manager, built from the configuration on first use."""
        if self._event_manager is None:
            self._event_manager = self.event_manager_from_configuration()
        self._handed_out.add("event manager")
        return self._event_manager

    def event_manager_from_configuration(self, **overrides: object) -> EventManager:
        """A new EventManager with the configuration's settings; `overrides` that are not None win."""
        from .events import EventManager

        config = self.get_configuration()
        settings: dict[str, object] = {
            "persist_state_interval": config.persist_state_interval,
            "close_timeout": config.shutdown_timeout,
            "preemption_notice_url": config.preemption_notice_url,
            "preemption_notice_kind": config.preemption_notice_kind,
            "preemption_poll_interval": config.preemption_poll_interval,
        }
        settings.update({k: v for k, v in overrides.items() if v is not None})
        return EventManager(**settings)  # type: ignore[arg-type]

    def set_event_manager(self, event_manager: EventManager) -> None:
        """Use this event manager as the default from now on.

        Raises:
            ServiceConflictError: another event manager was already handed out.
        """
        self._check("event manager", self._event_manager, event_manager)
        self._event_manager = event_manager

    def release_event_manager(self, event_manager: EventManager) -> None:
        """Forget `event_manager` as the default if it is the default (run() does it as it ends)."""
        if self._event_manager is event_manager:
            self._event_manager = None
            self._handed_out.discard("event manager")

    def get_storage(self) -> StorageBackend:
        """The default storage backend, opened from `storage_url` on first use."""
        if self._storage is None:
            from .storage import open_backend

            config = self.get_configuration()
            self._storage = open_backend(
                config.storage_url,
                pool_size=config.storage_pool_size,
                retry_timeout=config.storage_retry_timeout.total_seconds(),
            )
        self._handed_out.add("storage")
        return self._storage

    def set_storage(self, storage: StorageBackend) -> None:
        """Use this storage backend as the default from now on.

        Raises:
            ServiceConflictError: another storage backend was already handed out.
        """
        self._check("storage", self._storage, storage)
        self._storage = storage

    def reset(self) -> None:
        """Forget every service; the next `get_*` creates a fresh default."""
        self._configuration = None
        self._event_manager = None
        self._storage = None
        self._handed_out.clear()


service_locator = ServiceLocator()
"""The process-wide service locator."""

use_default_storage(service_locator.get_storage)
use_purge_on_start(lambda: service_locator.get_configuration().purge_on_start)
