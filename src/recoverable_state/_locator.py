"""The service locator: the process's default Configuration, storage backend and EventManager.

A front over the three slots that hold them, each owned by the layer that
builds it (`_config`, `storage`, `events`); see `_services.Service`. It reads
and sets them, and builds nothing itself.
"""

from __future__ import annotations

from ._config import Configuration, configuration_service
from .events import EventManager, default_event_manager
from .storage import StorageBackend, default_storage


class ServiceLocator:
    """Hands out the process-wide defaults, each made on first use.

    Set a service before anything uses the default to replace it (a `memory://`
    backend in tests). Once one is in place, set or handed out, setting another
    raises ServiceConflictError, as in Crawlee: states already made would keep
    using the old one. Setting the same object again is allowed; `reset()`
    forgets every service.
    """

    def get_configuration(self) -> Configuration:
        """The configuration, read from the environment on first use."""
        return configuration_service.get()

    def set_configuration(self, configuration: Configuration) -> None:
        """Use this configuration from now on.

        Raises:
            ServiceConflictError: another configuration is in use already.
        """
        configuration_service.set(configuration)

    def get_event_manager(self) -> EventManager:
        """The default event manager, built from the configuration on first use."""
        return default_event_manager.get()

    def set_event_manager(self, event_manager: EventManager) -> None:
        """Use this event manager as the default from now on.

        Raises:
            ServiceConflictError: another event manager is in use already.
        """
        default_event_manager.set(event_manager)

    def release_event_manager(self, event_manager: EventManager) -> None:
        """Forget `event_manager` as the default if it is the default (a runner does it as it ends)."""
        default_event_manager.release(event_manager)

    def get_storage(self) -> StorageBackend:
        """The default storage backend, opened from `storage_url` on first use."""
        return default_storage.get()

    def set_storage(self, storage: StorageBackend) -> None:
        """Use this storage backend as the default from now on.

        Raises:
            ServiceConflictError: another storage backend is in use already.
        """
        default_storage.set(storage)

    def reset(self) -> None:
        """Forget every service; the next `get_*` makes a fresh default."""
        for slot in (configuration_service, default_event_manager, default_storage):
            slot.reset()


service_locator = ServiceLocator()
"""The process-wide service locator."""
