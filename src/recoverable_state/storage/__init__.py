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
from ._batching import Batcher, batcher_of
from ._contract import (
    HistoryPlan,
    WritePlan,
    claim_reads,
    compare_and_set,
    expected_outcomes,
    fail_records,
    plan_reads,
    plan_writes,
)
from ._defaults import default_storage
from ._kvs import (
    JSON_CONTENT_TYPE,
    QUARANTINE_SUFFIX,
    SCHEMA_VERSION_PARAM,
    KeyValueStore,
    check_key,
    is_json_content_type,
)
from ._memory import MemoryBackend
from ._sqlite import SQLiteBackend
from ._url import open_backend

__all__ = [
    "DEFAULT_STORE_NAME",
    "JSON_CONTENT_TYPE",
    "QUARANTINE_SUFFIX",
    "SCHEMA_VERSION_PARAM",
    "Batcher",
    "HistoryPlan",
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
    "WritePlan",
    "batcher_of",
    "check_key",
    "claim_reads",
    "compare_and_set",
    "default_storage",
    "expected_outcomes",
    "fail_records",
    "is_json_content_type",
    "open_backend",
    "plan_reads",
    "plan_writes",
]
