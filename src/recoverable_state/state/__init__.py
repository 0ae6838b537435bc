"""States: a value kept in a key-value store across restarts, and the engine that keeps it.

The layer between events and storage: a `RecoverableState` listens for
PERSIST_STATE on its manager and writes through the `KeyValueStore`.
"""

from ._codec import describe_validation_error
from ._editing import EditGuard
from ._kvs import CRAWLEE_STATE_KEY, KeyValueStore, use_state
from ._schema import Migration
from ._state import DEFAULT_PERSISTENCE_TIMEOUT, RecoverableState

__all__ = [
    "CRAWLEE_STATE_KEY",
    "DEFAULT_PERSISTENCE_TIMEOUT",
    "EditGuard",
    "KeyValueStore",
    "Migration",
    "RecoverableState",
    "describe_validation_error",
    "use_state",
]
