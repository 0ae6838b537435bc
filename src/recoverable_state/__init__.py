"""recoverable-state: keep a worker's state safe across restarts, crashes and migrations.

The front door: every public name is re-exported here; the modules behind it
are private and free to move.
"""

from ._autosave import use_state
from ._config import Configuration
from ._errors import (
    InvalidKeyError,
    PersistenceTimeoutError,
    RecordCorruptError,
    RecoverableStateError,
    SchemaVersionError,
    ServiceConflictError,
    StateAlreadyInUseError,
    StateOwnershipLost,
    StorageAuthenticationError,
    StorageError,
    StorageUnavailableError,
    StoreNotFoundError,
    UnrepresentableStateError,
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
    "PersistenceTimeoutError",
    "RecordCorruptError",
    "RecoverableState",
    "RecoverableStateError",
    "SchemaVersionError",
    "ServiceConflictError",
    "ServiceLocator",
    "ShutdownSignalReceived",
    "StateAlreadyInUseError",
    "StateOwnershipLost",
    "StorageAuthenticationError",
    "StorageBackend",
    "StorageError",
    "StorageUnavailableError",
    "StoreNotFoundError",
    "UnrepresentableStateError",
    "open_backend",
    "run",
    "service_locator",
    "use_state",
]
