"""The Redis backend's layout and Lua scripts: every batch decides inside the server, atomically.

The scripts run the record contract of `_contract.py` one request after
another (the conformance suite checks their answers against it). Every
mutating script takes the batch marker as KEYS[1] and its lifetime in ms as
ARGV[1]; a marker already set means this very call ran before, and its first
outcome is answered again (see `_redis.py`, retries).
"""

PREFIX = "rs:"
STORES = PREFIX + "stores"
NAMES = PREFIX + "names"

REPLAY = """
local done = redis.call('GET', KEYS[1])
if done then return cjson.decode(done) end
"""

REMEMBER = """
redis.call('SET', KEYS[1], cjson.encode(out), 'PX', ARGV[1])
return out
"""

# KEYS: marker, rs:stores, then per request: record, history, index.
# ARGV: ttl, now, then per request: store id, key, expected ('' = any), keep ('d' for a
# delete, 'a' for an append, else the history to keep), content type, value (both '' for
# a delete).
# Returns {1, then per request: applied (1, 0, or -1 when its store is missing), version}.
#
# Deltas live in the record's own hash, beside its snapshot: field `n` counts them and
# `d<i>`/`c<i>` hold the i-th delta and its content type. An append is one HSET of
# those small fields (the AOF logs only them, the snapshot is not touched); the HMGET
# that reads the version also reads `n`, so a record without deltas costs no extra
# command; a snapshot written over deltas starts the hash afresh (DEL, then HSET); a
# delete, a drop or a purge deletes the hash and its deltas with it.
WRITE = (
    REPLAY
    + """
local now = ARGV[2]
local n = (#KEYS - 2) / 3
local gone = {}
for i = 1, n do
  local store = ARGV[3 + (i - 1) * 6]
  if redis.call('HEXISTS', KEYS[2], store) == 0 then gone[i] = true end
end
local out = {1}
for i = 1, n do
 if gone[i] then
  out[#out + 1] = -1
  out[#out + 1] = 0
 else
  local a = 3 + (i - 1) * 6
  local rec, hist, idx = KEYS[3 + (i - 1) * 3], KEYS[4 + (i - 1) * 3], KEYS[5 + (i - 1) * 3]
  local key, expected, keep = ARGV[a + 1], ARGV[a + 2], ARGV[a + 3]
  local meta = redis.call('HMGET', rec, 'version', 'n')
  local stored = tonumber(meta[1] or '0')
  if expected ~= '' and tonumber(expected) ~= stored then
    out[#out + 1] = 0
    out[#out + 1] = stored
  elseif keep == 'a' then
    if stored > 0 and expected ~= '' then
      local nd, version = tonumber(meta[2] or '0') + 1, stored + 1
      redis.call('HSET', rec, 'd' .. nd, ARGV[a + 5], 'c' .. nd, ARGV[a + 4], 'n', nd,
                 'version', version, 'updated_at', now)
      out[#out + 1] = 1
      out[#out + 1] = version
    else
      out[#out + 1] = 0
      out[#out + 1] = stored
    end
  elseif keep == 'd' then
    if stored > 0 then
      redis.call('DEL', rec, hist)
      redis.call('ZREM', idx, key)
      out[#out + 1] = 1
    else
      out[#out + 1] = 0
    end
    out[#out + 1] = 0
  else
    local version, ctype, value = stored + 1, ARGV[a + 4], ARGV[a + 5]
    keep = tonumber(keep)
    if meta[2] then redis.call('DEL', rec) end
    redis.call('HSET', rec, 'value', value, 'content_type', ctype,
               'version', version, 'updated_at', now)
    redis.call('ZADD', idx, 0, key)
    if keep > 0 then
      redis.call('LPUSH', hist, version .. ' ' .. now .. ' ' .. #ctype .. ' ' .. ctype .. value)
      redis.call('LTRIM', hist, 0, keep - 1)
    end
    out[#out + 1] = 1
    out[#out + 1] = version
  end
 end
end
"""
    + REMEMBER
)

