"""The process's default storage backend: the one set, or opened from the configured URL."""

from __future__ import annotations

from .._config import configuration_service
from .._services import Service
from ._backend import StorageBackend
from ._registry import open_backend


def _from_configuration() -> StorageBackend:
    config = configuration_service.get()
    return open_backend(
        config.storage_url,
        pool_size=config.storage_pool_size,
        retry_timeout=config.storage_retry_timeout.total_seconds(),
        encryption_keys=config.encryption_keys.get_secret_value() if config.encryption_keys else None,
    )


default_storage: Service[StorageBackend] = Service("StorageClient", _from_configuration)
"""Where `KeyValueStore.open()` without `storage=` opens its store (Crawlee calls it the storage client)."""
