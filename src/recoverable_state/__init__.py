"""recoverable-state: keep a worker's state safe across restarts, crashes and migrations.

The front door: every public name is re-exported here; the modules behind it
are private and free to move.
"""

from ._config import Configuration
from ._errors import (
    InvalidKeyError,
    NotDurableError,
    PersistenceTimeoutError,
    RecordCorruptError,
    RecordDecryptionError,
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
from ._metrics import PersistStats
from .events import (
    Event,
    EventAbortingData,
    EventExitData,
    EventManager,
    EventMigratingData,
    EventPersistedData,
    EventPersistStateData,
    EventStateOwnershipLostData,
    EventSystemInfoData,
    ShutdownSignalReceived,
)
from .runners import WorkerInterrupted, run, run_sync, stop_requested, use_state_sync
from .state import KeyValueStore, RecoverableState, use_state
from .storage import KeyRing, StorageBackend, open_backend

__all__ = [
    "Configuration",
    "Event",
    "EventAbortingData",
    "EventExitData",
    "EventManager",
    "EventMigratingData",
    "EventPersistStateData",
    "EventPersistedData",
    "EventStateOwnershipLostData",
    "EventSystemInfoData",
    "InvalidKeyError",
    "KeyRing",
    "KeyValueStore",
    "NotDurableError",
    "PersistStats",
    "PersistenceTimeoutError",
    "RecordCorruptError",
    "RecordDecryptionError",
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
    "WorkerInterrupted",
    "open_backend",
    "run",
    "run_sync",
    "service_locator",
    "stop_requested",
    "use_state",
    "use_state_sync",
]