# KEYS: marker, rs:stores, then one record key per read.
# ARGV: ttl (0 when nothing is claimed: no marker), then per read: store id, claim ('1' or '0').
# Returns {1, then per read: found (1, 0, or -1 when its store is missing), value,
# content type, version, updated_at}. A replayed claim only reads. A record with deltas
# answers found 2 and, for value, the list {snapshot, its content type, delta 1, its
# content type, ...} (the backend packs it as one chain).
READ = """
local n = #KEYS - 2
local gone = {}
for i = 1, n do
  if redis.call('HEXISTS', KEYS[2], ARGV[2 * i]) == 0 then gone[i] = true end
end
local claim = ARGV[1] ~= '0' and redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[1])
local out = {1}
for i = 1, n do
  local rec = KEYS[2 + i]
  local found = redis.call('HMGET', rec, 'value', 'content_type', 'version', 'updated_at', 'n')
  if gone[i] then
    out[#out + 1] = -1
    for _ = 1, 4 do out[#out + 1] = 0 end
  elseif found[1] then
    local version = tonumber(found[3])
    if claim and ARGV[2 * i + 1] == '1' then
      version = redis.call('HINCRBY', rec, 'version', 1)
    end
    if found[5] then
      -- HMGET by 500 deltas at a time: unpack() of too many fields overflows Lua's stack.
      local pieces, count = {found[1], found[2]}, tonumber(found[5])
      for first = 1, count, 500 do
        local fields = {}
        for d = first, math.min(count, first + 499) do
          fields[#fields + 1] = 'd' .. d
          fields[#fields + 1] = 'c' .. d
        end
        for _, piece in ipairs(redis.call('HMGET', rec, unpack(fields))) do
          pieces[#pieces + 1] = piece
        end
      end
      out[#out + 1] = 2
      out[#out + 1] = pieces
    else
      out[#out + 1] = 1
      out[#out + 1] = found[1]
    end
    out[#out + 1] = found[2]
    out[#out + 1] = version
    out[#out + 1] = found[4]
  else
    for _ = 1, 5 do out[#out + 1] = 0 end
  end
end
return out
"""

# KEYS: rs:names, rs:stores. ARGV: name, new id. Returns the id the name maps to.
OPEN = """
local id = redis.call('HGET', KEYS[1], ARGV[1])
if id then return id end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[2], '=' .. ARGV[1])
return ARGV[2]
"""

# KEYS: rs:names, rs:stores, index. ARGV: store id, record prefix, history prefix.
DROP = """
local name = redis.call('HGET', KEYS[2], ARGV[1])
if not name then return 0 end
local keys = redis.call('ZRANGE', KEYS[3], 0, -1)
for _, key in ipairs(keys) do
  redis.call('DEL', ARGV[2] .. key, ARGV[3] .. key)
end
redis.call('DEL', KEYS[3])
redis.call('HDEL', KEYS[2], ARGV[1])
if string.sub(name, 1, 1) == '=' then
  local named = string.sub(name, 2)
  if redis.call('HGET', KEYS[1], named) == ARGV[1] then redis.call('HDEL', KEYS[1], named) end
end
return 1
"""

# KEYS: rs:stores, index. ARGV: store id, record prefix, lowest key ('-' for all, or
# '(' .. key to start after key), count (-1: all).
# Returns {0} when the store is missing, else {1, then per key: key, size, type, version, time}.
LIST = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return {0} end
local out = {1}
for _, key in ipairs(redis.call('ZRANGEBYLEX', KEYS[2], ARGV[3], '+', 'LIMIT', 0, ARGV[4])) do
  local rec = ARGV[2] .. key
  local meta = redis.call('HMGET', rec, 'content_type', 'version', 'updated_at')
  if meta[2] then
    out[#out + 1] = key
    out[#out + 1] = redis.call('HSTRLEN', rec, 'value')
    out[#out + 1] = meta[1]
    out[#out + 1] = tonumber(meta[2])
    out[#out + 1] = meta[3]
  end
end
return out
"""

# KEYS: rs:stores, index. ARGV: store id, record prefix, history prefix.
# Returns 0 when the store is missing, else 1 (the store stays, empty).
PURGE = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 0 end
for _, key in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
  redis.call('DEL', ARGV[2] .. key, ARGV[3] .. key)
end
redis.call('DEL', KEYS[2])
return 1
"""

SCRIPTS = {"write": WRITE, "read": READ, "open": OPEN, "drop": DROP, "list": LIST, "purge": PURGE}
"""Each script by the name the backend calls it by."""
