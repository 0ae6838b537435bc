"""recoverable-state: keep a worker's state safe across restarts, crashes and migrations.

The front door: every public name is re-exported here; the modules behind it
are private and free to move.
"""

from ._config import Configuration
from ._errors import (
    InvalidKeyError,
    RecordCorruptError,
    RecoverableStateError,
    SchemaVersionError,
    ServiceConflictError,
    StateAlreadyInUseError,
    StateOwnershipLost,
    StorageError,
    StorageUnavailableError,
    StoreNotFoundError,
)
from ._locator import ServiceLocator, service_locator
from ._runner import run
from ._state import RecoverableState
from .events import (
    Event,
    EventAbortingData,
    EventExitData,
    EventManager,
    EventMigratingData,
    EventPersistStateData,
    EventStateOwnershipLostData,
    EventSystemInfoData,
    ShutdownSignalReceived,
)
from .storage import KeyValueStore, StorageBackend, open_backend

__all__ = [
    "Configuration",
    "Event",
    "EventAbortingData",
    "EventExitData",
    "EventManager",
    "EventMigratingData",
    "EventPersistStateData",
    "EventStateOwnershipLostData",
    "EventSystemInfoData",
    "InvalidKeyError",
    "KeyValueStore",
    "RecordCorruptError",
    "RecoverableState",
    "RecoverableStateError",
    "SchemaVersionError",
    "ServiceConflictError",
    "ServiceLocator",
    "ShutdownSignalReceived",
    "StateAlreadyInUseError",
    "StateOwnershipLost",
    "StorageBackend",
    "StorageError",
    "StorageUnavailableError",
    "StoreNotFoundError",
    "open_backend",
    "run",
    "service_locator",
]
