"""Storage: the KeyValueStore facade, the backend surface, the record contract and the backends.

The layers above import storage from here alone; the modules behind it are private.
"""

from ._backend import (
    DEFAULT_STORE_NAME,
    Durability,
    RecordAppend,
    RecordDelete,
    RecordInfo,
    RecordRead,
    RecordWrite,
    StorageBackend,
    StoredRecord,
    StoreInfo,
    WriteOp,
    WriteOutcome,
)
from ._batching import Batcher, batcher_of
from ._chain import (
    CHAIN_CONTENT_TYPE,
    DELTA_CONTENT_TYPE,
    apply_delta,
    chain_sizes,
    materialise,
    pack_chain,
    replay,
    unpack_chain,
)
from ._contract import (
    HistoryPlan,
    Pair,
    WritePlan,
    claim_reads,
    compare_and_set,
    expected_outcomes,
    fail_records,
    plan_reads,
    plan_writes,
)
from ._defaults import default_storage
from ._envelope import CHECKSUM_PARAM
from ._keyring import SEALED_CONTENT_TYPE, KeyRing, sealed_key_id
from ._kvs import (
    JSON_CONTENT_TYPE,
    QUARANTINE_SUFFIX,
    SCHEMA_VERSION_PARAM,
    KeyValueStore,
    check_key,
    is_json_content_type,
)
from ._memory import MemoryBackend
from ._registry import ENTRY_POINT_GROUP, BackendFactory, open_backend, registered_schemes
from ._server import Failure, ServerBackend
from ._sqlite import SQLiteBackend
from ._transactional import TransactionalBackend
from ._url import redact_url, url_options

__all__ = [
    "CHAIN_CONTENT_TYPE",
    "CHECKSUM_PARAM",
    "DEFAULT_STORE_NAME",
    "DELTA_CONTENT_TYPE",
    "ENTRY_POINT_GROUP",
    "JSON_CONTENT_TYPE",
    "QUARANTINE_SUFFIX",
    "SCHEMA_VERSION_PARAM",
    "SEALED_CONTENT_TYPE",
    "BackendFactory",
    "Batcher",
    "Durability",
    "Failure",
    "HistoryPlan",
    "KeyRing",
    "KeyValueStore",
    "MemoryBackend",
    "Pair",
    "RecordAppend",
    "RecordDelete",
    "RecordInfo",
    "RecordRead",
    "RecordWrite",
    "SQLiteBackend",
    "ServerBackend",
    "StorageBackend",
    "StoreInfo",
    "StoredRecord",
    "TransactionalBackend",
    "WriteOp",
    "WriteOutcome",
    "WritePlan",
    "apply_delta",
    "batcher_of",
    "chain_sizes",
    "check_key",
    "claim_reads",
    "compare_and_set",
    "default_storage",
    "expected_outcomes",
    "fail_records",
    "is_json_content_type",
    "materialise",
    "open_backend",
    "pack_chain",
    "plan_reads",
    "plan_writes",
    "redact_url",
    "registered_schemes",
    "replay",
    "sealed_key_id",
    "unpack_chain",
    "url_options",
]
