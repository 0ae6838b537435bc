"""Storage: the KeyValueStore facade, the backend protocol and the backends."""

from ._backend import (
    DEFAULT_STORE_NAME,
    RecordInfo,
    RecordRead,
    RecordWrite,
    StorageBackend,
    StoredRecord,
    StoreInfo,
    WriteOutcome,
)
from ._kvs import (
    JSON_CONTENT_TYPE,
    QUARANTINE_SUFFIX,
    SCHEMA_VERSION_PARAM,
    KeyValueStore,
    check_key,
)
from ._memory import MemoryBackend
from ._sqlite import SQLiteBackend
from ._url import open_backend

__all__ = [
    "DEFAULT_STORE_NAME",
    "JSON_CONTENT_TYPE",
    "QUARANTINE_SUFFIX",
    "SCHEMA_VERSION_PARAM",
    "KeyValueStore",
    "MemoryBackend",
    "RecordInfo",
    "RecordRead",
    "RecordWrite",
    "SQLiteBackend",
    "StorageBackend",
    "StoreInfo",
    "StoredRecord",
    "WriteOutcome",
    "check_key",
    "open_backend",
]
