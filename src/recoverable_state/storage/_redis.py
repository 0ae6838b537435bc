"""Redis backend (`redis://host:port/db`): every batch is one atomic Lua script call.

redis-py's asyncio client does not run on trio, so the sync client runs in anyio
worker threads over a blocking connection pool of `pool_size` connections.

Layout (all under the `rs:` prefix; a store id is 32 hex digits):

- `rs:stores`          hash: store id -> `=<name>` (or `-` for an unnamed store)
- `rs:names`           hash: store name -> store id
- `rs:k:<id>`          sorted set of the store's keys, all scored 0 (lexical order)
- `rs:r:<id>:<key>`    hash {value, content_type, version, updated_at}; the time
                       is in integer microseconds since the epoch
- `rs:h:<id>:<key>`    list of kept snapshots, newest first, each packed as
                       `<version> <updated_at> <len(content_type)> <content_type><value>`
- `rs:batch:<uuid>`    the outcome of a mutating script call, kept for a short
                       while (see retries below)

Each `write_batch` is one EVALSHA (one per 64 MiB of values, as Redis blocks
every other client while a script runs): the script checks every store (a
write to a dropped store is answered with an error for that write alone), then
applies each write's compare-and-set in order, trims history, and returns the
outcomes. Redis runs a script atomically, so a reader sees each record whole,
and a `read_batch` with claims bumps versions in the same atomic step as the read.
Store creation by name is one script too (check-then-set inside Redis), so two
processes opening the same name get the same id. Keys are built inside the
scripts for listings, drops and purges, so Redis Cluster is not supported.

Durability: a write returns once Redis has acknowledged it. Whether that reply
means "on disk" is the server's setting: with `appendonly yes` and
`appendfsync always` it does. With `appendfsync everysec` (the default) a crash
may lose the last second or two of acknowledged writes, even a crash of the
Redis process alone (Redis postpones writing its AOF while a background fsync
is slow); without the AOF, a crash loses everything since the last RDB
snapshot. Configure the server for the guarantee you need.

Budget: `retry_timeout` seconds bound every wait on the server (see
`_server.py`): waiting for a free pooled connection (the pool's `timeout`),
connecting (`socket_connect_timeout`, at most 5 s an attempt, so that a host
that drops packets is tried again), every reply (`socket_timeout`, which also
bounds a long script), and the retries in between. A worker thread the caller
stopped waiting for ends by these socket timeouts.

Retries: a refused or lost connection (reported as "unreachable") or a server
that took the connection but sent no reply ("did not answer within N s") is
retried with exponential backoff (50 ms doubling to 1 s) within the budget,
then raises StorageUnavailableError naming the server and the store. A wrong
password or user (WRONGPASS, NOAUTH) raises StorageAuthenticationError at
once, and any other error reply StorageError at once. A connection
may drop after Redis ran a script but before its reply arrived, so every
mutating call carries a unique batch id: the script stores its outcome under
`rs:batch:<id>` (expiring after the retry budget plus a minute) and a retried
call finds it and returns the first outcome instead of writing again. A write
is thus applied at most once, and reports what really happened. A retried
claim that had already run returns the records without claiming them twice.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import anyio
import anyio.to_thread
import redis
import redis.exceptions
from redis.backoff import NoBackoff
from redis.commands.core import Script
from redis.retry import Retry

from .._errors import StorageError, StoreNotFoundError
from ._backend import (
    RecordInfo,
    RecordRead,
    RecordWrite,
    StoredRecord,
    StoreInfo,
    WriteOutcome,
)
from ._contract import split_by_size
from ._server import Failure, ServerBackend

T = TypeVar("T")

_PREFIX = "rs:"
_STORES = _PREFIX + "stores"
_NAMES = _PREFIX + "names"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# Every mutating script takes the batch marker as KEYS[1] and its lifetime in ms
# as ARGV[1]; a marker already set means this very call ran before.
_REPLAY = """
local done = redis.call('GET', KEYS[1])
if done then return cjson.decode(done) end
"""

_REMEMBER = """
redis.call('SET', KEYS[1], cjson.encode(out), 'PX', ARGV[1])
return out
"""

# KEYS: marker, rs:stores, then per write: record, history, index.
# ARGV: ttl, now, then per write: store id, key, expected ('' = any), keep, content type, value.
# Returns {1, then per write: applied (1, 0, or -1 when its store is missing), version}.
_WRITE = (
    _REPLAY
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
  local key, expected, keep = ARGV[a + 1], ARGV[a + 2], tonumber(ARGV[a + 3])
  local ctype, value = ARGV[a + 4], ARGV[a + 5]
  local stored = tonumber(redis.call('HGET', rec, 'version') or '0')
  if expected ~= '' and tonumber(expected) ~= stored then
    out[#out + 1] = 0
    out[#out + 1] = stored
  else
    local version = stored + 1
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
    + _REMEMBER
)

# KEYS: marker, rs:stores, then one record key per read.
# ARGV: ttl (0 when nothing is claimed: no marker), then per read: store id, claim ('1' or '0').
# Returns {1, then per read: found (1, 0, or -1 when its store is missing), value,
# content type, version, updated_at}. A replayed claim only reads.
_READ = """
local n = #KEYS - 2
local gone = {}
for i = 1, n do
  if redis.call('HEXISTS', KEYS[2], ARGV[2 * i]) == 0 then gone[i] = true end
