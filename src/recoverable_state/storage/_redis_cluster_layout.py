"""The Redis Cluster backend's key layout and the few Lua scripts it adds to `_redis_scripts.py`.

A store's records are spread over `BUCKETS` buckets by a hash of their key;
each bucket is one hash tag, so one cluster slot:

- `rs:{reg}:stores`, `rs:{reg}:names`  the registry (as `rs:stores`/`rs:names` of
                                      the single-server layout), one slot
- `rs:{<id>.<b>}:live`                hash {<id>: 1} while the store exists: the
                                      bucket's own "is the store there" check
- `rs:{<id>.<b>}:k`                   sorted set of the bucket's keys, scored 0
- `rs:{<id>.<b>}:r:<key>`             the record hash {value, content_type, version, updated_at}
- `rs:{<id>.<b>}:h:<key>`             its history list, newest first
- `rs:{<id>.<b>}:batch:<uuid>`        the outcome of one bucket's share of a batch

A record, its history, its version (a field of the record), its bucket's index
and the bucket's `live` marker share one slot, so the single-server scripts
(`WRITE`, `READ`, `LIST`, `PURGE`) run unchanged on one bucket: the `live` hash
stands where they expect `rs:stores` (they only ask `HEXISTS` of it). Only the
text up to the first `}` is hashed, and a key comes after it, so no key can
move its record to another slot.
"""

from __future__ import annotations

import zlib

BUCKETS = 64
"""Buckets (slots) per store: its records spread over 64 slots, about 21 per master of three.
Part of the layout: changing it would lose track of stored records."""

REGISTRY = "rs:{reg}:stores"
NAMES = "rs:{reg}:names"


def bucket_of(key: str) -> int:
    """The bucket a key's record lives in (stable across processes and versions)."""
    return zlib.crc32(key.encode()) % BUCKETS


def tag(store_id: str, bucket: int) -> str:
    """The key prefix of one bucket: `rs:{<id>.<b>}:`, one cluster slot."""
    return f"rs:{{{store_id}.{bucket}}}:"


def live_key(store_id: str, bucket: int) -> str:
    return tag(store_id, bucket) + "live"


def index_key(store_id: str, bucket: int) -> str:
    return tag(store_id, bucket) + "k"


def record_prefix(store_id: str, bucket: int) -> str:
    return tag(store_id, bucket) + "r:"


def history_prefix(store_id: str, bucket: int) -> str:
    return tag(store_id, bucket) + "h:"


def marker_key(store_id: str, bucket: int, batch: str) -> str:
    return tag(store_id, bucket) + "batch:" + batch


# KEYS: rs:{reg}:names, rs:{reg}:stores. ARGV: store id.
# Forgets the store in the registry (its buckets are dropped after, one script each).
UNREGISTER = """
local name = redis.call('HGET', KEYS[2], ARGV[1])
if not name then return 0 end
redis.call('HDEL', KEYS[2], ARGV[1])
if string.sub(name, 1, 1) == '=' then
  local named = string.sub(name, 2)
  if redis.call('HGET', KEYS[1], named) == ARGV[1] then redis.call('HDEL', KEYS[1], named) end
end
return 1
"""

# KEYS: live, index of one bucket. ARGV: record prefix, history prefix.
# Deletes the bucket's records, index and live marker: a write arriving later
# finds no marker and answers "no such store" from its own slot.
DROP_BUCKET = """
for _, key in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
  redis.call('DEL', ARGV[1] .. key, ARGV[2] .. key)
end
redis.call('DEL', KEYS[1], KEYS[2])
return 1
"""

# KEYS: live, history. ARGV: store id. Returns {0} when the store is missing,
# else {1, then the kept snapshots, newest first}.
HISTORY = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return {0} end
local out = {1}
for _, entry in ipairs(redis.call('LRANGE', KEYS[2], 0, -1)) do out[#out + 1] = entry end
return out
"""
