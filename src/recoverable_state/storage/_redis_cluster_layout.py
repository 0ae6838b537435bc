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
`WRITE` and `READ` run unchanged on one bucket: the `live` hash stands where
they expect `rs:stores` (they only ask `HEXISTS` of it). Listing, purging and
dropping have scripts of their own here, which declare every key they touch. Only the
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

# The scripts below declare every key they touch: while a slot migrates, Redis
# answers TRYAGAIN or ASK for declared keys (retried), but a script touching an
# undeclared key that has already moved fails ("non local key").

# KEYS: live, index of one bucket. ARGV: store id ('' to skip the check), lowest
# key ('-' or '(' .. key), count (-1: all). Returns {0} when the store is
# missing, else {1, then the bucket's keys after lowest, in byte order}.
PAGE = """
if ARGV[1] ~= '' and redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return {0} end
local out = {1}
for _, key in ipairs(redis.call('ZRANGEBYLEX', KEYS[2], ARGV[2], '+', 'LIMIT', 0, ARGV[3])) do
  out[#out + 1] = key
end
return out
"""

# KEYS: live, then one record per key. ARGV: store id. Returns {0} when the store
# is missing, else {1, then per record: present (1 or 0), size, content type,
# version, updated_at}.
META = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return {0} end
local out = {1}
for i = 2, #KEYS do
  local meta = redis.call('HMGET', KEYS[i], 'content_type', 'version', 'updated_at')
  if meta[2] then
    out[#out + 1] = 1
    out[#out + 1] = redis.call('HSTRLEN', KEYS[i], 'value')
    out[#out + 1] = meta[1]
    out[#out + 1] = tonumber(meta[2])
    out[#out + 1] = meta[3]
  else
    for _ = 1, 5 do out[#out + 1] = 0 end
  end
end
return out
"""

# KEYS: live, index, then per key: record, history. ARGV: store id ('' to skip the
# check: a drop), then the keys. Deletes those records with their history and
# takes them out of the index. Returns 0 when the store is missing, else 1.
PURGE_KEYS = """
if ARGV[1] ~= '' and redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 0 end
for i = 3, #KEYS do redis.call('DEL', KEYS[i]) end
for i = 2, #ARGV do redis.call('ZREM', KEYS[2], ARGV[i]) end
return 1
"""

# KEYS: live. Ends a bucket's store: a write arriving later finds no marker in its
# own slot and answers "no such store".
FORGET = """
return redis.call('DEL', KEYS[1])
"""

# KEYS: live, history. ARGV: store id. Returns {0} when the store is missing,
# else {1, then the kept snapshots, newest first}.
HISTORY = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return {0} end
local out = {1}
for _, entry in ipairs(redis.call('LRANGE', KEYS[2], 0, -1)) do out[#out + 1] = entry end
return out
"""
