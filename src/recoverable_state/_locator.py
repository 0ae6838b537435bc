"""The service locator: the default EventManager, storage backend and Configuration."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._config import Configuration
from .storage import use_default_storage, use_purge_on_start

if TYPE_CHECKING:
    from .events import EventManager
    from .storage import StorageBackend


class ServiceLocator:
    """Hands out the process-wide defaults, creating each on first use.

    Set a service before it is first used to replace the default (for example a
    `memory://` backend in tests); `reset()` forgets every service.
    """

    def __init__(self) -> None:
        self._configuration: Configuration | None = None
        self._event_manager: EventManager | None = None
        self._storage: StorageBackend | None = None

    def get_configuration(self) -> Configuration:
        """The configuration, read from the environment on first use."""
        if self._configuration is None:
            self._configuration = Configuration()
        return self._configuration

    def set_configuration(self, configuration: Configuration) -> None:
        """Use this configuration from now on."""
        self._configuration = configuration

    def get_event_manager(self) -> EventManager:
        """The default event manager, built from the configuration on first use."""
        if self._event_manager is None:
            from .events import EventManager

            config = self.get_configuration()
            self._event_manager = EventManager(
                persist_state_interval=config.persist_state_interval,
                close_timeout=config.shutdown_timeout,
            )
        return self._event_manager

    def set_event_manager(self, event_manager: EventManager) -> None:
        """Use this event manager as the default from now on."""
        self._event_manager = event_manager

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
        return self._storage

    def set_storage(self, storage: StorageBackend) -> None:
        """Use this storage backend as the default from now on."""
        self._storage = storage

    def reset(self) -> None:
        """Forget every service; the next `get_*` creates a fresh default."""
        self._configuration = None
        self._event_manager = None
        self._storage = None


service_locator = ServiceLocator()
"""The process-wide service locator."""

use_default_storage(service_locator.get_storage)
use_purge_on_start(lambda: service_locator.get_configuration().purge_on_start)