end
local claim = ARGV[1] ~= '0' and redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[1])
local out = {1}
for i = 1, n do
  local rec = KEYS[2 + i]
  local found = redis.call('HMGET', rec, 'value', 'content_type', 'version', 'updated_at')
  if gone[i] then
    out[#out + 1] = -1
    for _ = 1, 4 do out[#out + 1] = 0 end
  elseif found[1] then
    local version = tonumber(found[3])
    if claim and ARGV[2 * i + 1] == '1' then
      version = redis.call('HINCRBY', rec, 'version', 1)
    end
    out[#out + 1] = 1
    out[#out + 1] = found[1]
    out[#out + 1] = found[2]
    out[#out + 1] = version
    out[#out + 1] = found[4]
  else
    for _ = 1, 5 do out[#out + 1] = 0 end
  end
end
return out
"""

# KEYS: marker, rs:stores, record, history, index. ARGV: ttl, store id, key, expected ('' = any).
# Returns {0} when the store is missing, {1, deleted}.
_DELETE = (
    _REPLAY
    + """
if redis.call('HEXISTS', KEYS[2], ARGV[2]) == 0 then return {0} end
local out = {1, 0}
local stored = redis.call('HGET', KEYS[3], 'version')
if stored and (ARGV[4] == '' or tonumber(ARGV[4]) == tonumber(stored)) then
  redis.call('DEL', KEYS[3], KEYS[4])
  redis.call('ZREM', KEYS[5], ARGV[3])
  out[2] = 1
end
"""
    + _REMEMBER
)

# KEYS: rs:names, rs:stores. ARGV: name, new id. Returns the id the name maps to.
_OPEN = """
local id = redis.call('HGET', KEYS[1], ARGV[1])
if id then return id end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[2], '=' .. ARGV[1])
return ARGV[2]
"""

# KEYS: rs:names, rs:stores, index. ARGV: store id, record prefix, history prefix.
_DROP = """
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
_LIST = """
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
_PURGE = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 0 end
for _, key in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
  redis.call('DEL', ARGV[2] .. key, ARGV[3] .. key)
end
redis.call('DEL', KEYS[2])
return 1
"""

_CONNECT_TIMEOUT = 5.0
"""Seconds one connection attempt may take at most (less when the budget is shorter)."""


def _time(micros: bytes | int) -> datetime:
    return _EPOCH + timedelta(microseconds=int(micros))


def _text(value: bytes | str) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value


class RedisBackend(ServerBackend):
    """Stores records in a Redis server; every batch is one atomic script call."""

    server_name = "Redis server"

    def __init__(self, url: str, *, pool_size: int = 4, retry_timeout: float = 10.0) -> None:
        super().__init__(url, pool_size=pool_size, retry_timeout=retry_timeout)
        self._lock = threading.Lock()
        self._client: redis.Redis | None = None
        self._scripts: dict[str, Script] = {}

    # -- plumbing -----------------------------------------------------------

    def _connect(self) -> redis.Redis:
        """The client, built on first use (in a worker thread)."""
        with self._lock:
            if self._client is None:
                pool = redis.BlockingConnectionPool.from_url(
                    self._dsn,
                    max_connections=self.pool_size,
                    timeout=self._wait,
                    socket_connect_timeout=min(self._wait, _CONNECT_TIMEOUT),
                    socket_timeout=self._wait,
                    retry=Retry(NoBackoff(), 0),  # retries happen here, with our budget
                    decode_responses=False,
                )
                client = redis.Redis(connection_pool=pool)
                for name, source in (
                    ("write", _WRITE),
                    ("read", _READ),
                    ("delete", _DELETE),
                    ("open", _OPEN),
                    ("drop", _DROP),
                    ("list", _LIST),
                    ("purge", _PURGE),
                ):
                    self._scripts[name] = client.register_script(source)
                self._client = client
            return self._client

    def _script(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        client = self._connect()
        return self._scripts[name](keys=keys, args=args, client=client)

    async def _run(self, store: str | None, call: Callable[[], T]) -> T:
        """Run `call` in a worker thread, retrying connection errors within the budget.

        The socket timeouts end the thread by themselves, so nothing interrupts it.
        """
        return await self._retrying(
            store, lambda deadline: anyio.to_thread.run_sync(call, abandon_on_cancel=True)
        )

    def _classify(self, exc: BaseException) -> Failure | None:
        if isinstance(exc, redis.exceptions.AuthenticationError):  # a ConnectionError too
            return Failure.AUTHENTICATION
        if isinstance(exc, redis.exceptions.TimeoutError | TimeoutError):
            return Failure.SILENT
        if isinstance(exc, redis.exceptions.ConnectionError | OSError):
            return Failure.UNREACHABLE
        if isinstance(exc, redis.exceptions.RedisError):
            return Failure.FAILED
        return None

    def _marker(self) -> tuple[str, int]:
        """A fresh batch marker key and how long (ms) it outlives the retry budget."""
        return f"{_PREFIX}batch:{uuid.uuid4().hex}", int((self.retry_timeout + 60) * 1000)

    @staticmethod
    def _record_key(store_id: str, key: str) -> str:
        return f"{_PREFIX}r:{store_id}:{key}"

    @staticmethod
    def _history_key(store_id: str, key: str) -> str:
        return f"{_PREFIX}h:{store_id}:{key}"

    @staticmethod
    def _index_key(store_id: str) -> str:
        return f"{_PREFIX}k:{store_id}"

    # -- stores -------------------------------------------------------------

    async def open_store(self, *, name: str | None = None, id: str | None = None) -> StoreInfo:
        def find() -> StoreInfo:
            client = self._connect()
            if id is not None:
                found = client.hget(_STORES, id)
                if found is None:
                    raise StoreNotFoundError(f"no store has this id in {self.url}", store=id)
                raw = _text(found)
                return StoreInfo(id, raw[1:] if raw.startswith("=") else None)
            new_id = uuid.uuid4().hex
            if name is None:
                client.hset(_STORES, new_id, "-")
                return StoreInfo(new_id, None)
            return StoreInfo(_text(self._script("open", [_NAMES, _STORES], [name, new_id])), name)

        info = await self._run(name if id is None else id, find)
        self._labels[info.id] = info.label
        return info

    async def list_stores(self) -> list[StoreInfo]:
        def rows() -> list[StoreInfo]:
            found: dict[bytes, bytes] = self._connect().hgetall(_STORES)  # type: ignore[assignment]
            return [
                StoreInfo(_text(i), _text(n)[1:] if n.startswith(b"=") else None)
                for i, n in found.items()
            ]

        stores = await self._run(None, rows)
        return sorted(stores, key=lambda s: (s.name or "", s.id))

    async def drop_store(self, store_id: str) -> None:
        def drop() -> None:
            self._script(
                "drop",
                [_NAMES, _STORES, self._index_key(store_id)],
                [store_id, self._record_key(store_id, ""), self._history_key(store_id, "")],
            )

        await self._run(self._label([store_id]), drop)

    # -- records ------------------------------------------------------------

    async def read_batch(self, reads: Sequence[RecordRead]) -> list[StoredRecord | StorageError | None]:
        marker, ttl = self._marker()
        keys = [marker, _STORES] + [self._record_key(r.store_id, r.key) for r in reads]
        args: list[Any] = [ttl if any(r.claim for r in reads) else 0]
        for r in reads:
            args += [r.store_id, "1" if r.claim else "0"]
        label = self._label({r.store_id for r in reads})
        reply = await self._run(label, lambda: self._script("read", keys, args))
        found: list[StoredRecord | StorageError | None] = []
        for i, r in enumerate(reads):
            present, value, ctype, version, updated = reply[1 + 5 * i : 6 + 5 * i]
            if present == -1:  # that read alone fails; the batch goes on
                found.append(self._gone(r.store_id))
                continue
            if not present:
                found.append(None)
                continue
            found.append(StoredRecord(r.key, value, _text(ctype), int(version), _time(updated)))
        return found

    async def write_batch(self, writes: Sequence[RecordWrite]) -> list[WriteOutcome | StorageError]:
        outcomes: list[WriteOutcome | StorageError] = []
        for run in split_by_size(writes, lambda w: len(w.value)):
            outcomes += await self._write_run(run)
        return outcomes

    async def _write_run(self, writes: Sequence[RecordWrite]) -> list[WriteOutcome | StorageError]:
        """Apply writes in one atomic script call."""
        marker, ttl = self._marker()
        now = time.time_ns() // 1000
        keys = [marker, _STORES]
        args: list[Any] = [ttl, now]
        for w in writes:
            keys += [
                self._record_key(w.store_id, w.key),
                self._history_key(w.store_id, w.key),
                self._index_key(w.store_id),
            ]
            expected = "" if w.expected_version is None else w.expected_version
            value = w.value if isinstance(w.value, bytes) else bytes(w.value)
            args += [w.store_id, w.key, expected, max(w.keep_history, 0), w.content_type, value]
        label = self._label({w.store_id for w in writes})
        reply = await self._run(label, lambda: self._script("write", keys, args))
        return [
            self._gone(w.store_id)  # that write alone fails; the batch goes on
            if reply[1 + 2 * i] == -1
            else WriteOutcome(applied=bool(reply[1 + 2 * i]), version=int(reply[2 + 2 * i]))
            for i, w in enumerate(writes)
        ]

    def _gone(self, store_id: str) -> StorageError:
        return StoreNotFoundError("no such store (was it dropped?)", store=self._label([store_id]))

    async def delete(self, store_id: str, key: str, expected_version: int | None = None) -> bool:
        marker, ttl = self._marker()
        keys = [
            marker,
            _STORES,
            self._record_key(store_id, key),
            self._history_key(store_id, key),
            self._index_key(store_id),
        ]
        expected = "" if expected_version is None else expected_version
        args = [ttl, store_id, key, expected]
        label = self._label([store_id])
        reply = await self._run(label, lambda: self._script("delete", keys, args))
        if reply[0] == 0:
            raise StoreNotFoundError("no such store (was it dropped?)", store=label)
        return bool(reply[1])

    async def list_records(
        self, store_id: str, *, exclusive_start_key: str | None = None, limit: int | None = None
    ) -> list[RecordInfo]:
        # The index is a sorted set scored 0: ZRANGEBYLEX walks it in byte order,
        # which for UTF-8 is code point order.
        label = self._label([store_id])
        keys = [_STORES, self._index_key(store_id)]
        lowest = "-" if exclusive_start_key is None else "(" + exclusive_start_key
        args = [store_id, self._record_key(store_id, ""), lowest, -1 if limit is None else limit]
        reply = await self._run(label, lambda: self._script("list", keys, args))
        if reply[0] == 0:
            raise StoreNotFoundError("no such store (was it dropped?)", store=label)
        return [
            RecordInfo(_text(k), int(size), _text(ctype), int(version), _time(updated))
            for k, size, ctype, version, updated in (
                reply[i : i + 5] for i in range(1, len(reply), 5)
            )
        ]

    async def purge_store(self, store_id: str) -> None:
        label = self._label([store_id])
        keys = [_STORES, self._index_key(store_id)]
        args = [store_id, self._record_key(store_id, ""), self._history_key(store_id, "")]
        if not await self._run(label, lambda: self._script("purge", keys, args)):
            raise StoreNotFoundError("no such store (was it dropped?)", store=label)

    async def read_history(self, store_id: str, key: str) -> list[StoredRecord]:
        label = self._label([store_id])

        def history() -> tuple[bool, list[bytes]]:
            client = self._connect()
            with client.pipeline(transaction=True) as pipe:
                pipe.hexists(_STORES, store_id)
                pipe.lrange(self._history_key(store_id, key), 0, -1)
                exists, entries = pipe.execute()
            return bool(exists), list(entries)

        exists, entries = await self._run(label, history)
        if not exists:
            raise StoreNotFoundError("no such store (was it dropped?)", store=label)
        kept = []
        for entry in entries:
            version, updated, ctlen, rest = entry.split(b" ", 3)
            size = int(ctlen)
            kept.append(
                StoredRecord(key, rest[size:], _text(rest[:size]), int(version), _time(updated))
            )
        return kept

    async def aclose(self) -> None:
        def close() -> None:
            with self._lock:
                if self._client is not None:
                    self._client.close()
                    self._client.connection_pool.disconnect()
                    self._client = None

        await anyio.to_thread.run_sync(close)

